"""A member of the cluster that announces blobs and then fails to deliver them, in one of the
ways real peers fail: run on its own event loop in a thread beside the real nodes."""

from __future__ import annotations

import asyncio
import os
import threading

from aiohttp import web

from cs_p2p.auth import Sealer, load_tokens
from cs_p2p_dev.processes import free_port
from cs_p2p.dht.node import DhtNode
from cs_p2p.membership import membership

MODES = ("tls", "refuse", "reset", "stall", "corrupt")


class FaultyPeer:
    """Joins the DHT with the cluster token and announces `blobs`; its peer server then:

    - tls: presents a certificate of another token (the handshake fails, as in a botched rotation);
    - refuse: is not there at all (connection refused);
    - reset: answers HEAD, then resets the connection halfway through every range;
    - stall: answers HEAD, then sends a few bytes of every range and nothing more;
    - corrupt: answers HEAD, then sends every range with one byte flipped.
    """

    def __init__(self, mode: str, bootstrap: str, token_file: str, blobs: dict[str, bytes], workdir: str) -> None:
        assert mode in MODES
        self.mode = mode
        self.blobs = blobs
        self.token_file = token_file
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.release = asyncio.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(bootstrap,), daemon=True)
        self.thread.start()
        assert self.ready.wait(30) and self.error is None, f"faulty peer did not start: {self.error!r}"

    def _run(self, bootstrap: str) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start(bootstrap))
        except BaseException as exc:  # reported to the test thread
            self.error = exc
        self.ready.set()
        self.loop.run_forever()

    def _tls(self):
        if self.mode != "tls":
            return membership(self.token_file, tls_dir=os.path.join(self.workdir, "tls")).server_tls
        other = os.path.join(self.workdir, "other-token")
        with open(other, "wb") as f:
            f.write(os.urandom(24).hex().encode())
        return membership(other, tls_dir=os.path.join(self.workdir, "other-tls")).server_tls

    async def _start(self, bootstrap: str) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self.runner = None
        if self.mode == "refuse":
            self.addr = f"127.0.0.1:{free_port()}"  # nothing listens there
        else:
            app = web.Application()
            app.router.add_route("HEAD", "/blobs/{digest}", self._head)
            app.router.add_get("/blobs/{digest}", self._get, allow_head=False)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self._tls())
            await site.start()
            self.addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.dht = DhtNode(os.urandom(20), self.addr, sealer=Sealer(load_tokens(self.token_file), "dht"))
        await self.dht.listen("127.0.0.1", 0)
        await self.dht.bootstrap([bootstrap])
        for digest, data in self.blobs.items():
            await self.dht.announce(digest, len(data))

    async def _head(self, request: web.Request) -> web.Response:
        data = self.blobs[request.match_info["digest"]]
        return web.Response(headers={"Content-Length": str(len(data)), "Accept-Ranges": "bytes"})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        data = self.blobs[request.match_info["digest"]]
        rng = request.http_range
        start, stop = rng.start or 0, len(data) if rng.stop is None else rng.stop
        body = bytearray(data[start:stop])
        if self.mode == "corrupt":
            body[len(body) // 2] ^= 0xFF
            return web.Response(body=bytes(body), status=206)
        resp = web.StreamResponse(status=206, headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        if self.mode == "reset":
            await resp.write(bytes(body[: len(body) // 2]))
            request.transport.abort()
            return resp
        await resp.write(bytes(body[: min(1000, len(body) // 2)]))  # stall
        await self.release.wait()
        return resp

    def stop(self) -> None:
        async def shutdown() -> None:
            self.release.set()
            self.dht.stop()
            if self.runner is not None:
                await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class FlakyRegistry:
    """A registry's front that passes requests through to the real one (`upstream`, host:port),
    except blob downloads, which in mode

    - cut: break off after `cut_after` bytes, once per blob (a registry or its storage failing
      mid-blob);
    - fail: answer 500 with a reason of its own (a registry that fails after the manifest resolved).

    Runs on its own event loop in a thread; `addr` is where it listens."""

    REASON = "storage backend unavailable (flaky test registry)"

    def __init__(self, upstream: str, mode: str, cut_after: int = 1 << 20) -> None:
        assert mode in ("cut", "fail")
        self.upstream, self.mode, self.cut_after = upstream, mode, cut_after
        self.cut: set[str] = set()
        self.blob_gets = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "flaky registry did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        blob = "/blobs/sha256:" in request.path and request.method == "GET"
        if blob:
            self.blob_gets += 1
        if blob and self.mode == "fail":
            return web.Response(status=500, text=self.REASON)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "authorization", "range")}
        async with self.session.request(request.method, f"http://{self.upstream}{request.path_qs}", headers=headers,
                                        allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in ("transfer-encoding", "connection")})
            await resp.prepare(request)
            digest = request.path.rsplit("/", 1)[-1]
            cut = blob and digest not in self.cut and (up.content_length or 0) > self.cut_after
            sent = 0
            async for chunk in up.content.iter_chunked(64 << 10):
                if cut and sent + len(chunk) > self.cut_after:
                    self.cut.add(digest)
                    await resp.write(chunk[: self.cut_after - sent])
                    request.transport.abort()
                    return resp
                await resp.write(chunk)
                sent += len(chunk)
            await resp.write_eof()
            return resp

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.runner.cleanup()
            await self.session.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
