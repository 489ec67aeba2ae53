"""The multi-source fetcher against real HTTP peers: honest, dead and corrupt ones."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from aiohttp import web

from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.fetch.fetcher import PIECE, FetchFailed, Fetcher
from cs_p2p.peer.server import PeerServer
from cs_p2p.store import LocalStore
from tests.test_peer_server import commit

DATA = os.urandom(3 * PIECE + 12345)  # four pieces
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def record(addr: str) -> ProviderRecord:
    return ProviderRecord(os.urandom(20), addr, len(DATA), time.time() + 600)


@pytest.fixture
async def servers(tmp_path):
    running: list = []

    async def honest() -> tuple[PeerServer, str]:
        store = LocalStore(str(tmp_path / f"peer{len(running)}"))
        await commit(store, DATA)
        srv = PeerServer(store)
        port = await srv.start("127.0.0.1", 0)
        running.append(srv.stop)
        return srv, f"127.0.0.1:{port}"

    async def corrupt() -> str:
        """Serves the right length with one flipped byte in every range it sends."""
        async def handler(request: web.Request) -> web.Response:
            rng = request.http_range
            start, stop = rng.start or 0, rng.stop or len(DATA)
            body = bytearray(DATA[start:stop])
            body[0] ^= 0xFF
            return web.Response(body=bytes(body), status=206)

        app = web.Application()
        app.router.add_get("/blobs/{digest}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        running.append(runner.cleanup)
        return f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    yield honest, corrupt
    for stop in running:
        await stop()




@pytest.fixture
async def fetcher(tmp_path):
    f = Fetcher(LocalStore(str(tmp_path / "me")))
    yield f
    await f.close()


async def test_pieces_come_from_several_providers_and_are_committed(fetcher, servers):
    honest, _ = servers
    (s1, a1), (s2, a2) = await honest(), await honest()
    store = fetcher.store
    announced = []
    fetcher.on_committed = lambda d, n: announced.append((d, n))
    fetch = fetcher.start(DIGEST, len(DATA), [record(a1), record(a2)])
    assert fetcher.start(DIGEST, len(DATA), [record(a1)]) is fetch  # concurrent requests share it
    await fetch.task
    assert fetch.committed and open(store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
    assert s1.bytes_sent > 0 and s2.bytes_sent > 0  # both peers served part of it
    assert announced == [(DIGEST, len(DATA))]  # a fetched blob is announced: one more source
    assert os.listdir(fetcher.dir) == []


async def test_a_dead_provider_is_skipped(fetcher, servers):
    honest, _ = servers
    _, good = await honest()
    fetch = fetcher.start(DIGEST, len(DATA), [record("127.0.0.1:1"), record(good)])
    await fetch.task
    assert fetch.committed and set(fetch.bytes_from) == {good}


async def test_corrupt_bytes_are_never_committed_and_readers_fail(fetcher, servers):
    _, corrupt = servers
    bad = await corrupt()
    store = fetcher.store
    fetch = fetcher.start(DIGEST, len(DATA), [record(bad)])
    with pytest.raises(FetchFailed, match="do not match"):
        await fetch.wait_range(fetch.size - 1, 1)
    await fetch.task
    assert not fetch.committed
    assert not os.path.exists(store.blobs.blob_path(DIGEST[7:]))
    assert os.listdir(fetcher.dir) == []  # partial data discarded
    assert fetcher.recently_failed(DIGEST)  # containerd's retry goes to the registry


async def test_no_live_provider_fails_clearly(fetcher):
    fetch = fetcher.start(DIGEST, len(DATA), [record("127.0.0.1:1"), record("127.0.0.1:2")])
    with pytest.raises(FetchFailed, match="no provider left"):
        await asyncio.wait_for(fetch.wait_range(0, 1), 30)
    assert os.listdir(fetcher.dir) == []


async def test_a_corrupt_provider_among_honest_ones_is_found_and_banned(fetcher, servers):
    honest, corrupt = servers
    _, good = await honest()
    bad = await corrupt()
    store = fetcher.store
    fetch = fetcher.start(DIGEST, len(DATA), [record(good), record(bad)])
    await fetch.wait_range(0, fetch.size)  # readers get the verified blob
    await fetch.task
    assert fetch.committed and open(store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
    assert bad in fetcher.banned and good not in fetcher.banned
    # A banned provider is not asked again.
    os.unlink(store.blobs.blob_path(DIGEST[7:]))
    again = fetcher.start(DIGEST, len(DATA), [record(good), record(bad)])
    await again.task
    assert set(again.bytes_from) == {good}


async def test_providers_found_later_join_the_fetch(fetcher, servers):
    honest, _ = servers
    _, good = await honest()

    async def full_lookup():
        return [record(good)]

    # Info met only a dead provider; the full lookup finds a live one.
    fetch = fetcher.start(DIGEST, len(DATA), [record("127.0.0.1:1")], more=full_lookup)
    await fetch.task
    assert fetch.committed and set(fetch.bytes_from) == {good}
