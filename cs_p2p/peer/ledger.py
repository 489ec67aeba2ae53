"""Fair sharing ("what makes nodes share"): what each peer gave this node, and who is served
first when upload slots are contended.

Every node keeps a ledger of the bytes it received from and sent to each peer (by host: the
address a peer fetches from is the one it announces, `Fetcher` binds to it), and of the
times a peer that announced a blob failed to deliver it.  Counters decay with a half-life,
so old favours fade; nothing in it comes from what a peer says about itself.

When every upload slot is taken, a request waits a moment in `UploadSlots`; a freed slot
goes to the waiting peer that gave this node the most (tit-for-tat), except that every
`optimistic_every`-th slot goes to the one waiting longest, whoever it is, so a newcomer with
nothing to give yet is still served (BitTorrent's optimistic unchoke).  A peer that only
takes, or announces and then refuses, ranks last on every node it did that to.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from typing import Callable

HALF_LIFE = 1800.0  # seconds after which a byte given counts half
QUEUE_WAIT = 2.0  # seconds a request waits for an upload slot before it is told 503, at least
MAX_QUEUE_WAIT = 8.0  # seconds at most: a fetcher takes 10 s without a byte for a stall
REFUSAL_COST = 4 << 20  # bytes a refusal takes off a peer's standing: a piece it did not send


class Ledger:
    def __init__(self, half_life: float = HALF_LIFE, max_peers: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life = half_life
        self.clock = clock
        self.max_peers = max_peers
        self._peers: dict[str, list[float]] = {}  # host -> [received, sent, refused, at when]

    def _entry(self, host: str, now: float) -> list[float]:
        entry = self._peers.get(host)
        if entry is None:
            if len(self._peers) >= self.max_peers:  # forget the peer that matters least
                del self._peers[min(self._peers, key=lambda h: sum(self._peers[h][:3]))]
            entry = self._peers[host] = [0.0, 0.0, 0.0, now]
        decay = math.pow(0.5, (now - entry[3]) / self.half_life)
        entry[0] *= decay
        entry[1] *= decay
        entry[2] *= decay
        entry[3] = now
        return entry

    def received(self, host: str, n: int) -> None:
        self._entry(host, self.clock())[0] += n

    def sent(self, host: str, n: int) -> None:
        self._entry(host, self.clock())[1] += n

    def refused(self, host: str) -> None:
        """A peer that announced a blob failed to deliver a piece or a probe of it."""
        self._entry(host, self.clock())[2] += 1

    def priority(self, host: str) -> float:
        """Bytes the peer gave us, less a piece for every refusal: who is served first."""
        if host not in self._peers:
            return 0.0
        received, _sent, refused, _ = self._entry(host, self.clock())
        return received - refused * REFUSAL_COST

    def snapshot(self) -> dict[str, dict[str, float]]:
        now = self.clock()
        return {h: dict(zip(("received", "sent", "refused"), self._entry(h, now)[:3])) for h in list(self._peers)}


def queue_wait(rate: int, slots: int, piece: int) -> float:
    """Seconds a request waits for a slot: long enough for a slot to turn over.  With a rate
    limit, `slots` uploads share `rate`, so a piece takes `piece * slots / rate`; a fixed 2 s
    at a low rate told every waiter 503 before any slot came free, and the waiters lost their
    places in the queue, the contributors' priority with them."""
    if rate <= 0:
        return QUEUE_WAIT
    return min(MAX_QUEUE_WAIT, max(QUEUE_WAIT, 2 * piece * slots / rate))


class UploadSlots:
    """`slots` uploads at once; contended slots go by `priority` (see the module docstring)."""

    def __init__(self, slots: int, priority: Callable[[str], float], optimistic_every: int = 4,
                 wait: float = QUEUE_WAIT) -> None:
        self.slots = slots
        self.priority = priority
        self.optimistic_every = optimistic_every
        self.wait = wait
        self.in_use = 0
        self.granted = 0
        self._order = itertools.count()
        self._waiting: dict[asyncio.Future, tuple[str, int]] = {}  # waiter -> (host, arrival)

    async def acquire(self, host: str) -> bool:
        """A slot for `host`, or False if none came free within `wait` seconds."""
        if self.in_use < self.slots and not self._waiting:
            self._grant()
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[waiter] = (host, next(self._order))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.wait)
            return True
        except asyncio.TimeoutError:
            if waiter.done():  # granted at the last moment: keep it
                return True
            return False
        finally:
            self._waiting.pop(waiter, None)

    def release(self) -> None:
        self.in_use -= 1
        waiters = [w for w in self._waiting if not w.done()]
        if not waiters or self.in_use >= self.slots:
            return
        if (self.granted + 1) % self.optimistic_every == 0:
            chosen = min(waiters, key=lambda w: self._waiting[w][1])  # the longest waiting, whoever
        else:
            chosen = min(waiters, key=lambda w: (-self.priority(self._waiting[w][0]), self._waiting[w][1]))
        self._grant()
        chosen.set_result(None)

    def _grant(self) -> None:
        self.in_use += 1
        self.granted += 1
