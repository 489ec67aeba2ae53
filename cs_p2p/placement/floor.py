"""The replication floor: every blob announced in the cluster keeps `replicas` holders.

No coordinator decides where copies go; it follows from DHT distance.  The nodes closest to a
blob's key keep its provider records (that is where announces go), so they see when holders
fall below the floor: a node died and its record expired, or containerd's GC deleted the
blob on node after node and each withdrew it.  Each of these watchers ranks the nodes it
knows that do not hold the blob by their distance to the key; the `deficit` closest fetch it
into their cache (`store.cache`: served and announced, never listed to containerd).  A
watcher further down the ranking waits two check intervals per place before it acts, so that
when a closer node cannot (no room, or dead but still in the routing table), the next one
takes over, and when the closer node does, the others see its in-flight record and stand
down.  In-flight records count as holders: a fetch under way is a copy on its way.  Meanwhile
it asks the nodes ranked first to check the key at once (`_nudge`): a dead holder is usually
found by some watcher's proof, seldom by the one whose turn it is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

from kademlia.node import Node

from ..dht.node import DhtNode
from ..dht.providers import ProviderRecord
from ..fetch.pieces import Fetch
from ..store import LocalStore
from .challenger import jittered
from ..dht.demand import extra_replicas

if TYPE_CHECKING:
    from ..service.content import ContentEvents

log = logging.getLogger("cs_p2p.placement")

DEFAULT_REPLICAS = 2
DEFAULT_INTERVAL = 10.0  # seconds between checks of the watched keys
MAX_CONCURRENT_COPIES = 4  # copies this node fetches for the floor at once (each opens 8 connections)
NUDGE_SPARE = 2  # nodes asked besides the `deficit` ranked first, in case one of those cannot act


class Replicator(Protocol):
    """Fetches a blob for the cluster (`fetch.source.PeerSource`): the fetch once committed here."""

    async def replicate(self, digest: str, size: int = 0) -> Fetch | None: ...


def keep_for_cluster(store: LocalStore, digest: str, events: "ContentEvents | None") -> bool:
    """A blob fetched for the cluster, not for containerd: into the cache, as a GC'd blob goes
    (announced as cached); what leaves the node (no room, or evicted for room) is withdrawn."""
    kept, evicted = store.to_cache(digest)
    log.info("copy cached" if kept else "copy dropped: no room in the cache", extra={"digest": digest, "evicted": evicted})
    if events:
        if kept:
            events.kept(digest)
        for gone in evicted if kept else [digest, *evicted]:
            events.deleted(gone)
    return kept


def rank(self_id: bytes, key: bytes, candidates: list[bytes]) -> int:
    """This node's place among `candidates` (ids that do not hold the blob, itself included),
    closest to `key` first."""
    target = Node(key)
    ordered = sorted(set(candidates) | {self_id}, key=lambda nid: target.distance_to(Node(nid)))
    return ordered.index(self_id)


def turn_to_act(place: int, deficit: int, short_for: float, interval: float) -> bool:
    """The `deficit` closest act at once; the next ones two intervals later per place, in case
    the closer ones cannot.  Two: watchers check at different moments, so a closer node may
    see the shortfall up to one interval after this one did, and its in-flight record needs
    a moment more to arrive."""
    return deficit > 0 and short_for >= max(0, place - deficit + 1) * 2 * interval


class ReplicaFloor:
    def __init__(self, dht: DhtNode, store: LocalStore, replicator: Replicator, replicas: int = DEFAULT_REPLICAS,
                 interval: float = DEFAULT_INTERVAL, events: "ContentEvents | None" = None,
                 in_doubt: Callable[[bytes], bool] | None = None, max_replicas: int = 0) -> None:
        self.dht = dht
        self.store = store
        self.replicator = replicator
        self.replicas = replicas
        self.max_replicas = max(max_replicas, replicas)  # the cap for blobs in demand
        self.interval = interval
        self.events = events  # told of copies cached and of blobs that left (the DHT)
        self.in_doubt = in_doubt  # key -> whether one of its holders may not hold it (`challenger`)
        self._short_since: dict[bytes, float] = {}  # key -> since when it has been below the floor
        self._nudged: dict[bytes, float] = {}  # key -> when the nodes ahead were last asked to check it
        self._tasks: set[asyncio.Task] = set()  # nudges sent and asks answered
        # key -> proofs of its holders now (`Challenger.check_now`), for `asked`
        self.prove: Callable[[bytes], Awaitable[object]] | None = None
        self._replicating: dict[str, asyncio.Task] = {}
        self._replicating_bytes = 0  # the sizes of those copies, together
        self.max_concurrent = MAX_CONCURRENT_COPIES
        self.replicated = 0  # blobs this node fetched for the floor

    async def run(self) -> None:
        while True:
            await asyncio.sleep(jittered(self.interval))
            try:
                self.check()
            except Exception:  # one bad round must not end the floor
                log.exception("replication check failed")

    def check(self, now: float | None = None) -> list[str]:
        """One round over the watched keys; returns the digests this node started to fetch."""
        now = time.monotonic() if now is None else now
        protocol = self.dht.protocol
        started = []
        for key, digest in list(protocol.digests.items()):
            records = protocol.providers.get(key)
            if not records:  # nobody holds it any more: nothing to copy it from
                del protocol.digests[key]
                self._short_since.pop(key, None)
                self._nudged.pop(key, None)
                continue
            if self._act(key, digest, records, now):
                started.append(digest)
        return started

    def recheck(self, key: bytes) -> bool:
        """Check one key now, out of turn: a proof of storage just dropped one of its holders."""
        digest = self.dht.protocol.digests.get(key)
        records = self.dht.protocol.providers.get(key)
        if digest is None or not records:
            return False
        try:
            return self._act(key, digest, records, time.monotonic())
        except Exception:  # as in `run`: one bad check must not end the proofs either
            log.exception("replication check failed")
            return False

    def _act(self, key: bytes, digest: str, records: list[ProviderRecord], now: float) -> bool:
        holders = {r.node_id for r in records}
        deficit = self.wanted(key) - len(holders) + (1 if self.in_doubt and self.in_doubt(key) else 0)
        if deficit <= 0:
            self._short_since.pop(key, None)
            self._nudged.pop(key, None)
            return False
        since = self._short_since.setdefault(key, now)
        size = collections.Counter(r.size for r in records).most_common(1)[0][0]
        if (self.dht.node_id in holders or digest in self._replicating or not self._has_room(size)
                or self.store.served_path(digest.split(":", 1)[1])):
            return False
        if len(self._replicating) >= self.max_concurrent:
            return False  # a burst (a node with thousands of blobs died): the rest in later rounds
        target = Node(key)
        nearest = self.dht.protocol.router.find_neighbors(target, self.dht.server.ksize)
        known = [n for n in nearest if n.id not in holders]
        if (len(nearest) >= self.dht.server.ksize
                and nearest[-1].distance_to(target) < target.distance_to(Node(self.dht.node_id))):
            # k nodes closer to the key than this one: announces go to them now, so what this
            # node keeps of the key is stale and it does not copy on it; but its proofs still
            # find dead holders, and the nodes whose turn it is hear of it.
            self._nudge(key, digest, records, known, deficit, now)
            return False
        place = rank(self.dht.node_id, key, [n.id for n in known])
        if not turn_to_act(place, deficit, now - since, self.interval):
            self._nudge(key, digest, records, known, deficit, now)
            return False
        log.info("below the replication floor: fetching a copy", extra={
            "digest": digest, "holders": len(holders), "wanted": len(holders) + deficit, "place": place})
        task = asyncio.get_running_loop().create_task(self._replicate(digest))
        self._replicating[digest] = task
        self._replicating_bytes += size

        def done(_t: asyncio.Task) -> None:
            self._replicating.pop(digest, None)
            self._replicating_bytes -= size

        task.add_done_callback(done)
        return True

    def _nudge(self, key: bytes, digest: str, records: list[ProviderRecord], known: list[Node], deficit: int,
               now: float) -> None:
        """Not this node's turn: hand the `deficit` nodes ranked first (and `NUDGE_SPARE` more)
        the records it has and ask them to check the key now (`asked`), at most once per
        interval per key.  They may not have
        seen the holder that died (this node's proof did), or not keep the key's records at all
        (they joined after its announces); without a word they acted only when their own proof
        round caught it, or never, and each place down the ranking waited two intervals more
        (`hack/bench-sim`: a blob short for 42 s in the median).  One that does not answer
        leaves the routing table, and the ranking is taken again without it, so the next
        node is asked in turn."""
        if self._nudged.get(key, -1e18) + self.interval > now:
            return
        self._nudged[key] = now
        ahead = known[:deficit + NUDGE_SPARE]  # `find_neighbors` order: closest to the key first
        protocol = self.dht.protocol

        async def nudge() -> None:
            answered = await asyncio.gather(*(protocol.call_hand_over(n, key, records, digest, check=True)
                                              for n in ahead))
            if not all(answered):
                self.recheck(key)

        self._spawn(nudge())

    def asked(self, key: bytes) -> None:
        """A watcher ranked after this node found the blob short (`_nudge`): prove its holders
        now, then check the floor (`dht.protocol.on_check`)."""
        async def prove_and_check() -> None:
            if self.prove is not None:
                await self.prove(key)
            self.recheck(key)

        self._spawn(prove_and_check())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wanted(self, key: bytes) -> int:
        """The floor, plus holders for a blob in demand (`demand`), up to the cap."""
        extra = extra_replicas(self.dht.protocol.demand.per_minute(key))
        return min(self.replicas + extra, self.max_replicas)

    def _has_room(self, size: int) -> bool:
        """The copy fits in the cache's budget beside the copies under way: checked before a
        fetch starts (each takes a full-size file at once), not after it lands."""
        return 0 < size and self._replicating_bytes + size <= self.store.cache.max_bytes

    async def _replicate(self, digest: str) -> None:
        try:
            if not await self.replicator.replicate(digest):
                return
        except Exception as exc:
            log.warning("replica fetch failed", extra={"digest": digest, "error": repr(exc)})
            return
        self.replicated += keep_for_cluster(self.store, digest, self.events)

