"""What the content service asks of the peer network for blobs this node lacks.

`Info` runs inside containerd's bolt write transaction, so it must answer fast: `locate`
looks the digest up in the DHT (bounded by `lookup_timeout`), starts the fetch in the
background and answers with the size the providers announced.  It never waits for bytes.

Cold, concurrent pulls are the other way in (`share`): when every node asks `Info` at the
same moment nobody holds the blob yet, and each containerd opens an ingest to download it
from the registry.  Each such ingest is announced at once as an in-flight provider.  At
the ingest's second STAT (containerd's `Status()`, after the bolt transaction, before it
contacts the registry) the node looks again: if a node that started earlier is already
downloading the blob (or has it), this one follows it — fetches the blob from peers while
they write it — and answers the STAT with the ingest complete, so its containerd commits
without contacting the registry.  Otherwise it stays the source and containerd downloads.
A follower relays the pieces it has to nodes that started after it; since nodes only wait on
earlier ones, no two wait on each other.  A fetch that `Info` started is announced in flight
the same way, so that nodes asking later follow it instead of all fetching from the first
provider; with only nodes still downloading found, `Info`'s fetch follows the one that started
last before it (`nearest`: eight nodes without the mirror, 24.6 s -> 18.6-19.1 s).

The cheapest way in is `claim`: for a config or layer of a manifest the node's mirror has
just resolved (`origin_claim`: its size and registry are known, and credentials the
registry accepted for that repository), `Info` answers at once from memory and cs-p2p fetches
the blob itself, so no byte of it crosses containerd's `Write`.  The fetch is announced in
flight, looks for holders and earlier in-flight providers (the same order as `share`, so of
eight nodes claiming at once one downloads and the others follow it) and, if there are none,
downloads from the registry in parallel ranges.  An image's config is the exception: it comes
from its registry first (peers only if that fails), as containerd reads it before it asks
for any layer, and finding peers takes longer than the registry's answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Callable

from ..dht.node import DhtNode
from ..dht.providers import ProviderRecord
from ..errors import NotFound
from ..timeline import TIMELINE
from .fetcher import Fetcher
from .origin import Claimable
from .pieces import Fetch

log = logging.getLogger("cs_p2p.fetch")

# The follow-or-download decision is made outside containerd's bolt transaction, so it can
# afford to wait for a loaded node's DHT more than `Info` can: a missed reply means one more
# download from the registry.
ANNOUNCE_WAIT = 1.0  # seconds a download may be held back for its in-flight announce
LOOKUP_ROUND = 0.5  # seconds a lookup round waits for replies
LOOKUP_WITHIN = 2.0  # seconds the whole lookup may take; what it found by then counts
FOLLOW_PROBE = 2.0  # seconds to check that a download to follow can deliver (a busy node is slow)
MIN_PROBE_TIME = 0.2  # seconds the reachability check gets however long the lookup took
# Claimed fetches that run at once on a node: a bound on files, connections and upload slots
# for images of many layers.  Followers form a chain (`nearest`), so a relay serves one
# follower per blob, and every layer of an ordinary image can run at once; with 3 (containerd's
# own download limit) each node's fourth layer waited for one of its first three, nodes took
# their layers in different orders, and the fourth's chain formed when the others were nearly
# done (eight nodes: 23.5 s instead of 19 s).
CLAIMS_AT_ONCE = 8
# An image's config up to this size comes from its registry first, peers only if it fails:
# finding a peer (announce, lookup, probe) took 0.4 - 1.4 s per node of a 16-node rollout,
# on the pull's path (containerd reads the config before it asks for any layer), where the
# registry answers in milliseconds.  The registry then serves each node one small request
# per image more (it already answers each node's manifest requests), and every layer once.
CONFIG_FROM_ORIGIN_MAX = 1 << 20
# `Info` runs inside containerd's metadata write transaction, which every other metadata
# operation of containerd waits on, and a pull asks it for every layer in a burst.  A claimed
# fetch holds off its work (lookup, registry requests, writes) until no claim came for
# `CLAIM_QUIET` seconds, at most `CLAIM_HOLD`, or until something reads its bytes: answering a
# burst while the fetches of its first claims ran on the same loop and cores took p99 7 - 16 ms
# per `Info` instead of under 3 (`hack/bench-dht`, 100 layers).
CLAIM_QUIET = 0.005
CLAIM_HOLD = 0.25


def precedes(rec: ProviderRecord, started: float, node_id: bytes) -> bool:
    """Whether a node whose own download or fetch began at `started` may fetch from `rec`: a
    holder, or an in-flight provider that began before it (ties broken by node id).  Every
    wait then points at an earlier start, so no chain of nodes waits on itself."""
    return not rec.inflight or (rec.started, rec.node_id) < (started, node_id)


def may_follow(rec: ProviderRecord, size: int, started: float, node_id: bytes) -> bool:
    return rec.size == size and precedes(rec, started, node_id)


def nearest(recs: list[ProviderRecord], k: int = 1) -> list[ProviderRecord]:
    """Holders, and of the in-flight providers (all earlier than us) the `k` that started last:
    nodes that start together then form a chain, each forwarding to the next as it receives,
    instead of every later node asking the first one, whose uplink then carried each piece
    once per follower."""
    relays = sorted((r for r in recs if r.inflight), key=lambda r: (r.started, r.node_id), reverse=True)
    return [r for r in recs if not r.inflight] + relays[:k]


async def _earlier_only(lookup, size: int, started: float, node_id: bytes,
                        fetch: Fetch | None = None) -> list[ProviderRecord]:
    """What a fetch that began at `started` may follow, nearest first; not a relay `fetch`
    already gave up on (its record may outlive it), so that the next one is chosen instead."""
    dropped = fetch.dropped if fetch is not None else set()
    return nearest([r for r in await lookup
                    if may_follow(r, size, started, node_id) and not (r.inflight and r.addr in dropped)])


class PeerSource:
    def __init__(self, dht: DhtNode, fetcher: Fetcher, lookup_timeout: float = 1.0,
                 origin_claim: Callable[[str], Claimable | None] | None = None) -> None:
        self.dht = dht
        self.fetcher = fetcher
        self.lookup_timeout = lookup_timeout
        # digest -> its size and a registry cs-p2p may fetch it from itself (the mirror knows)
        self.origin_claim = origin_claim
        self._relaying: set[str] = set()  # digests fetched here and announced in flight
        # Digest -> start of this node's own in-flight record while containerd downloads it.
        self._downloading: dict[str, float] = {}
        self._for_cluster: set[str] = set()  # fetches for the replication floor nobody here asked for
        self._claim_slots = asyncio.Semaphore(CLAIMS_AT_ONCE)
        self._last_claim = 0.0  # monotonic time of the latest claim (`_after_the_claims`)

    def inflight(self, digest: str) -> Fetch | None:
        return self.fetcher.inflight.get(digest)

    def failure(self, digest: str) -> str | None:
        """Why peers (and the registry after them) could not deliver `digest` a moment ago."""
        return self.fetcher.recently_failed(digest)

    def not_found(self, digest: str) -> NotFound:
        """NOT_FOUND, with the reason if peers (and the registry) just failed to deliver it:
        containerd's error then says what went wrong, whether it asked `Info`, `Read` or
        `Apply` after the fetch ended."""
        why = self.failure(digest)
        return NotFound(f"content {digest}: not found" + (f" (fetching it from peers failed: {why})" if why else ""))

    async def locate(self, digest: str) -> Fetch | None:
        """The fetch of `digest` from peers, started if peers have it; None if none do.

        While this node's containerd downloads the blob itself (its ingest announced in
        flight, `share`), the download's start orders what may be followed: the mirror serving
        that download must not follow a node that started later, which may be following us
        (four nodes pulling at once otherwise waited on each other in a ring until relays
        timed out)."""
        fetch = self.fetcher.inflight.get(digest)
        if fetch is not None:
            self._for_cluster.discard(digest)  # containerd here wants it after all
            return fetch
        if self.fetcher.recently_failed(digest):
            return None
        started, me = self._downloading.get(digest, time.time()), self.dht.node_id
        providers, reachable = await self._deliverable(digest, lambda rec: precedes(rec, started, me))
        if not reachable:
            return None
        size = reachable[0].size
        checked = reachable + [p for p in providers if p.size == size and p not in reachable]

        async def chain() -> list[ProviderRecord]:
            return await _earlier_only(self.dht.find_providers(digest), size, started, me,
                                       self.fetcher.inflight.get(digest)) or checked

        if any(not p.inflight for p in reachable):  # a holder: take what was found
            fetch = self.fetcher.start(digest, size, checked, more=chain)
        else:
            # Only nodes still downloading it: which of them to follow is the full lookup's to
            # say (`nearest`, a chain), not whichever the walk met first: nodes asking at the
            # same moment otherwise all fetched from the first ones, whose uplinks and upload
            # slots then carried most of the rollout.
            fetch = self.fetcher.start(digest, size, [], more=chain)
        if fetch.task is not None and digest not in self._relaying:
            self._relay(fetch, started)
        return fetch

    def claim(self, digest: str) -> Fetch | None:
        """The fetch of `digest` if cs-p2p can bring it in itself without asking the network
        first (a config or layer of a manifest resolved through the mirror), started if need
        be; None otherwise (then `locate`).  Memory only: `Info` runs inside containerd's
        metadata transaction."""
        if self.origin_claim is None or digest in self.fetcher.inflight or self.fetcher.recently_failed(digest):
            return None
        found = self.origin_claim(digest)
        if found is None:
            return None
        size, origin, config = found
        self._last_claim = time.monotonic()
        log.info("claimed: fetching it here", extra={"digest": digest, "size": size, "registry": str(origin)})
        if config and size <= CONFIG_FROM_ORIGIN_MAX:
            async def if_the_registry_fails() -> list[ProviderRecord]:
                return await self.earlier(digest, size, time.time(), [])

            return self.fetcher.start(digest, size, [], origin=origin, more=if_the_registry_fails, origin_first=True)
        fetch: Fetch | None = None
        started: list[float] = []

        async def providers() -> list[ProviderRecord]:
            """Asked first inside the fetch's task: wait for a slot, then begin (announced in
            flight, ordered by this start); asked again as the fetch goes on: the lookup alone."""
            announced: list[asyncio.Future] = []
            if not started:
                assert fetch is not None
                await self._after_the_claims(fetch)
                t0 = time.monotonic()
                await self._claim_slots.acquire()
                TIMELINE.waited("claim_slot", time.monotonic() - t0, digest)
                assert fetch is not None and fetch.task is not None
                fetch.task.add_done_callback(lambda _task: self._claim_slots.release())
                started.append(time.time())
                if digest not in self._relaying:
                    announced.append(self._relay(fetch, started[0]))
            return await self.earlier(digest, size, started[0], announced, waited_on=bool(announced))

        fetch = self.fetcher.start(digest, size, [], origin=origin, more=providers)
        return fetch

    async def _after_the_claims(self, fetch: Fetch) -> None:
        """Return once claims stopped coming (`CLAIM_QUIET`), `CLAIM_HOLD` passed, or a reader
        waits on `fetch`'s bytes (`Fetch.wanted`): a burst of `Info` calls is answered first."""
        t0 = time.monotonic()
        while not fetch.wanted.is_set():
            left = min(self._last_claim + CLAIM_QUIET, t0 + CLAIM_HOLD) - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fetch.wanted.wait(), left)
        TIMELINE.waited("claim_burst", time.monotonic() - t0, fetch.digest)

    async def earlier(self, digest: str, size: int, started: float, announced: list[asyncio.Future],
                      waited_on: bool = True) -> list[ProviderRecord]:
        """Holders and in-flight providers that began before `started`, if one of them can
        deliver; [] otherwise.  Our own in-flight announce (`announced`) is finished first, or
        given `ANNOUNCE_WAIT` (a dead contact can hold it up to the RPC timeout): of two nodes
        that start together, at least the later one then sees the earlier one's record.  The
        timeline gets its waits unless nothing waits on it (`waited_on`: a lookup in the
        background for more providers)."""
        def report(reason: str, since: float) -> float:
            """The wait since `since` to the timeline; the time it ended, for the next."""
            now = time.monotonic()
            if waited_on:
                TIMELINE.waited(reason, now - since, digest)
            return now

        t0 = time.monotonic()
        if announced:
            await asyncio.wait(announced, timeout=ANNOUNCE_WAIT)
            t0 = report("announce", t0)
        try:
            found = await self.dht.find_providers(digest, round_timeout=LOOKUP_ROUND, within=LOOKUP_WITHIN,
                                                  majority=True)
        except Exception as exc:  # a failing DHT: as if alone
            log.warning("in-flight lookup failed", extra={"digest": digest, "error": repr(exc)})
            return []
        finally:
            t0 = report("lookup", t0)
        earlier = [r for r in found if may_follow(r, size, started, self.dht.node_id)]
        chain = nearest(earlier)
        try:
            if chain and await self.fetcher.reachable(digest, chain, within=FOLLOW_PROBE):
                return chain
            others = [r for r in earlier if r not in chain]
            if others and await self.fetcher.reachable(digest, others, within=FOLLOW_PROBE):
                return others  # the nearest did not answer: any earlier one rather than the registry
            return []
        finally:
            report("probe", t0)

    async def replicate(self, digest: str, size: int = 0) -> Fetch | None:
        """Fetch `digest` for the cluster (`placement`: the replication floor, preheat) rather
        than for containerd: from peers, or, with its `size` known, from the registry it came
        from when no peer has it.  Returns the fetch once committed here and still unasked for by
        this node's containerd; if containerd asked meanwhile, the copy is containerd's (None)."""
        if digest in self.fetcher.inflight:
            return None
        self._for_cluster.add(digest)
        try:
            fetch = await self.locate(digest)
            if fetch is None and size and digest not in self.fetcher.inflight:
                fetch = self.fetcher.start(digest, size, [])  # no peer: the registry (`Fetcher.origin`)
                self._relay(fetch, time.time())
            if fetch is None or fetch.task is None:
                return None
            await asyncio.wait([fetch.task])
            return fetch if fetch.committed and digest in self._for_cluster else None
        finally:
            self._for_cluster.discard(digest)

    async def _deliverable(self, digest: str, eligible: Callable[[ProviderRecord], bool]
                           ) -> tuple[list[ProviderRecord], list[ProviderRecord]]:
        """The `eligible` providers found, and those of them that can deliver the blob.

        The blob is claimed only if a provider can deliver it: a provider the DHT names may be
        dead, or fail TLS or membership checks, and a claim containerd believed becomes a
        failed pull if nothing can be delivered.  Providers are checked as the lookup meets
        them (the common case costs one lookup and one HEAD on a warm connection); only if
        they fail does the same walk go on for others.
        """
        t0 = time.monotonic()
        providers: list[ProviderRecord] = []
        # The first providers' check may take the lookup's whole time (a dead host does not
        # refuse, it times out): the walk then gets a moment more for others.
        limit = self.lookup_timeout + MIN_PROBE_TIME
        lookup = self.dht.providers_as_found(digest, within=limit)
        async with contextlib.aclosing(lookup) as batches:
            async for batch in batches:
                new = [p for p in batch if p not in providers and eligible(p)]
                if not new:
                    continue
                providers += new
                # Providers that disagree on the size cannot all be right: follow the majority.
                size = collections.Counter(p.size for p in providers).most_common(1)[0][0]
                left = max(MIN_PROBE_TIME, self.lookup_timeout - (time.monotonic() - t0))
                reachable = await self.fetcher.reachable(digest, [p for p in new if p.size == size], within=left)
                if reachable:
                    return providers, reachable
                if time.monotonic() - t0 >= limit:
                    break
        if providers:
            log.info("no provider reachable", extra={"digest": digest, "providers": [p.addr for p in providers]})
        return providers, []

    def _relay(self, fetch: Fetch, started: float) -> asyncio.Future:
        """Announce this fetch as an in-flight provider, so that nodes asking later fetch
        from us too (the peer server relays its pieces) rather than all from the first
        provider; withdrawn if the fetch fails, replaced by the holder record if it commits.
        Only providers that started earlier are followed (`_earlier_only`), so no two nodes
        wait on each other's pieces.  Returns a future done once other nodes' lookups find
        the record (`DhtNode.fetching`)."""
        digest = fetch.digest
        self._relaying.add(digest)
        announce, stored = self.dht.fetching(digest, fetch.size, started)

        def ended(_task: asyncio.Task) -> None:
            self._relaying.discard(digest)
            if not announce.done():
                announce.cancel()  # a record stored after the withdraw below would outlive the fetch
            if not fetch.committed and digest not in self.dht.held:
                self.dht.deleted(digest)

        assert fetch.task is not None
        fetch.task.add_done_callback(ended)
        return stored

    def share(self, digest: str, size: int, started: float) -> "SharedIngest":
        """Announce an ingest of `digest` that is starting now (see the module docstring)."""
        return SharedIngest(self, digest, size, started)


class SharedIngest:
    def __init__(self, source: PeerSource, digest: str, size: int, started: float) -> None:
        self.source = source
        self.digest = digest
        self.size = size
        self.started = started
        self.decided = False
        self._ended = False
        self._announce, self._stored = source.dht.fetching(digest, size, started)
        source._downloading[digest] = started

    async def sources(self) -> list[ProviderRecord]:
        """Providers to follow instead of downloading; [] means this node is the source.

        Our own announce is finished first (or given `ANNOUNCE_WAIT`; a dead contact can
        hold it up to the RPC timeout): of two nodes that start together, at least the later
        one then sees the earlier one's record.
        """
        self.decided = True
        if self.source.fetcher.recently_failed(self.digest):
            return []
        # none that can deliver: containerd downloads it
        return await self.source.earlier(self.digest, self.size, self.started, [self._stored])

    async def follow(self, providers: list[ProviderRecord]) -> bool:
        """Fetch the blob from `providers` (and any found later); True once it is committed
        here.  Our in-flight record stays: the peer server relays the pieces of this fetch to
        nodes that started after us, so the earliest node's link is not the only source."""
        fetcher, dht = self.source.fetcher, self.source.dht
        fetch = fetcher.start(self.digest, self.size, providers,
                              more=lambda: self._more(dht.find_providers(self.digest)))
        assert fetch.task is not None
        fetch.wanted.set()  # containerd's writer waits on it
        await asyncio.wait([fetch.task])  # not cancelled with this call: others may share it
        return fetch.committed

    async def _more(self, lookup) -> list[ProviderRecord]:
        return await _earlier_only(lookup, self.size, self.started, self.source.dht.node_id,
                                   self.source.fetcher.inflight.get(self.digest))

    def end(self, committed: bool) -> None:
        """The ingest is over (or will not be written here): withdraw the in-flight record,
        unless the blob was committed, whose announce replaces it."""
        if self._ended:
            return
        self._ended = True
        if not self._announce.done():
            self._announce.cancel()
        if self.source._downloading.get(self.digest) == self.started:
            del self.source._downloading[self.digest]
        dht = self.source.dht
        if not committed and self.digest not in dht.held:
            dht.deleted(self.digest)
