"""How long a DHT walk waits for a reply before it asks another node too (`dht.rtt`)."""

from __future__ import annotations

from cs_p2p.dht.rtt import MIN_WAIT, RoundTrip


def test_the_wait_follows_the_replies_seen_between_a_floor_and_the_cap():
    rtt = RoundTrip()
    assert rtt.wait(0.3) == 0.3  # nothing seen yet: the caller's cap
    for _ in range(20):
        rtt.observe(0.002)  # a LAN: replies in 2 ms
    assert rtt.wait(0.3) == MIN_WAIT  # not 300 ms per dead contact
    for _ in range(20):
        rtt.observe(0.05)  # a loaded node answers in 50 ms: the wait grows with it
    assert 0.05 < rtt.wait(0.3) < 0.3
    for _ in range(20):
        rtt.observe(2.0)
    assert rtt.wait(0.3) == 0.3  # never past the cap
