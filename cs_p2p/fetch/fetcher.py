"""Multi-source fetch of a blob from peers, readable while it arrives.

A blob is cut into pieces; workers take pieces and download them with HTTP Range requests
from the providers in turn, so several peers serve one blob at once.  A piece that fails is
put back and tried at another provider; a provider that fails repeatedly is dropped for this
fetch.  Bytes are hashed in order as the prefix of whole pieces grows (`PrefixHash`), and
the digest is verified before the file is committed into the store (fsync + rename) and
announced.  `wait_range` lets `Read` stream bytes as soon as their piece is on disk.

A node still fetching a blob relays it (the peer server, `wait_landed`): each byte as it
lands, so a chain of nodes that started together forwards at the speed of its first link.
Its responses say which pieces it has whole and which are arriving (`PIECES_HEADER`), and a
follower asks for those first (`_next_piece`), with a few requests waiting there at once.

Concurrent requests for one digest share one fetch.

A peer problem must not fail a pull.  A piece slower than `min_rate` counts as a failure (a
stalled provider is dropped like a dead one).  When no provider is left, or the bytes do not
verify and no other peer can tell which were wrong, the fetch is finished from the registry
the blob came from (`origin`, known to the mirror; `fetch.origin`), through the mirror's
client and credentials, and verified like any other.  Only without a known origin does the
fetch fail; it is then remembered for a while (`negative_ttl`) so that containerd's retry
gets NOT_FOUND at once and uses the registry itself.

Pieces are streamed to readers as they land, before the blob is verified; `Read` takes only
those of providers whose pieces have made a blob verify before (`proven`) or of the registry,
and waits for the verification otherwise, so a new liar's bytes never reach containerd.  The
applier takes every piece at once, and applies the layer again from the verified file if
any piece was replaced (`repaired`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import ssl
import time
from typing import Awaitable, Callable, Protocol

import aiohttp

from .. import metrics
from ..addresses import family_of
from ..auth import HEADER, Sealer
from ..digests import parse_digest
from ..dht.providers import ProviderRecord
from ..proofs import SIG_HEADER, Challenge
from ..store import LocalStore
from ..store.blobs import sha256_of_fd
from ..timeline import TIMELINE
from .pieces import PIECE, PIECES_HEADER, Fetch, FetchFailed, Origin, PrefixHash, pieces_of
from .turns import RegistryTurns


class Ledger(Protocol):
    """What the fetcher tells the node's fair-sharing ledger (`peer.ledger`) of each peer."""

    def received(self, host: str, n: int) -> None: ...

    def refused(self, host: str) -> None: ...


log = logging.getLogger("cs_p2p.fetch")

MAX_WORKERS = 8
WORKERS_PER_HOLDER = 2
WORKERS_PER_RELAY = 4
FAILURES_BEFORE_DROP = 2
# With every provider dropped, the lookup is asked again this many times, after these pauses,
# before the fetch fails: a relay in a chain may have lost its own source (its fetch failed
# and its record was withdrawn, or not yet everywhere), while the node that downloads the blob
# from the registry still has it, or holds it by now.  Only for a fetch `Info` answered for
# (`Fetch.only_way`) with no registry to fall back on: that fetch is the pull.  A follower's
# fetch has containerd's own download behind it, which is quicker than looking again.
RELOOK_PAUSES = (0.2, 1.0, 3.0)
BUSY_BEFORE_FAILURE = 100  # 503s in a row from one provider that count as one failure
# A provider that stalls (no byte for `timeout` seconds) or trickles (a piece slower than
# MIN_RATE; low enough for a provider with a rate limit shared by a few uploads) has failed it.
# An in-flight provider (a relay) sends a piece only as it gets it itself: it may be silent for
# a while without being at fault, so it gets RELAY_IDLE instead and no strike towards a ban.
MIN_RATE = 256 << 10  # bytes per second
STALL_GRACE = 2.0  # seconds every piece gets on top of its size at MIN_RATE
RELAY_IDLE = 30.0  # seconds without a byte from a relay
ORIGIN = "registry"  # the upstream registry among a fetch's sources
PROBE_TIMEOUT = 0.5  # seconds for a HEAD of a blob at a provider, at least
HEALTH_TTL = 10.0  # seconds a provider that answered counts as reachable without a new HEAD
PROBE_FAILURES_BEFORE_BAN = 3
MAX_REMEMBERED = 4096  # providers remembered as proven, reachable or failing
RECENT = 20  # fetches and bans `cs-p2p status` shows


REGISTRY_SPAN = 16 << 20  # bytes a request to the registry asks for, at least
REGISTRY_STREAMS = 4  # requests to the registry at once for one blob
REGISTRY_RETRIES = 3  # times a broken-off registry response is resumed
REGISTRY_CONNECTIONS = 8  # registry responses streaming at once, all blobs together


def registry_spans(pieces: list[int], size: int, streams: int = REGISTRY_STREAMS) -> list[tuple[int, int]]:
    """`pieces` as (first, last) runs of consecutive pieces, long runs cut so that up to
    `streams` requests of at least `REGISTRY_SPAN` bytes share the blob."""
    runs: list[list[int]] = []
    for p in sorted(pieces):
        if runs and runs[-1][1] == p - 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    total = sum(b - a + 1 for a, b in runs)
    per = max(REGISTRY_SPAN // PIECE, -(-total // max(1, streams)))  # pieces per request
    spans: list[tuple[int, int]] = []
    for a, b in runs:
        while a <= b:
            spans.append((a, min(b, a + per - 1)))
            a += per
    return spans


def _next_piece(todo: list[int], whole: int, arriving: int) -> int:
    """The index in `todo` of the piece to ask a provider for: the first one it was last
    known to have whole, else one arriving there (its bytes are forwarded as they land), else
    the first.  A relay fills its pieces in the order its own sources send them (a registry
    sends a blob as a few ranges at once, a relay's follower takes what it has first): asking
    in that order keeps a follower as far along as the node it follows, where asking in
    order left it waiting on pieces the relay had not begun."""
    for known in (whole, arriving):
        if known:
            for i, p in enumerate(todo):
                if known >> p & 1:
                    return i
    return 0


class NoPeers(FetchFailed):
    """A fetch started with no provider: one for the cluster (`placement`), straight to the registry."""

    def __init__(self) -> None:
        super().__init__("no peer holds it")


class ProviderBusy(Exception):
    """503: all upload slots taken.  Not the provider's fault; try again a little later."""


def _host(addr: str) -> str:
    """The host of a provider's `host:port` or `[v6]:port` (the ledger's key: the address the
    peer's own server sees us by, `peer.server._remote`)."""
    return addr.rsplit(":", 1)[0].strip("[]")

class Fetcher:
    def __init__(self, store: LocalStore, on_committed: Callable[[str, int], None] | None = None,
                 negative_ttl: float = 60.0, timeout: float = 10.0, sealer: Sealer | None = None,
                 tls: ssl.SSLContext | None = None, min_rate: int = MIN_RATE,
                 origin: Callable[[str], Origin | None] | None = None, ledger: Ledger | None = None,
                 local_host: str = "") -> None:
        self.store = store
        self.ledger = ledger  # bytes received from each peer, and its refusals (fair sharing)
        self.local_host = local_host  # connect from the address this node announces: peers account by it
        self.speed: dict[str, float] = {}  # provider -> bytes/s of its recent pieces
        self.sealer = sealer  # signs piece requests when the cluster has a token
        self.tls = tls  # peers talk TLS (mutual: this node presents its certificate too)
        self.on_committed = on_committed
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self.dir = os.path.join(store.root, "fetch")
        os.makedirs(self.dir, exist_ok=True)
        for name in os.listdir(self.dir):  # partial fetches of a previous run are not resumable
            os.unlink(os.path.join(self.dir, name))
        self.inflight: dict[str, Fetch] = {}
        self.failed: dict[str, tuple[float, str]] = {}  # digest -> until when it is not retried, why
        self.banned: dict[str, float] = {}  # provider addr -> until when it is not used
        self.recent: collections.deque[dict] = collections.deque(maxlen=RECENT)  # fetches ended (`cs-p2p status`)
        self.recent_bans: collections.deque[dict] = collections.deque(maxlen=RECENT)
        self.ban_seconds = 600.0
        self.min_rate = min_rate
        self.origin = origin  # digest -> the registry it came from, if known (the mirror knows)
        self.proven: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._reachable_until: dict[str, float] = {}  # provider -> until when a HEAD is skipped
        self._probe_failures: dict[str, int] = {}
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._registry_streams = asyncio.Semaphore(REGISTRY_CONNECTIONS)  # responses from registries at once
        self._turns = RegistryTurns()  # the blobs a reader waits on are read from the registry first

    def _client(self, addr: str = "") -> aiohttp.ClientSession:
        """One session for every fetch and probe: connections to peers stay open (keep-alive),
        so a lookup rarely pays a TCP and TLS handshake.  Connections leave from `local_host`
        where the peer is of its address family (another session for the rest)."""
        bind = bool(self.local_host) and family_of(_host(addr)) in (None, family_of(self.local_host))
        session = self._sessions.get(bind)
        if session is None:
            session = self._sessions[bind] = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout),
                connector=aiohttp.TCPConnector(ssl=self.tls if self.tls else False, keepalive_timeout=60,
                                               local_addr=(self.local_host, 0) if bind else None))
        return session

    def _trusted(self, addr: str) -> bool:
        return addr == ORIGIN or addr in self.proven

    def _remember(self, table: dict, addr: str, value) -> None:
        table.pop(addr, None)
        table[addr] = value
        while len(table) > MAX_REMEMBERED:
            del table[next(iter(table))]

    def _ban(self, addr: str, why: str, digest: str) -> None:
        self.banned[addr] = time.monotonic() + self.ban_seconds
        metrics.PROVIDERS_BANNED.labels(reason=metrics.ban_reason(why)).inc()
        self.recent_bans.append({"addr": addr, "reason": why, "digest": digest, "at": time.time(),
                                 "seconds": self.ban_seconds})
        self.proven.pop(addr, None)
        self._reachable_until.pop(addr, None)
        log.warning(f"provider {why}: banned", extra={"digest": digest, "addr": addr, "seconds": self.ban_seconds})

    def _answered(self, addr: str, ok: bool, digest: str) -> None:
        """A provider answered a probe or a piece (ok), or failed one: after repeated failures
        it is banned, as one that sends bad data is."""
        if ok:
            self._remember(self._reachable_until, addr, time.monotonic() + HEALTH_TTL)
            self._probe_failures.pop(addr, None)
            return
        self._reachable_until.pop(addr, None)
        if self.ledger:
            self.ledger.refused(_host(addr))
        failures = self._probe_failures.get(addr, 0) + 1
        self._remember(self._probe_failures, addr, failures)
        if failures >= PROBE_FAILURES_BEFORE_BAN:
            self._probe_failures.pop(addr, None)
            self._ban(addr, "unreachable", digest)

    async def reachable(self, digest: str, providers: list[ProviderRecord], within: float) -> list[ProviderRecord]:
        """The providers that can deliver `digest` over the real transport: reachable, TLS and
        membership checks passed, blob present (a HEAD, skipped for a provider that answered
        within `HEALTH_TTL`).  Returns as soon as one has answered, or [] after `within`."""
        now = time.monotonic()
        candidates = [p for p in providers if self.banned.get(p.addr, 0) < now]
        warm = [p for p in candidates if self._reachable_until.get(p.addr, 0) > now]
        if warm or not candidates:
            return warm
        probes = {asyncio.ensure_future(self._probe(digest, p, max(PROBE_TIMEOUT, within))): p
                  for p in candidates[:MAX_WORKERS]}
        deadline = now + within
        while probes:
            done, _ = await asyncio.wait(probes, timeout=max(0.0, deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break  # the rest finish in the background and update what is known of them
            for t in done:
                p = probes.pop(t)
                if t.result():
                    return [p]
        return []

    def _peer_request(self, method: str, addr: str, path: str, headers: dict | None = None, **kw):
        """A request to a peer's transfer server: TLS if the cluster has a membership, and the
        request line's MAC if it has a token."""
        headers = dict(headers or {})
        if self.sealer:
            headers[HEADER] = self.sealer.request_header(method, path)
        return self._client(addr).request(method, f"{'https' if self.tls else 'http'}://{addr}{path}", headers=headers,
                                      **kw)

    async def _probe(self, digest: str, rec: ProviderRecord, timeout: float = PROBE_TIMEOUT) -> bool:
        try:
            async with self._peer_request("HEAD", rec.addr, f"/blobs/{digest}",
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                ok = resp.status == 200 and resp.headers.get("Content-Length") == str(rec.size)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.info("provider unreachable", extra={"digest": digest, "addr": rec.addr, "error": repr(exc)})
            ok = False
        self._answered(rec.addr, ok, digest)
        return ok

    async def challenge(self, rec: ProviderRecord, ch: Challenge) -> tuple[int | None, str | None, bytes | None]:
        """Ask `rec`'s node for a proof of storage (`proofs`) over the peer transport:
        (HTTP status or None if it did not answer, the answer, its signature)."""
        try:
            async with self._peer_request("GET", rec.addr, f"/proofs/{ch.digest}?{ch.query}",
                                          timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                if resp.status != 200:
                    return resp.status, None, None
                result = (await resp.text()).strip()
                sig = resp.headers.get(SIG_HEADER)
                return 200, result, bytes.fromhex(sig) if sig else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            log.info("proof of storage not answered", extra={"digest": ch.digest, "addr": rec.addr, "error": repr(exc)})
            return None, None, None

    def failed_proof(self, addr: str, digest: str, banned: bool) -> None:
        """A holder failed a proof of storage: banned as one that sends corrupt data is, or, if
        it did not answer, one failed probe more."""
        if banned:
            self._ban(addr, "failed a proof of storage", digest)
        else:
            self._answered(addr, False, digest)

    def recently_failed(self, digest: str) -> str | None:
        """Why fetching `digest` failed a moment ago, or None: then containerd is told NOT_FOUND
        (with this reason), so that its retry goes to the registry."""
        entry = self.failed.get(digest)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self.failed[digest]
            return None
        return entry[1]

    def start(self, digest: str, size: int, providers: list[ProviderRecord],
              more: Callable[[], Awaitable[list[ProviderRecord]]] | None = None,
              origin: Origin | None = None, origin_first: bool = False) -> Fetch:
        """The fetch of `digest`, started unless one is already under way.

        `more` finds further providers: `Info` starts the fetch with the first one it met and
        the rest join as the full lookup returns, so one dying provider does not end it.
        Without `providers`, `more` is asked first, and if it finds none the blob comes from
        `origin` (or the one `self.origin` knows) alone.  With `origin_first`, the blob comes
        from `origin`, and from the providers `more` finds only if the registry fails.
        """
        existing = self.inflight.get(digest)
        if existing is not None:
            return existing
        now = time.monotonic()
        providers = [p for p in providers if self.banned.get(p.addr, 0) < now]
        hex_ = parse_digest(digest)
        fetch = Fetch(digest, size, os.path.join(self.dir, hex_ + ".partial"), max(1, -(-size // PIECE)),
                      trusted=self._trusted, origin=origin)
        self.inflight[digest] = fetch
        metrics.FETCHES_STARTED.inc()
        TIMELINE.mark("fetch_start", digest, size=size, providers=[p.addr for p in providers])
        fetch.task = asyncio.get_running_loop().create_task(self._run(fetch, providers, more, origin_first))
        return fetch

    async def close(self) -> None:
        for fetch in list(self.inflight.values()):
            if fetch.task:
                fetch.task.cancel()
        for session in self._sessions.values():
            await session.close()

    async def _run(self, fetch: Fetch, providers: list[ProviderRecord],
                   more: Callable[[], Awaitable[list[ProviderRecord]]] | None = None,
                   origin_first: bool = False) -> None:
        fd = os.open(fetch.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        t0 = time.monotonic()
        try:
            os.ftruncate(fd, fetch.size)
            fetch.prefix = PrefixHash(fetch, fd)
            if origin_first:
                await self._origin_then_peers(fetch, fd, more)
            else:
                await self._peers_then_origin(fetch, fd, list(providers), more)
            fetch.committed = True
            for addr in set(fetch.source.values()) - {ORIGIN}:
                self._remember(self.proven, addr, None)
            TIMELINE.mark("fetch_done", fetch.digest, size=fetch.size, started=fetch.started, sources={
                addr: [fetch.first_byte.get(addr, fetch.started), fetch.last_byte.get(addr, fetch.started), n]
                for addr, n in fetch.bytes_from.items()})
            log.info("fetched from peers" if ORIGIN not in fetch.bytes_from else "fetched from peers and the registry",
                     extra={"digest": fetch.digest, "size": fetch.size, "seconds": round(time.monotonic() - t0, 3),
                            "sources": fetch.bytes_from})
            metrics.FETCHES.labels(result="completed").inc()
            self.recent.append({"digest": fetch.digest, "size": fetch.size, "result": "completed",
                                "seconds": round(time.monotonic() - t0, 3), "sources": dict(fetch.bytes_from),
                                "at": time.time()})
            if self.on_committed:
                self.on_committed(fetch.digest, fetch.size)
        except asyncio.CancelledError:
            fetch.error = "fetch cancelled"
            metrics.FETCHES.labels(result="cancelled").inc()
            raise
        except Exception as exc:
            fetch.error = str(exc) or repr(exc)
            metrics.FETCHES.labels(result="failed").inc()
            self.recent.append({"digest": fetch.digest, "size": fetch.size, "result": "failed",
                                "error": fetch.error, "sources": dict(fetch.bytes_from), "at": time.time()})
            self.failed[fetch.digest] = (time.monotonic() + self.negative_ttl, fetch.error)
            log.warning("fetch from peers failed", extra={"digest": fetch.digest, "error": fetch.error})
        finally:
            os.close(fd)
            if fetch.prefix is not None:
                fetch.prefix.stopping = True  # ends at the notify below
            if not fetch.committed and os.path.exists(fetch.path):
                os.unlink(fetch.path)  # partial data is discarded
            self.inflight.pop(fetch.digest, None)
            await fetch._notify()

    async def _peers_then_origin(self, fetch: Fetch, fd: int, providers: list[ProviderRecord],
                                 more: Callable[[], Awaitable[list[ProviderRecord]]] | None) -> None:
        try:
            if not providers and more is not None:
                providers = list(await more())
            if not providers:
                raise NoPeers()
            await self._download(fetch, fd, providers, range(fetch.pieces), more,
                                 relook=self._registry_of(fetch) is None)  # if containerd has no other way
            await self._verify_or_find_liar(fetch, fd, providers)
        except FetchFailed as exc:
            await self._finish_from_origin(fetch, fd, exc)

    async def _origin_then_peers(self, fetch: Fetch, fd: int,
                                 more: Callable[[], Awaitable[list[ProviderRecord]]] | None) -> None:
        """The registry first; if it fails, whatever providers `more` finds (all the blob's
        pieces again: what the registry sent is not trusted)."""
        assert fetch.origin is not None
        try:
            await self._from_registry(fetch, fd, list(range(fetch.pieces)))
            await self._verify(fetch, fd)
            return
        except FetchFailed as exc:
            failure = exc
        log.warning("the registry failed: fetching from peers", extra={
            "digest": fetch.digest, "registry": str(fetch.origin), "error": str(failure)})
        providers = list(await more()) if more is not None else []
        if not providers:
            raise FetchFailed(f"the registry {fetch.origin} failed: {failure}; no peer holds it")
        fetch.done_pieces.clear()
        fetch.source.clear()
        fetch.landed.clear()
        fetch.repaired = True
        await self._download(fetch, fd, providers, range(fetch.pieces), more, relook=True)
        await self._verify_or_find_liar(fetch, fd, providers)

    async def _finish_from_origin(self, fetch: Fetch, fd: int, failure: FetchFailed) -> None:
        """Peers could not deliver the blob: the registry it came from fills in what is missing,
        and, if the blob still does not verify, every piece a peer sent."""
        origin = self._registry_of(fetch)
        if origin is None:
            raise failure
        fetch.origin = origin
        extra = {"digest": fetch.digest, "registry": str(origin), "error": str(failure),
                 "pieces_from_peers": len(fetch.done_pieces), "pieces": fetch.pieces}
        if isinstance(failure, NoPeers):  # no peer was asked
            log.info("no peer holds it: fetching from the registry", extra=extra)
        else:
            log.warning("peers failed: finishing from the registry", extra=extra)
        try:
            await self._from_registry(fetch, fd, [p for p in range(fetch.pieces) if p not in fetch.done_pieces])
            try:
                await self._verify(fetch, fd)
                return
            except FetchFailed:
                pass  # a peer's piece was wrong, and no other peer was left to tell whose
            await self._from_registry(fetch, fd, [p for p in range(fetch.pieces) if fetch.source.get(p) != ORIGIN])
            await self._verify(fetch, fd)
        except FetchFailed as exc:
            raise FetchFailed(f"{failure}; then the registry {origin} failed too: {exc}") from None

    def _registry_of(self, fetch: Fetch) -> Origin | None:
        """The registry `fetch` may fall back on: its own, or the one the mirror knows."""
        return fetch.origin or (self.origin(fetch.digest) if self.origin else None)

    async def _from_registry(self, fetch: Fetch, fd: int, pieces: list[int]) -> None:
        """Download `pieces` from the registry in a few long ranges at once (`registry_spans`):
        each request costs the registry and this loop far more than its bytes, and several
        streams still fill a link that one connection does not.  The first request goes
        alone: a registry that ignores Range answers it with the whole blob (`_whole_body`)."""
        for p in pieces:
            if p in fetch.done_pieces:
                fetch.repaired = True  # written again: what was streamed of it may be wrong
        spans = registry_spans(pieces, fetch.size, self._streams_per_blob())
        if not spans:
            return
        opened = asyncio.Event()
        first = asyncio.ensure_future(self._span_retried(fetch, fd, *spans[0], opened))
        tasks = [first, asyncio.ensure_future(opened.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if len(spans) > 1 and not (first.done() and first.exception()) and fetch.whole_body is None:
                tasks += [asyncio.ensure_future(self._span_retried(fetch, fd, a, b)) for a, b in spans[1:]]
            for t in asyncio.as_completed(tasks[:1] + tasks[2:]):
                await t  # the first failure (after its retries) fails the rest
        finally:
            for t in tasks:
                t.cancel()

    def _streams_per_blob(self) -> int:
        """Registry requests for one blob: `REGISTRY_STREAMS` for a blob fetched alone, fewer
        the more fetches are under way, one from `REGISTRY_STREAMS` on.  Several blobs at once
        fill the link already; a blob in one range arrives in its order, and a chain of nodes
        relaying it forwards each byte as it lands.  Cut into ranges, it arrives at several
        fronts, some slow (flows share a link unevenly), and followers waited on the slowest
        front while the others' pieces were long there (8 nodes: 16.8 s instead of ~15 s)."""
        return max(1, REGISTRY_STREAMS // max(1, len(self.inflight)))

    async def _span_retried(self, fetch: Fetch, fd: int, first: int, last: int,
                            opened: asyncio.Event | None = None) -> None:
        """Pieces `first`..`last` from the registry, resumed from the first piece not yet
        written if a response breaks off (`REGISTRY_RETRIES` times)."""
        for attempt in range(REGISTRY_RETRIES + 1):
            todo = [p for p in range(first, last + 1) if fetch.source.get(p) != ORIGIN or p not in fetch.done_pieces]
            if not todo:
                return
            try:
                await self._span(fetch, fd, todo[0], last, opened)
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, FetchFailed) as exc:
                metrics.PIECE_RETRIES.inc()
                if opened is not None:
                    opened.set()
                if attempt == REGISTRY_RETRIES:
                    raise exc if isinstance(exc, FetchFailed) else FetchFailed(repr(exc)) from None
                log.info("registry response broke off: resuming", extra={"digest": fetch.digest, "error": repr(exc),
                                                                        "piece": todo[0]})
                await asyncio.sleep(0.1 * (attempt + 1))

    async def _span(self, fetch: Fetch, fd: int, first: int, last: int, opened: asyncio.Event | None) -> None:
        """One range request for pieces `first`..`last`; each piece is marked as its last byte
        lands, so readers and the applier follow the stream."""
        assert fetch.origin is not None
        start, end = first * PIECE, min(fetch.size, (last + 1) * PIECE)
        async with self._registry_streams, await fetch.origin.open_range(fetch.digest, start, end) as resp:
            if opened is not None:
                opened.set()
            if resp.status == 200:
                return await self._whole_body(fetch, fd, resp)
            if resp.status != 206:
                raise FetchFailed(f"{ORIGIN} answered {resp.status}")
            offset = start
            fetch.first_byte.setdefault(ORIGIN, time.time())
            with self._turns.reading(fetch):
                while offset < end:
                    if not fetch.wanted.is_set():
                        await self._turns.wait_turn(fetch)
                    # what arrived, as it arrived: no joining of buffers into bigger ones (a copy,
                    # and memory the allocator keeps), however many responses stream at once
                    chunk = await resp.content.readany()
                    if not chunk:
                        raise FetchFailed(f"{ORIGIN} closed the connection at {offset}")
                    if len(chunk) > end - offset:
                        raise FetchFailed(f"{ORIGIN} sent more than the range asked for")
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
                    done = range(first, (offset // PIECE) if offset < end else last + 1)
                    for piece in done:
                        fetch.done_pieces.add(piece)
                        fetch.source[piece] = ORIGIN
                    metrics.FETCHED_BYTES.labels(source="registry").inc(len(chunk))
                    fetch.bytes_from[ORIGIN] = fetch.bytes_from.get(ORIGIN, 0) + len(chunk)
                    if len(done):
                        first = done.stop
                        await fetch._notify()
                    if offset < end:
                        await fetch.arrived(first, offset - first * PIECE)
            fetch.last_byte[ORIGIN] = time.time()

    async def _verify_or_find_liar(self, fetch: Fetch, fd: int, providers: list[ProviderRecord]) -> None:
        """Verify; on a mismatch, re-fetch one suspect's pieces from the others at a time.

        Without per-piece hashes the whole-blob digest is the only truth: the provider whose
        pieces, fetched elsewhere, make the blob verify is the one that lied, and is banned.
        """
        try:
            await self._verify(fetch, fd)
            return
        except FetchFailed as mismatch:
            first_error = mismatch
        for suspect in sorted(set(fetch.source.values())):
            others = [p for p in providers if p.addr != suspect]
            pieces = [i for i, addr in fetch.source.items() if addr == suspect]
            if not others:
                break
            try:
                await self._download(fetch, fd, others, pieces)
                await self._verify(fetch, fd)
            except FetchFailed:
                continue
            self._ban(suspect, "sent corrupt data", fetch.digest)
            return
        raise first_error

    async def _download(self, fetch: Fetch, fd: int, providers: list[ProviderRecord], pieces,
                        more: Callable[[], Awaitable[list[ProviderRecord]]] | None = None,
                        relook: bool = False) -> None:
        """`pieces` from `providers` and those `more` finds, each piece from whichever would
        deliver it soonest; FetchFailed once no provider is left.  With `relook` (no registry
        to fall back on) and a fetch that is containerd's only way to the blob (`only_way`),
        `more` is asked again a few times first (`RELOOK_PAUSES`)."""
        todo: list[int] = []  # pieces not yet asked for, in order
        for p in pieces:
            todo.append(p)
            if p in fetch.done_pieces:
                fetch.repaired = True
        alive = [p.addr for p in providers]
        relays = {p.addr for p in providers if p.inflight}
        finding = asyncio.ensure_future(more()) if more else None
        relooks = iter(RELOOK_PAUSES if more and relook else ())  # used only once `only_way`

        def add_found() -> None:
            nonlocal finding
            if finding is None or not finding.done():
                return
            found = [] if finding.cancelled() or finding.exception() else finding.result()
            finding = None
            now = time.monotonic()
            for rec in found:
                if rec.size != fetch.size or rec.addr in alive or self.banned.get(rec.addr, 0) >= now:
                    continue
                if rec.addr in fetch.dropped:
                    # asked afresh: a relay slow under load is the one its chain runs through
                    # (skipping it sent a 16-node rollout's layer to the registry twice)
                    failures.pop(rec.addr, None)
                alive.append(rec.addr)
                providers.append(rec)
                if rec.inflight:
                    relays.add(rec.addr)
                else:
                    relays.discard(rec.addr)

        async def relook(pause: float) -> list[ProviderRecord]:
            await asyncio.sleep(pause)
            assert more is not None
            return list(await more())

        failures: dict[str, int] = {}
        busy: dict[str, int] = {}
        load: dict[str, int] = {}  # provider -> pieces being fetched from it now
        last_error = ""
        turn = 0

        async def worker() -> None:
            nonlocal turn, last_error, finding
            while fetch.error is None:
                if not todo:
                    return
                add_found()
                if not alive and finding is None and fetch.only_way and (pause := next(relooks, None)) is not None:
                    log.info("no provider left: looking again", extra={"digest": fetch.digest, "pause": pause})
                    finding = asyncio.ensure_future(relook(pause))
                if not alive and finding is not None:
                    t0 = time.monotonic()
                    await asyncio.wait([finding])  # the full lookup may still bring providers
                    TIMELINE.waited("lookup", time.monotonic() - t0, fetch.digest, by="fetch")
                    continue  # what it found, or the next look, from the top
                if not alive:
                    raise FetchFailed(f"no provider left to fetch from{last_error}")
                addr = self._choose(alive, load, turn)
                turn += 1
                piece = todo.pop(_next_piece(todo, *fetch.relay_has.get(addr, (0, 0))))
                if fetch.whole_body is not None and fetch.whole_body.done() and fetch.source.get(piece) == ORIGIN:
                    continue  # written by the registry's whole body
                load[addr] = load.get(addr, 0) + 1
                try:
                    n = min(fetch.size, (piece + 1) * PIECE) - piece * PIECE
                    if addr == ORIGIN:  # the registry is slow or not: there is nothing after it
                        await self._piece(fetch, fd, addr, piece)
                    elif addr in relays:
                        await self._piece(fetch, fd, addr, piece, idle=RELAY_IDLE, relay=True)
                    else:
                        await asyncio.wait_for(self._piece(fetch, fd, addr, piece), STALL_GRACE + n / self.min_rate)
                    busy.pop(addr, None)
                    if addr != ORIGIN:
                        self._answered(addr, True, fetch.digest)
                    load[addr] -= 1
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, FetchFailed, ProviderBusy) as exc:
                    load[addr] -= 1
                    todo.append(piece)
                    metrics.PIECE_RETRIES.inc()
                    if addr != ORIGIN and addr not in relays and not isinstance(exc, ProviderBusy):
                        self._answered(addr, False, fetch.digest)
                    if isinstance(exc, ProviderBusy):
                        busy[addr] = busy.get(addr, 0) + 1
                        if busy[addr] % BUSY_BEFORE_FAILURE:
                            pause = min(0.02 * busy[addr], 0.5)
                            await asyncio.sleep(pause)
                            TIMELINE.waited("provider_busy", pause, fetch.digest, addr=addr)
                            continue
                    failures[addr] = failures.get(addr, 0) + 1
                    if failures[addr] >= FAILURES_BEFORE_DROP and addr in alive:
                        alive.remove(addr)
                        fetch.dropped.add(addr)
                        last_error = f" (the last, {addr}: {exc!r})"
                        log.warning("provider dropped", extra={"digest": fetch.digest, "addr": addr,
                                                               "error": repr(exc)})
                        TIMELINE.mark("provider_dropped", fetch.digest, addr=addr, error=repr(exc)[:200])
                    continue
                fetch.done_pieces.add(piece)
                fetch.source[piece] = addr
                await fetch._notify()

        # A relay's pieces come as it gets them: more requests wait there at once, one on each
        # piece arriving, so that none waits behind a slow one while others have landed.
        per = sum(WORKERS_PER_RELAY if a in relays else WORKERS_PER_HOLDER for a in alive)
        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(MAX_WORKERS, len(todo), per)))]
        try:
            while workers:
                done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for w in done:
                    w.result()  # re-raise FetchFailed
                workers = list(pending)
                if not workers and todo:
                    if not alive:
                        raise FetchFailed(f"no provider left to fetch from{last_error}")
                    workers = [asyncio.ensure_future(worker())]
        finally:
            for w in workers:
                w.cancel()
            if finding is not None:
                finding.cancel()

    def _choose(self, alive: list[str], load: dict[str, int], turn: int) -> str:
        """The provider for the next piece: the one that would deliver it soonest by the speed
        its recent pieces came at and the pieces it is already sending us, rather than the next
        in turn (fair sharing: a fast, idle holder takes more).  A provider not measured yet
        counts as fast, so that each is tried; ties go round in turn."""
        fastest = max((self.speed.get(a, 0.0) for a in alive), default=0.0) or 1.0

        def eta(i: int) -> tuple[float, int]:
            addr = alive[i]
            return (load.get(addr, 0) + 1) / (self.speed.get(addr) or fastest), (i - turn) % len(alive)

        return alive[min(range(len(alive)), key=eta)]

    def _measured(self, addr: str, n: int, seconds: float) -> None:
        sample = n / max(seconds, 1e-3)
        old = self.speed.get(addr)
        self._remember(self.speed, addr, sample if old is None else 0.7 * old + 0.3 * sample)

    async def _piece(self, fetch: Fetch, fd: int, addr: str, piece: int, idle: float | None = None,
                     relay: bool = False) -> None:
        t0 = time.monotonic()
        start = piece * PIECE
        end = min(fetch.size, start + PIECE)
        if addr == ORIGIN:
            assert fetch.origin is not None
            opening = fetch.origin.open_range(fetch.digest, start, end)
        else:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=idle) if idle else None
            opening = self._peer_request("GET", addr, f"/blobs/{fetch.digest}", {"Range": f"bytes={start}-{end - 1}"},
                                         **({"timeout": timeout} if timeout else {}))
        async with await opening as resp:
            if resp.status in (429, 503):  # over its upload slots, or over our request rate there
                raise ProviderBusy(addr)
            if resp.status not in (200, 206):
                raise FetchFailed(f"{addr} answered {resp.status}")
            if relay:
                fetch.relay_has[addr] = pieces_of(resp.headers.get(PIECES_HEADER, ""))
            if resp.status == 200:
                if addr != ORIGIN:  # peer servers always honour Range
                    raise FetchFailed(f"{addr} ignored Range")
                return await self._whole_body(fetch, fd, resp)
            offset = start
            while offset < end:
                chunk = await resp.content.read(min(1 << 20, end - offset))
                if not chunk:
                    raise FetchFailed(f"{addr} closed the connection at {offset}")
                if offset == start:
                    if relay:  # until a node still downloading the blob had this piece's first bytes
                        TIMELINE.waited("relay", time.monotonic() - t0, fetch.digest, addr=addr)
                    fetch.first_byte.setdefault(addr, time.time())
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
                await fetch.arrived(piece, offset - start)
            fetch.last_byte[addr] = time.time()
        fetch.bytes_from[addr] = fetch.bytes_from.get(addr, 0) + (end - start)
        metrics.FETCHED_BYTES.labels(source="registry" if addr == ORIGIN else "inflight_peer" if relay
                                     else "peer").inc(end - start)
        if addr != ORIGIN:
            self._measured(addr, end - start, time.monotonic() - t0)
            if self.ledger:
                self.ledger.received(_host(addr), end - start)

    async def _whole_body(self, fetch: Fetch, fd: int, resp: aiohttp.ClientResponse) -> None:
        """A registry that ignores Range sends the whole blob for any piece: stream that one
        body into the file, every piece marked as its last byte lands, instead of reading and
        dropping everything before each piece (memory up to the blob's size per worker, and
        the blob downloaded about once per piece).  Other workers wait for this response."""
        if fetch.whole_body is not None:
            resp.close()
            await asyncio.shield(fetch.whole_body)
            return
        fetch.whole_body = asyncio.get_running_loop().create_future()
        if any(fetch.source.get(p, ORIGIN) != ORIGIN for p in fetch.done_pieces):
            fetch.repaired = True  # peers' pieces are written again: what was streamed of them may be wrong
        try:
            offset = 0
            while offset < fetch.size:
                chunk = await resp.content.read(min(1 << 20, fetch.size - offset))
                if not chunk:
                    raise FetchFailed(f"{ORIGIN} closed the connection at {offset}")
                os.pwrite(fd, chunk, offset)
                done = (offset + len(chunk)) // PIECE if offset + len(chunk) < fetch.size else fetch.pieces
                for piece in range(offset // PIECE, done):
                    fetch.done_pieces.add(piece)
                    fetch.source[piece] = ORIGIN
                offset += len(chunk)
                await fetch._notify()
            fetch.bytes_from[ORIGIN] = fetch.bytes_from.get(ORIGIN, 0) + fetch.size
            metrics.FETCHED_BYTES.labels(source="registry").inc(fetch.size)
            fetch.whole_body.set_result(None)
        except BaseException as exc:
            waiting, fetch.whole_body = fetch.whole_body, None  # the next try streams it again
            waiting.set_exception(exc if isinstance(exc, Exception) else FetchFailed("cancelled"))
            waiting.exception()  # retrieved: only the workers waiting on it care
            raise

    async def _verify(self, fetch: Fetch, fd: int) -> None:
        """Check the digest, then commit.  The applier gets the blob's last byte as soon as the
        digest matches (`Fetch.verified`), and finishes the layer while the commit's fsyncs
        (1 - 8 ms per blob here) run, instead of after them."""
        t0 = time.monotonic()
        if fetch.prefix is not None:
            await fetch.prefix.stop(fetch)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._check, fetch, fd)
        fetch.verified = True
        await fetch._notify()
        await loop.run_in_executor(None, self.store.blobs.commit_file, fd, fetch.path, fetch.digest, {})
        TIMELINE.waited("verify", time.monotonic() - t0, fetch.digest)

    def _check(self, fetch: Fetch, fd: int) -> None:
        """Hash what arrived (what the prefix hash has not covered, if no piece was written
        again since, `PrefixHash`); FetchFailed unless it is exactly the blob."""
        prefix = fetch.prefix
        if prefix is not None and prefix.offset and not fetch.repaired:
            hasher, length = sha256_of_fd(fd, prefix.hasher.copy(), prefix.offset)
            if length == fetch.size and "sha256:" + hasher.hexdigest() == fetch.digest:
                return
        hasher, length = sha256_of_fd(fd)  # the whole file: the shortcut cannot tell a liar's bytes
        got = "sha256:" + hasher.hexdigest()
        if length != fetch.size or got != fetch.digest:
            raise FetchFailed(f"peers sent bytes that do not match {fetch.digest} (got {got})")
