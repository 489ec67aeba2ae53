"""How long a DHT walk waits for one reply before it asks another node too.

Under churn a routing table always holds some dead contacts, and a walk that waits a fixed
0.3 s for each of them before moving on made 1 % of lookups take 300 ms or more
(`hack/bench-sim`, 1,000 nodes, 10 % replaced a minute), when replies come in a few ms.  So
the wait follows the replies actually seen, as TCP's retransmission timer does (Jacobson and
Karels: smoothed round trip plus four deviations), between a floor and the caller's cap.  A
request past its wait still counts if its reply comes later: the walk only stops waiting
for it, at the cost of one more request in flight.
"""

from __future__ import annotations

MIN_WAIT = 0.02  # seconds: below this, a busy node's event loop alone would look like loss
MIN_SAMPLES = 3  # replies seen before the estimate replaces the caller's cap


class RoundTrip:
    def __init__(self) -> None:
        self.samples = 0
        self.srtt = 0.0
        self.rttvar = 0.0

    def observe(self, seconds: float) -> None:
        if self.samples == 0:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
            self.srtt = 0.875 * self.srtt + 0.125 * seconds
        self.samples += 1

    def wait(self, cap: float) -> float:
        """Seconds to wait for a reply before asking another node, at most `cap`."""
        if self.samples < MIN_SAMPLES:
            return cap
        return min(cap, max(MIN_WAIT, self.srtt + 4 * self.rttvar))
