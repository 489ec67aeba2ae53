"""Peer transfer server: other nodes fetch committed blobs from this one over HTTP.

    GET  /blobs/sha256:<hex>    the blob (Range: one byte range, 206 / 416)
    HEAD /blobs/sha256:<hex>    its size and digest, no body
    GET  /proofs/sha256:<hex>?nonce=&offset=&length=
                                a proof of storage (`placement.challenger`): sha256(nonce || range),
                                signed by the node's key in key-pair mode

Committed blobs are final and read-only, so a response never changes under a reader.
Unthrottled bodies go out with sendfile (aiohttp's FileResponse); with a rate limit they are
streamed from pread through a token bucket instead, since sendfile cannot be paced.  A node
serves `max_uploads` requests at once; more wait a moment for a slot, which goes to the peer
that gave this node the most (`ledger`: tit-for-tat, with an optimistic slot for newcomers),
and are told 503 if none comes free, so that the fetcher moves on to another provider.

With a membership configured (`membership`), the server speaks TLS only, and only to clients
presenting a member certificate (sendfile then gives way to aiohttp's copy through TLS).  With
a cluster token, every request must also carry a fresh MAC of its request line
(`auth.HEADER`); one that does not is dropped: the connection is closed without a reply, and
a peer that keeps failing is banned for a while.  Each peer (IP) has a request rate; past it
the answer is 429, so one greedy node cannot starve the others.

A blob this node is downloading right now (an ingest the content service published, see
`fetch.source`) is served as it is written: the response sends what is on disk and waits
for more.  If the ingest is truncated or ends without a commit, the response stops short of
its Content-Length, and the fetcher takes the piece elsewhere.  Likewise a blob this node is
fetching from peers is relayed piece by piece as the pieces land (its final bytes once the
digest matched).  The fetcher verifies the whole blob, so unverified bytes relayed here
cannot pass as the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from typing import Callable

from aiohttp import web

from .. import metrics
from ..addresses import unmapped
from ..httpserve import SentFileResponse, start_site
from ..auth import HEADER, AuthError, Sealer
from ..digests import parse_digest
from ..errors import InvalidArgument
from ..fetch.fetcher import Fetcher
from ..fetch.pieces import PIECE, PIECES_HEADER, Fetch, FetchFailed
from ..penalties import PeerLimits
from .ledger import Ledger, UploadSlots, queue_wait
from ..proofs import SIG_HEADER, answer, parse_challenge, signable
from ..store import IngestWriter, LocalStore
from ..store.progress import IngestGone
from ..timeline import TIMELINE

log = logging.getLogger("cs_p2p.peer")

_CHUNK = 256 << 10
REQUESTS_PER_PEER = 200.0  # per second, from one IP (a 4 MiB piece each)


STALL_SECONDS = 60.0  # a blob being written or fetched that grows no piece this long: the upload ends
CLIENT_CHECK = 1.0  # how often a waiting upload looks whether its client is still there


class TokenBucket:
    """Paces bytes to `rate` per second across all uploads, with a burst of one second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(float(self.rate), self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                await asyncio.sleep((n - self.tokens) / self.rate)


class PeerServer:
    def __init__(self, store: LocalStore, max_uploads: int = 16, rate_limit: int = 0,
                 fetcher: Fetcher | None = None, sealer: Sealer | None = None,
                 tls: ssl.SSLContext | None = None, limits: PeerLimits | None = None,
                 signer: Callable[[bytes], bytes] | None = None, on_served: Callable[[str], None] | None = None,
                 ledger: Ledger | None = None, slot_wait: float | None = None,
                 stall_seconds: float = STALL_SECONDS, purged: Callable[[str], bool] = lambda digest: False) -> None:
        self.store = store
        self.purged = purged  # digest -> purged from the cluster (`purges`): never served again
        self.stall_seconds = stall_seconds  # a growing blob with no new byte this long: the upload ends
        self.ledger = ledger or Ledger()  # what each peer gave us: who gets a contended slot
        self.on_served = on_served  # a GET of a held blob (its demand, `dht.demand`)
        self.signer = signer  # key-pair mode: signs proofs of storage
        self.tls = tls
        self.limits = limits or PeerLimits(rate=REQUESTS_PER_PEER, name="peer server")
        self.fetcher = fetcher
        self.sealer = sealer
        self.refused = 0
        self.max_uploads = max_uploads
        if slot_wait is None:
            slot_wait = queue_wait(rate_limit, max_uploads, PIECE)
        self.slots = UploadSlots(max_uploads, self.ledger.priority, wait=slot_wait)
        self.bucket = TokenBucket(rate_limit) if rate_limit > 0 else None
        self.bytes_sent = 0
        self.app = web.Application(middlewares=[self._admit])
        self.app.router.add_route("GET", "/blobs/{digest}", self.get_blob)
        self.app.router.add_route("HEAD", "/blobs/{digest}", self.get_blob)
        self.app.router.add_route("GET", "/proofs/{digest}", self.get_proof)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks one); returns the port."""
        self._runner, port = await start_site(self.app, host, port, self.tls)
        return port

    @property
    def active(self) -> int:
        """Uploads under way."""
        return self.slots.in_use

    @contextlib.asynccontextmanager
    async def _upload_slot(self, request: web.Request):
        """Hold one of the upload slots for a response (503 if none comes free in time)."""
        t0 = time.monotonic()
        granted = await self.slots.acquire(_remote(request))
        TIMELINE.waited("upload_slot", time.monotonic() - t0, request.match_info.get("digest", ""),
                        peer=_remote(request))
        if not granted:
            raise web.HTTPServiceUnavailable(text="upload slots full", headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self.slots.release()

    def _sent(self, request: web.Request, n: int) -> None:
        self.ledger.sent(_remote(request), n)
        metrics.UPLOADED_BYTES.inc(n)

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    @web.middleware
    async def _admit(self, request: web.Request, handler) -> web.StreamResponse:
        """Banned peers get nothing; peers over their rate get 429; with a cluster token, a
        request without a fresh MAC gets nothing and counts against its peer."""
        peer = _remote(request)
        if self.limits.banned(peer):
            _hang_up(request)
        if not self.limits.allow(peer):
            raise web.HTTPTooManyRequests(text="too many requests from this peer", headers={"Retry-After": "1"})
        if self.sealer is not None:
            try:
                self.sealer.check_request(request.method, request.path_qs, request.headers.get(HEADER))
            except AuthError as exc:
                self.refused += 1
                log.warning("peer request refused", extra={"from": peer, "reason": str(exc)})
                self.limits.strike(peer)
                _hang_up(request)
        return await handler(request)

    async def get_proof(self, request: web.Request) -> web.Response:
        """Answer a challenge from the blob's bytes on disk (a committed or cached blob only: an
        in-flight one is not held yet)."""
        try:
            ch = parse_challenge(request.match_info["digest"], request.query)
        except (ValueError, InvalidArgument) as exc:
            raise web.HTTPBadRequest(text=f"bad challenge: {exc}") from None
        path = self.store.served_path(parse_digest(ch.digest))
        if path is None:
            raise web.HTTPNotFound(text=f"blob {ch.digest} not held")
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, answer, path, ch)
        except FileNotFoundError:
            raise web.HTTPNotFound(text=f"blob {ch.digest} not held") from None
        except ValueError as exc:
            raise web.HTTPRequestRangeNotSatisfiable(text=str(exc)) from None
        headers = {SIG_HEADER: self.signer(signable(ch, result)).hex()} if self.signer else {}
        return web.Response(text=result, headers=headers)

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            hex_ = parse_digest(digest)
        except InvalidArgument as exc:
            raise web.HTTPBadRequest(text=str(exc))
        if self.purged(digest):
            raise web.HTTPNotFound(text=f"blob {digest} was purged from this cluster")
        path = self.store.served_path(hex_)
        if path is None:  # not held: perhaps being written here, then committed to blob_path
            blob_path = self.store.blobs.blob_path(hex_)
            writer = self.store.ingests.published(digest)
            if writer is not None:
                return await self._ingest(request, writer, blob_path, digest)
            fetch = self.fetcher.inflight.get(digest) if self.fetcher else None
            if fetch is not None:
                return await self._relay(request, fetch, blob_path, digest)
            raise web.HTTPNotFound(text=f"blob {digest} not found")
        if request.method == "HEAD":
            return _head(os.path.getsize(path), digest)
        if self.on_served and request.headers.get("Range", "bytes=0-").startswith("bytes=0-"):
            self.on_served(digest)  # once per fetch: its first piece (a fetch takes many ranges)
        async with self._upload_slot(request):
            if self.bucket is None:
                resp: web.StreamResponse = SentFileResponse(path, chunk_size=_CHUNK, headers={
                    "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"})
                # prepare() sends the body (sendfile) here, so the slot is held until it is out.
                await resp.prepare(request)
                self.bytes_sent += resp.content_length or 0
                self._sent(request, resp.content_length or 0)
                return resp
            return await self._paced(request, path, digest)

    async def _paced(self, request: web.Request, path: str, digest: str) -> web.StreamResponse:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            start, stop = _byte_range(request, size)
            resp = await _start_body(request, digest, start, stop, size)
            if not await self._copy(resp, fd, start, stop):
                resp.force_close()  # short of Content-Length: the client sees it failed
                return resp
            await resp.write_eof()
            self._sent(request, stop - start)
            return resp
        finally:
            os.close(fd)

    async def _copy(self, resp: web.StreamResponse, fd: int, offset: int, end: int) -> bool:
        """Send [offset, end) of `fd`, paced by the rate limit if there is one; False if the
        file ends before `end` (truncated under us)."""
        while offset < end:
            n = min(_CHUNK, end - offset)
            if self.bucket is not None:
                await self.bucket.take(n)
            data = os.pread(fd, n, offset)
            if not data:
                return False
            await resp.write(data)
            offset += len(data)
            self.bytes_sent += len(data)
        return True

    async def _ingest(self, request: web.Request, writer: IngestWriter, blob_path: str,
                      digest: str) -> web.StreamResponse:
        """Serve a blob while this node writes it, waiting for each byte to reach the disk."""
        progress = writer.progress
        generation = progress.generation

        async def available(offset: int, stop: int) -> int:
            return min(await progress.wait_beyond(offset, generation), stop)

        return await self._growing(request, writer.total, writer.data_path, blob_path, digest, available)

    async def _relay(self, request: web.Request, fetch: Fetch, blob_path: str, digest: str) -> web.StreamResponse:
        """Serve a blob this node is fetching, its bytes as they land (`Fetch.wait_landed`)."""
        async def available(offset: int, stop: int) -> int:
            return min(stop, await fetch.wait_landed(offset))

        return await self._growing(request, fetch.size, fetch.path, blob_path, digest, available,
                                   lambda: {PIECES_HEADER: fetch.pieces_mask()})

    async def _growing(self, request: web.Request, size: int, data_path: str, blob_path: str, digest: str,
                       available, headers: Callable[[], dict[str, str]] = dict) -> web.StreamResponse:
        """Stream [start, stop) of a file still being written: `available(offset, stop)` waits
        until bytes up to some end past `offset` are there, or raises if they never will be."""
        if request.method == "HEAD":
            return _head(size, digest)
        start, stop = _byte_range(request, size)
        try:
            fd = os.open(data_path, os.O_RDONLY)
        except FileNotFoundError:  # committed (renamed) or given up a moment ago
            if os.path.exists(blob_path):
                return await self.get_blob(request)
            raise web.HTTPNotFound(text=f"blob {digest} not found") from None
        try:
            async with self._upload_slot(request):
                return await self._send_growing(request, fd, digest, start, stop, size, available, headers)
        finally:
            os.close(fd)

    async def _send_growing(self, request: web.Request, fd: int, digest: str, start: int, stop: int, size: int,
                            available, headers: Callable[[], dict[str, str]]) -> web.StreamResponse:
        """The response starts with the first bytes: a download that ends before it has any of
        the range (a follower's ingest handed over to its fetch, an abandoned one) is a 503, to
        be asked again, not a response cut short that a fetcher counts as the provider failing
        (eight nodes starting at once dropped every provider that way, and a pull failed)."""
        try:
            end = await self._next_bytes(request, available, start, stop)
        except (IngestGone, FetchFailed):
            end = None
        if end is None:
            raise web.HTTPServiceUnavailable(text=f"blob {digest}: the download this node serves it from has "
                                                  "stopped; ask again", headers={"Retry-After": "1"})
        resp = await _start_body(request, digest, start, stop, size, headers())
        offset = start
        while offset < stop:
            if offset > start:
                try:
                    end = await self._next_bytes(request, available, offset, stop)
                except (IngestGone, FetchFailed):
                    end = None
            if end is None:
                resp.force_close()  # short of Content-Length: the client sees it failed
                return resp
            if not await self._copy(resp, fd, offset, end):
                resp.force_close()
                return resp
            offset = end
        await resp.write_eof()
        self._sent(request, stop - start)
        return resp


    async def _next_bytes(self, request: web.Request, available, offset: int, stop: int) -> int | None:
        """`available(offset, stop)`, or None once the client has gone (aiohttp does not cancel
        a handler whose client left) or no byte came for `stall_seconds`: either way the
        upload slot goes back to the peers that are still there."""
        wait = asyncio.ensure_future(available(offset, stop))
        deadline = time.monotonic() + self.stall_seconds
        try:
            while True:
                done, _ = await asyncio.wait({wait}, timeout=min(CLIENT_CHECK, self.stall_seconds))
                if done:
                    return wait.result()
                transport = request.transport
                if transport is None or transport.is_closing() or time.monotonic() > deadline:
                    return None
        finally:
            if not wait.done():
                wait.cancel()


def _remote(request: web.Request) -> str:
    """The peer's address as the ledger and the limits know it (an IPv4 peer reaching a
    dual-stack listener by its IPv4 address, `addresses.unmapped`)."""
    return unmapped(request.remote) if request.remote else "?"


def _head(size: int, digest: str) -> web.Response:
    return web.Response(headers={"Content-Length": str(size), "Docker-Content-Digest": digest,
                                 "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})


def _hang_up(request: web.Request) -> None:
    """Close the connection without a reply."""
    if request.transport is not None:
        request.transport.abort()
    raise web.HTTPForbidden()  # never sent: the connection is gone


def _byte_range(request: web.Request, size: int) -> tuple[int, int]:
    """[start, stop) of the one byte range asked for (the whole blob without Range); 416 if
    it lies outside the blob."""
    try:
        rng = request.http_range
    except ValueError:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    start, stop = rng.start, rng.stop
    if start is None and stop is not None and stop < 0:
        start, stop = max(size + stop, 0), size
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if start >= size or start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


async def _start_body(request: web.Request, digest: str, start: int, stop: int, size: int,
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
    partial = request.headers.get("Range") is not None
    resp = web.StreamResponse(status=206 if partial else 200, headers={
        "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes", "Content-Length": str(stop - start), **(headers or {})})
    if partial:
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    await resp.prepare(request)
    return resp
