"""Keys remembered for a while within a bound (`expiring`)."""

from __future__ import annotations

import time

from cs_p2p.expiring import Expiring


def test_keys_are_forgotten_when_their_time_is_up_and_never_exceed_the_bound(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    seen = Expiring(cap=2)
    assert seen.add("a", 10) and seen.add("b", 30)
    assert "a" in seen and "c" not in seen
    assert not seen.add("c", 10)  # full of keys still remembered
    now[0] = 111.0
    assert "a" not in seen  # its 10 s are up
    assert seen.add("c", 10)  # and its place is taken
    assert len(seen) == 2 and "b" in seen and "c" in seen
