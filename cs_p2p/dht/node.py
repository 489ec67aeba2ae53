"""A DHT node: announce, withdraw and look up the providers of a digest.

Built on `kademlia`'s routing, crawling and UDP transport; provider records travel through
the RPCs of `protocol.ProviderProtocol`.  Lookups merge the records of every node they ask
instead of stopping at the first answer (kademlia's `get` returns the first value it meets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from typing import AsyncIterator, Callable

from kademlia.crawling import NodeSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node, NodeHeap

from .. import metrics
from ..auth import Sealer
from ..addresses import dual_stack_socket, is_unspecified, join_host_port, unmapped
from ..config import parse_host_port
from ..identity import KeySealer
from ..purges import MAX_DIGESTS, PURGE_KEY, PurgeList, PurgeRecord
from .protocol import ProviderProtocol
from .providers import ProviderRecord, provider_key
from .tags import TagRecord, tag_key

log = logging.getLogger("cs_p2p.dht")

DEFAULT_TTL = 3600.0
PURGE_SYNC_INTERVAL = 15.0  # seconds between pulls of the purges a few contacts know
PURGE_FANOUT = 8  # contacts a node hands a purge it just learnt to (its issuer tells every contact)


def load_or_create_node_id(root: str) -> bytes:
    """A node keeps its id across restarts, so its records and routing entries stay valid."""
    path = os.path.join(root, "dht", "node_id")
    try:
        with open(path) as f:
            node_id = bytes.fromhex(f.read().strip())
        if len(node_id) == 20:
            return node_id
    except (FileNotFoundError, ValueError):
        pass
    node_id = os.urandom(20)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(node_id.hex())
    os.replace(tmp, path)
    return node_id


class _KademliaServer(Server):
    protocol_class = ProviderProtocol

    def __init__(self, ksize: int, alpha: int, node_id: bytes, wait_timeout: float, sealer: Sealer | KeySealer | None,
                 client: bool) -> None:
        super().__init__(ksize=ksize, alpha=alpha, node_id=node_id)
        self._wait_timeout = wait_timeout
        self._sealer = sealer
        self._client = client

    def _create_protocol(self) -> ProviderProtocol:
        return ProviderProtocol(self.node, self.storage, self.ksize, self._wait_timeout, self._sealer, self._client)

    async def listen(self, port: int, interface: str = "0.0.0.0") -> None:
        """As kademlia's, except that `::` takes IPv4 too (one dual-stack socket)."""
        loop = asyncio.get_running_loop()
        if ":" in interface and is_unspecified(interface):
            endpoint = loop.create_datagram_endpoint(self._create_protocol,
                                                     sock=dual_stack_socket(socket.SOCK_DGRAM, port))
        else:
            endpoint = loop.create_datagram_endpoint(self._create_protocol, local_addr=(interface, port))
        self.transport, self.protocol = await endpoint
        self.refresh_table()


class DhtNode:
    def __init__(self, node_id: bytes, peer_addr: str, ttl: float = DEFAULT_TTL, ksize: int = 20, alpha: int = 3,
                 rpc_timeout: float = 1.0, sealer: Sealer | KeySealer | None = None, client: bool = False) -> None:
        """`client`: ask the network, never answer it (operator commands); such a node never
        becomes a contact in another node's routing table."""
        self.node_id = node_id
        # Whose records and contacts a lookup leaves out: this node's own.  A client has none:
        # in key-pair mode it speaks with a node's key, hence that node's id, and must still
        # see that node's records and talk to it.
        self._self_id = None if client else node_id
        self.peer_addr = peer_addr
        self.ttl = ttl
        self.server = _KademliaServer(ksize, alpha, node_id, rpc_timeout, sealer, client)
        self.held: dict[str, int] = {}  # digest -> size, re-announced before expiry
        self.cached: set[str] = set()  # of those, the ones in the cache (announced as such)
        self._republisher: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.purges: PurgeList | None = None
        self.alone = ""  # why this node's DHT has found no other node, while it has not (`keep_joined`)

    def keep_purges(self, purges: PurgeList) -> None:
        """Take part in purges (`purges`): forget what `purges` names, learn and hand on new ones."""
        self.purges = purges
        self.protocol.purges = purges
        for rec_id in purges.ids():
            self._forget(purges.get(rec_id))
        self.protocol.on_purge = self._learnt
        self._spawn(self._purge_sync_loop(), "purge sync", "*")

    def _learnt(self, rec: PurgeRecord, from_id: bytes) -> None:
        """A purge new to this node, from node `from_id`: applied, and handed to a few contacts."""
        self._forget(rec)
        self._spawn(self._spread(rec, {from_id}, PURGE_FANOUT), "hand on purge", rec.reference or rec.digests[0])

    def _forget(self, rec: PurgeRecord) -> None:
        self.protocol.forget_purged(rec)
        for digest in rec.digests:
            self.held.pop(digest, None)
            self.cached.discard(digest)

    async def purge(self, reference: str, digests: list[str]) -> tuple[list[PurgeRecord], int]:
        """Issue a purge of `digests` (and the tag `reference`, if any): kept here and told to every
        contact, who hand it on.  Returns the records and how many contacts took them."""
        if self.purges is None:
            raise RuntimeError("this node keeps no purges")
        records, reached = [], 0
        for chunk in (digests[i:i + MAX_DIGESTS] for i in range(0, len(digests), MAX_DIGESTS)):
            rec = self.protocol.sign("purge", PURGE_KEY, PurgeRecord(self.node_id, time.time(), reference,
                                                                     tuple(chunk)))
            self.purges.add(rec)  # not `learn_purge`: this node tells every contact itself, below
            self._forget(rec)
            reached = max(reached, await self._spread(rec, set(), 0))
            records.append(rec)
        return records, reached

    async def _spread(self, rec: PurgeRecord, exclude: set[bytes], fanout: int) -> int:
        nodes = [n for n in self.contacts() if n.id not in exclude and n.id != self.node_id]
        if fanout:
            random.shuffle(nodes)
            nodes = nodes[:fanout]
        return sum(await asyncio.gather(*(self.protocol.call_purge(n, rec) for n in nodes)))

    async def sync_purges(self, contacts: int = 3) -> int:
        """Ask a few contacts which purges they know and take the ones this node lacks (a node
        that was down, a datagram lost); returns how many were new."""
        if self.purges is None:
            return 0
        nodes = self.contacts()
        random.shuffle(nodes)
        learnt = 0
        for node in nodes[:contacts]:
            start, total = 0, 1
            while start < total:
                answer = await self.protocol.call_purge_ids(node, start)
                if answer is None:
                    break
                ids, total = answer
                if not ids:
                    break
                start += len(ids)
                for rec_id in ids:
                    if self.purges.get(rec_id) is None:
                        rec = await self.protocol.call_get_purge(node, rec_id)
                        if rec is not None and self.purges.get(rec_id) is None:
                            self.protocol.learn_purge(rec, node.id)
                            learnt += 1
        return learnt

    async def _purge_sync_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_SYNC_INTERVAL)
            try:
                await self.sync_purges()
            except Exception:  # the next round tries again
                log.exception("purge sync failed")

    @property
    def protocol(self) -> ProviderProtocol:
        return self.server.protocol

    async def listen(self, host: str, port: int) -> int:
        await self.server.listen(port, interface=host)
        port = self.server.transport.get_extra_info("sockname")[1]
        self._republisher = asyncio.get_running_loop().create_task(self._republish_loop())
        return port

    def families(self) -> set[int]:
        """The address families this node's socket reaches: IPv4, IPv6, or both (`[::]`)."""
        sock = self.server.transport.get_extra_info("socket") if self.server.transport else None
        if sock is None or sock.family == socket.AF_INET:
            return {socket.AF_INET}
        if sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            return {socket.AF_INET6}
        return {socket.AF_INET, socket.AF_INET6}

    async def _resolve(self, addrs: list[str]) -> set[tuple[str, int]]:
        """Bootstrap contacts as addresses this node's socket can reach (a name may resolve to
        both families; an IPv4 node skips the IPv6 ones and the other way round)."""
        loop = asyncio.get_running_loop()
        families = self.families()
        resolved: set[tuple[str, int]] = set()
        for addr in addrs:
            host, port = parse_host_port(addr, "bootstrap")
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except socket.gaierror as exc:
                log.warning("bootstrap address does not resolve", extra={"addr": addr, "error": str(exc)})
                continue
            reachable = {(unmapped(info[4][0]), info[4][1]) for info in infos if info[0] in families}
            if not reachable and infos:
                log.warning("bootstrap address is of another address family than dht-listen",
                            extra={"addr": addr, "dht_listen_families": sorted(
                                "ipv6" if f == socket.AF_INET6 else "ipv4" for f in families)})
            resolved.update(reachable)
        return resolved

    async def bootstrap(self, addrs: list[str]) -> int:
        """Join through `HOST:PORT` contacts (names resolved, e.g. a headless Service); returns peers met."""
        resolved = await self._resolve(addrs)
        if not resolved:
            return 0
        found = await self.server.bootstrap(sorted(resolved))
        return len(found)

    async def keep_joined(self, addrs: Callable[[], list[str]], interval: float = 5.0,
                          sparse_interval: float = 60.0, alone_after: float = 30.0) -> None:
        """Bootstrap again until a bootstrap contact is in the routing table (contacts may start
        after us, and passing clients fill the table without joining us to the cluster), then
        now and then while the table holds fewer than k nodes.  `addrs` is asked each time: the
        contacts may be a file the installer rewrites as the cluster changes.

        A node that meets nobody says so (`alone`: a warning, `cs-p2p status`, the metric
        `cs_p2p_dht_alone`) instead of quietly sending every pull to the registry: at once when
        no bootstrap contact answered, after `alone_after` seconds when it has none to ask."""
        started = time.monotonic()
        while True:
            contacts = self.protocol.router.find_neighbors(Node(self.node_id), self.server.ksize)
            known = {(n.ip, n.port) for n in contacts}
            configured = addrs()
            resolved = await self._resolve(configured)
            joined = bool(known & resolved)
            if not joined or len(contacts) < self.server.ksize:
                met = await self.server.bootstrap(sorted(resolved)) if resolved else []
                if met and not joined:
                    await self.refresh_buckets()
                    log.info("dht joined", extra={"peers": len(met)})
                    await self.sync_purges()
                    for digest, size in list(self.held.items()):
                        await self.announce(digest, size)
                    joined = True
            self._check_alone(configured, resolved, time.monotonic() - started >= alone_after)
            await asyncio.sleep(sparse_interval if joined else interval)

    def _check_alone(self, configured: list[str], resolved: set[tuple[str, int]], waited: bool) -> None:
        if self.contacts():
            if self.alone:
                log.info("dht no longer alone", extra={"peers": len(self.contacts())})
            self.alone = ""
            return
        if configured and not resolved:
            why = (f"no bootstrap contact resolves to an address dht-listen can reach ({', '.join(configured)}; "
                   f"dht-listen {self._listening()})")
        elif configured:
            why = f"no bootstrap contact answered ({', '.join(join_host_port(*a) for a in sorted(resolved))})"
        elif waited:
            why = "no bootstrap contact is configured and no other node has joined this one"
        else:
            return
        if why != self.alone:
            log.warning("dht alone: every pull goes to the registry", extra={"reason": why})
        self.alone = why

    def _listening(self) -> str:
        sock = self.server.transport.get_extra_info("sockname") if self.server.transport else None
        return join_host_port(sock[0], sock[1]) if sock else "?"

    def contacts(self) -> list[Node]:
        """Every node in the routing table."""
        return [n for bucket in self.protocol.router.buckets for n in bucket.get_nodes()]

    async def refresh_buckets(self) -> int:
        """After joining: a node lookup for a random id in every bucket's range, as Kademlia's
        join prescribes, so that the table knows nodes all over the id space and not only
        near this node's id.  Without it, a node that joined through a newcomer looked up far
        keys among newcomers only, and found nothing (`hack/bench-sim`, under churn)."""
        ids = [random.randint(*bucket.range).to_bytes(20, "big") for bucket in self.protocol.router.buckets]
        found = await asyncio.gather(*(self._closest(node_id) for node_id in ids))
        return sum(len(nodes) for nodes in found)

    def stop(self) -> None:
        if self._republisher:
            self._republisher.cancel()
        for task in list(self._background):
            task.cancel()
        if self.server.protocol is not None:
            self.server.protocol.stop_verifying()
        self.server.stop()

    def _record(self, size: int, started: float = 0.0, cached: bool = False) -> ProviderRecord:
        return ProviderRecord(self.node_id, self.peer_addr, size, time.time() + self.ttl, started, cached=cached)

    async def _closest(self, key: bytes) -> list[Node]:
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        if not nearest:
            return []
        return await NodeSpiderCrawl(self.protocol, target, nearest, self.server.ksize, self.server.alpha).find()

    async def announce(self, digest: str, size: int, started: float = 0.0,
                       stored: asyncio.Future | None = None) -> int:
        """Publish this node as a provider of `digest`; returns how many nodes stored it.

        With `started`, as an in-flight provider (see `providers`): such a record is not
        re-announced, and the commit's announce replaces it.  `stored` is done once lookups
        by other nodes will find the record (`_stored_early`), or when the announce ends.
        """
        try:
            if self.purges is not None and self.purges.purged(digest):
                self.held.pop(digest, None)
                return 0  # purged: never shared again
            if not started:
                self.held[digest] = size
            key = provider_key(digest)
            rec = self.protocol.sign("provider", key,
                                     self._record(size, started, not started and digest in self.cached))
            self.protocol.providers.add(key, rec)
            self.protocol.watch(key, digest)
            early = await self._stored_early(key, rec, digest, stored) if stored is not None else {}
            nodes = [n for n in await self._closest(key) if n.id not in early]
            results = await asyncio.gather(*(self.protocol.call_add_provider(n, key, rec, digest) for n in nodes))
            return sum(early.values()) + sum(results)
        finally:
            if stored is not None and not stored.done():
                stored.set_result(None)

    async def _stored_early(self, key: bytes, rec: ProviderRecord, digest: str,
                            stored: asyncio.Future) -> dict[bytes, bool]:
        """Store `rec` at every node this one knows if they are fewer than k, before the walk
        to the key's k closest; `stored` is done once more than half of them have it.  Another
        node's lookup asks every node it knows (a small cluster: all of them) until more than
        half have answered (`_walk`), so it meets the record after one round trip instead of
        the walk's several rounds (under a rollout's load each waited on busy nodes: over 1 s,
        and a claimed fetch waits for its announce before its own lookup), and neither waits
        for the slowest node.  With k or more known, the k closest may be nodes this one does
        not know: only the walk finds them.  Returns node -> whether it stored the record."""
        known = self.protocol.router.find_neighbors(Node(key))
        if len(known) >= self.server.ksize:
            return {}
        calls = {asyncio.ensure_future(self.protocol.call_add_provider(n, key, rec, digest)): n.id for n in known}
        acks = 0
        try:
            for call in asyncio.as_completed(calls):
                acks += await call
                if acks * 2 > len(known) and not stored.done():
                    stored.set_result(None)
        finally:
            for call in calls:
                call.cancel()
        return {node: call.result() for call, node in calls.items()}

    async def withdraw(self, digest: str) -> int:
        """Stop providing `digest` (deleted locally): remove our record where it was stored."""
        self.held.pop(digest, None)
        key = provider_key(digest)
        self.protocol.providers.remove(key, self.node_id)
        nodes = await self._closest(key)
        results = await asyncio.gather(*(self.protocol.call_remove_provider(n, key) for n in nodes))
        return sum(results)

    async def find_providers(self, digest: str, want: int = 0, round_timeout: float = 0.3,
                             within: float | None = None, majority: bool = False) -> list[ProviderRecord]:
        """Providers of `digest` other than this node, freshest first.

        Walks towards the key like a node lookup (`providers_as_found`) and merges every
        record it is given; stops when the k closest have answered or, with `want`, once that
        many providers are known.  With `within`, the walk stops after that many seconds and
        returns what it found so far.  `majority`: see `_walk`.
        """
        found: dict[bytes, ProviderRecord] = {}
        async with contextlib.aclosing(self.providers_as_found(digest, round_timeout, within, majority)) as batches:
            async for batch in batches:
                found.update((r.node_id, r) for r in batch)
                if want and len(found) >= want:
                    break
        return sorted(found.values(), key=lambda r: -r.expires)

    async def providers_as_found(self, digest: str, round_timeout: float = 0.3, within: float | None = None,
                                 majority: bool = False) -> AsyncIterator[list[ProviderRecord]]:
        """The providers of `digest` other than this node, in batches as the walk meets them
        (this node's own records first; a publisher again only with a fresher record).

        A caller that checks providers as they come (`Info` wants one that can deliver) stops
        at the first good one, and one whose first providers are dead goes on with the same
        walk instead of starting another: a second walk waited for every dead contact among
        the k closest nodes to time out, which under churn was nearly every walk
        (`hack/bench-sim`: lookup p99 611 ms at 1,000 nodes with 10 % replaced a minute).
        A round waits at most `round_timeout` for its replies: a dead contact must not stall
        a lookup that `Info` is waiting on (late replies still update the routing table).
        """
        if self.purges is not None and self.purges.purged(digest):
            return
        key = provider_key(digest)
        seen: dict[bytes, float] = {}  # publisher -> the expiry of its record given so far
        result = "not_found"
        t0 = time.monotonic()
        walk = self._walk(key, self.protocol.providers.get(key), self.protocol.call_get_providers, round_timeout,
                          within, majority)
        try:
            async with contextlib.aclosing(walk) as replies:  # closed with this one, not when collected
                async for records in replies:
                    now = time.time()
                    batch = {r.node_id: r for r in records if r.node_id != self._self_id and r.expires > now
                             and r.expires > seen.get(r.node_id, 0.0)}
                    if batch:
                        seen.update((nid, r.expires) for nid, r in batch.items())
                        result = "found"
                        yield list(batch.values())
        finally:
            metrics.DHT_LOOKUPS.labels(result=result).observe(time.monotonic() - t0)

    async def _walk(self, key: bytes, local: list, call, round_timeout: float,
                    within: float | None = None, majority: bool = False) -> AsyncIterator[list]:
        """The records under `key` of the nodes on the way to it, a reply at a time
        (`local` first).

        `alpha` requests are in flight at once, and each reply sends the next request at once
        (not a round at a time): one lost datagram or dead contact costs its own request's
        `round_timeout`, after which it no longer holds back the walk, instead of stalling
        every other request of its round (in a simulated 50-node cluster with 0.5 % loss and
        churn, `hack/bench-sim`: lookup p99 300 ms before, 8 ms after).  Late replies still
        count while the walk goes on.  The wait is `round_timeout` at most, less once replies
        have been seen (`rtt`).

        A node that knows fewer than k others (a cluster of fewer than k nodes) asks them all
        at once: the walk would ask every one of them anyway, as they are all among the k
        closest, and `alpha` at a time took several round trips (sixteen nodes in a rollout:
        1.3 s per lookup, with every node busy).  With `majority` and a deadline (`within`) it
        then ends only once more than half of them have answered, however late, or at the
        deadline: an in-flight record counts as stored once more than half of the nodes have
        it (`_stored_early`), and two majorities of one set of nodes share a node, so a node
        that starts after another's record was stored finds it."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        if local:
            yield list(local)
        target = Node(key)
        shortlist = NodeHeap(target, self.server.ksize)
        # More than k contacts: the ones a walk gives up on leave the shortlist, and the next
        # closest take their places (a node whose table near the key was all dead found nothing).
        known = self.protocol.router.find_neighbors(target, 3 * self.server.ksize)
        shortlist.push(known)
        small = len(known) < self.server.ksize
        width = max(self.server.alpha, len(known)) if small else self.server.alpha
        pending: dict[asyncio.Future, tuple[Node, float]] = {}  # call -> (node, when sent)
        given_up: set[bytes] = set()
        answered = 0
        try:
            while True:
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                patience = self.protocol.round_trip.wait(round_timeout)
                late = [n.id for n, t in pending.values() if now - t >= patience and n.id not in given_up]
                if late:  # no longer among the closest the walk waits for; a late reply still counts
                    given_up.update(late)
                    shortlist.remove(late)
                fresh = [t for _, t in pending.values() if now - t < patience]
                for n in shortlist.get_uncontacted()[: max(0, width - len(fresh))]:
                    shortlist.mark_contacted(n)
                    pending[asyncio.ensure_future(call(n, key))] = (n, now)
                    fresh.append(now)
                if fresh:
                    wait = patience - (now - min(fresh))
                elif majority and small and deadline is not None and pending and answered * 2 <= len(known):
                    wait = deadline - now  # late replies still make the majority
                else:
                    break  # nobody left to ask, and what is still out has had its time
                if deadline is not None:
                    wait = min(wait, deadline - now)
                # At least a millisecond: a wait rounded to nothing would spin without time passing.
                done, _ = await asyncio.wait(pending, timeout=max(wait, 1e-3), return_when=asyncio.FIRST_COMPLETED)
                for c in done:
                    node, sent = pending.pop(c)
                    reply = c.result()
                    if reply is None:
                        shortlist.remove([node.id])
                        continue
                    self.protocol.round_trip.observe(loop.time() - sent)
                    answered += 1
                    records, nodes = reply
                    shortlist.push([m for m in nodes if m.id != self._self_id])
                    if records:
                        yield records
        finally:
            for c in pending:  # late replies still update the routing table, in the background
                c.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)

    async def publish_tag(self, reference: str, digest: str, media_type: str, size: int, public: bool = False) -> int:
        """Record that `reference` (`host/name:tag`, or `host/name@digest`) resolved to `digest`
        just now; `public`: for a request without credentials."""
        key = tag_key(reference)
        rec = self.protocol.sign("tag", key, TagRecord(self.node_id, digest, media_type, size, time.time(),
                                                       public=public))
        self.protocol.tags.add(key, rec)
        nodes = await self._closest(key)
        return sum(await asyncio.gather(*(self.protocol.call_add_tag(n, key, rec) for n in nodes)))

    async def find_tag(self, reference: str, round_timeout: float = 0.3) -> TagRecord | None:
        """The newest record of `reference` any node holds, or None."""
        return max(await self.tag_records(reference, round_timeout), key=lambda r: r.seen, default=None)

    async def tag_records(self, reference: str, round_timeout: float = 0.3) -> list[TagRecord]:
        """The newest record of `reference` from each publisher the walk meets.  Records of a
        purged tag from before its purge, and records naming a purged digest, do not count."""
        key = tag_key(reference)
        found: dict[bytes, TagRecord] = {}
        purged_at = self.purges.reference_purged_at(reference) if self.purges is not None else None
        async with contextlib.aclosing(self._walk(key, self.protocol.tags.get(key), self.protocol.call_get_tags,
                                                  round_timeout)) as replies:
            async for records in replies:
                for rec in records:
                    if self.purges is not None and (self.purges.purged(rec.digest)
                                                    or (purged_at is not None and rec.seen <= purged_at)):
                        continue
                    if rec.node_id not in found or rec.seen > found[rec.node_id].seen:
                        found[rec.node_id] = rec
        return list(found.values())

    # ContentEvents: the content service reports commits and deletes; the network work runs
    # in the background so that no containerd call waits on the DHT.
    def committed(self, digest: str, size: int) -> None:
        self.held[digest] = size  # at once: an in-flight record's end must not withdraw it
        self.cached.discard(digest)
        self._spawn(self.announce(digest, size), "announce", digest)

    def kept(self, digest: str) -> None:
        """A held blob moved into the cache (containerd let go of it): still announced, as cached."""
        size = self.held.get(digest)
        if size is not None:
            self.cached.add(digest)
            self._spawn(self.announce(digest, size), "announce cached", digest)

    def fetching(self, digest: str, size: int, started: float) -> tuple[asyncio.Task, asyncio.Future]:
        """A fetch or download began here: announce it in flight (its pieces are relayed).
        The announce's task, and a future done once other nodes' lookups find the record
        (`announce`'s `stored`)."""
        stored = asyncio.get_running_loop().create_future()
        return self._spawn(self.announce(digest, size, started=started, stored=stored), "announce in-flight",
                           digest), stored

    def deleted(self, digest: str) -> None:
        self.cached.discard(digest)
        self._spawn(self.withdraw(digest), "withdraw", digest)

    def _spawn(self, coro, what: str, digest: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def done(t: asyncio.Task) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning(f"{what} failed", extra={"digest": digest, "error": repr(t.exception())})

        task.add_done_callback(done)
        return task

    def join_and_announce(self, bootstrap: Callable[[], list[str]], held: list[tuple[str, int]],
                          cached: list[str] = ()) -> None:
        """Start-up, in the background: keep joined through the contacts `bootstrap` returns and
        announce what the node already holds (re-announced on every (re)join and at half the
        record lifetime)."""
        self.held.update(held)
        self.cached.update(cached)
        self._spawn(self.keep_joined(bootstrap), "join", "*")
        self._spawn(self.announce_all(held), "announce held blobs", "*")

    async def announce_all(self, blobs: list[tuple[str, int]]) -> None:
        """Start-up: announce what the node already holds."""
        for digest, size in blobs:
            await self.announce(digest, size)
        log.info("announced held blobs", extra={"count": len(blobs)})

    async def _republish_loop(self) -> None:
        """Re-announce every held blob at half the record lifetime, before records expire."""
        while True:
            await asyncio.sleep(self.ttl / 2)
            for digest, size in list(self.held.items()):
                try:
                    await self.announce(digest, size)
                except Exception:  # one failed announce must not stop the loop
                    log.exception("re-announce failed", extra={"digest": digest})
