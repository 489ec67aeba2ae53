"""Demand ("what a node prefers to store"): how often a blob is asked for, as this node sees it.

A node sees the lookups for the keys it is close to (every `get_providers` it answers) and the
pieces it serves.  Each is a hit on a counter that decays with a half-life, so a blob asked
for a lot an hour ago counts little now.  The replication floor gives a blob in demand more
holders (up to a cap), the cache evicts the least asked-for blobs first, and `cs-p2p locate`
shows the rate.  Bounded: past `max_keys` counters, the coldest is forgotten.
"""

from __future__ import annotations

import math
import time
from typing import Hashable

HALF_LIFE = 600.0  # seconds after which a hit counts half
HOT = 6.0  # hits a minute at which a blob gets one holder more than the floor; each doubling one more


class Demand:
    def __init__(self, half_life: float = HALF_LIFE, max_keys: int = 100_000) -> None:
        self.half_life = half_life
        self.max_keys = max_keys
        self._counts: dict[Hashable, tuple[float, float]] = {}  # key -> (decayed hits, at when)

    def _decayed(self, key: Hashable, now: float) -> float:
        count, at = self._counts.get(key, (0.0, now))
        return count * math.pow(0.5, (now - at) / self.half_life)

    def hit(self, key: Hashable, n: float = 1.0, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if key not in self._counts and len(self._counts) >= self.max_keys:
            coldest = min(self._counts, key=lambda k: self._decayed(k, now))
            del self._counts[coldest]
        self._counts[key] = (self._decayed(key, now) + n, now)

    def per_minute(self, key: Hashable, now: float | None = None) -> float:
        """Hits a minute, averaged over the decay window (a steady rate r reads as r)."""
        now = time.monotonic() if now is None else now
        return self._decayed(key, now) * math.log(2) / self.half_life * 60


def extra_replicas(per_minute: float, hot: float = HOT) -> int:
    """Holders beyond the floor for a blob asked for `per_minute` times a minute: one at `hot`,
    one more for each doubling."""
    if per_minute < hot:
        return 0
    return 1 + int(math.log2(per_minute / hot))
