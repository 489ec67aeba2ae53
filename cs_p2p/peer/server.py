"""Peer transfer server: other nodes fetch committed blobs from this one over HTTP.

    GET  /blobs/sha256:<hex>    the blob (Range: one byte range, 206 / 416)
    HEAD /blobs/sha256:<hex>    its size and digest, no body

Only committed blobs are served: they are final and read-only, so a response can never
change under a reader.  Unthrottled bodies go out with sendfile (aiohttp's FileResponse);
with a rate limit they are streamed from pread through a token bucket instead, since
sendfile cannot be paced.  A node that is already serving `max_uploads` blobs answers 503
at once, so a fetcher moves on to another provider rather than queueing here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from aiohttp import web

from ..digests import parse_digest
from ..errors import InvalidArgument
from ..store import LocalStore

log = logging.getLogger("cs_p2p.peer")

_CHUNK = 256 << 10


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
    def __init__(self, store: LocalStore, max_uploads: int = 16, rate_limit: int = 0) -> None:
        self.store = store
        self.max_uploads = max_uploads
        self.active = 0
        self.bucket = TokenBucket(rate_limit) if rate_limit > 0 else None
        self.bytes_sent = 0
        self.app = web.Application()
        self.app.router.add_route("GET", "/blobs/{digest}", self.get_blob)
        self.app.router.add_route("HEAD", "/blobs/{digest}", self.get_blob)
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0 picks one); returns the port."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def get_blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            hex_ = parse_digest(digest)
        except InvalidArgument as exc:
            raise web.HTTPBadRequest(text=str(exc))
        path = self.store.blobs.blob_path(hex_)
        if not os.path.exists(path):
            raise web.HTTPNotFound(text=f"blob {digest} not found")
        if request.method == "HEAD":
            size = os.path.getsize(path)
            return web.Response(headers={"Content-Length": str(size), "Docker-Content-Digest": digest,
                                         "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        if self.active >= self.max_uploads:
            raise web.HTTPServiceUnavailable(text="upload slots full", headers={"Retry-After": "1"})
        self.active += 1
        try:
            if self.bucket is None:
                resp: web.StreamResponse = web.FileResponse(path, chunk_size=_CHUNK, headers={
                    "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"})
                # prepare() sends the body (sendfile) here, so the slot is held until it is out.
                await resp.prepare(request)
                self.bytes_sent += resp.content_length or 0
                return resp
            return await self._paced(request, path, digest)
        finally:
            self.active -= 1

    async def _paced(self, request: web.Request, path: str, digest: str) -> web.StreamResponse:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
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
            partial = request.headers.get("Range") is not None
            resp = web.StreamResponse(status=206 if partial else 200, headers={
                "Docker-Content-Digest": digest, "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes", "Content-Length": str(stop - start)})
            if partial:
                resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
            await resp.prepare(request)
            offset = start
            assert self.bucket is not None
            while offset < stop:
                n = min(_CHUNK, stop - offset)
                await self.bucket.take(n)
                data = os.pread(fd, n, offset)
                await resp.write(data)
                offset += len(data)
                self.bytes_sent += len(data)
            await resp.write_eof()
            return resp
        finally:
            os.close(fd)
