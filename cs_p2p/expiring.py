"""Keys remembered for a while, within a bound: what a node must not do again too soon (check
a key out of turn, take back a record a proof refuted), without growing with every peer's
requests."""

from __future__ import annotations

import time
from typing import Hashable


class Expiring:
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._until: dict[Hashable, float] = {}

    def __contains__(self, key: Hashable) -> bool:
        return self._until.get(key, 0.0) > time.monotonic()

    def add(self, key: Hashable, seconds: float) -> bool:
        """Remember `key` for `seconds`; False if the bound is reached by keys still remembered."""
        now = time.monotonic()
        if len(self._until) >= self.cap and key not in self._until:
            self._until = {k: t for k, t in self._until.items() if t > now}
            if len(self._until) >= self.cap:
                return False
        self._until[key] = now + seconds
        return True

    def __len__(self) -> int:
        return len(self._until)
