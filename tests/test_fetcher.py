"""The multi-source fetcher against real HTTP peers: honest, dead and corrupt ones."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import aiohttp
import pytest
from aiohttp import web

from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.fetch.fetcher import Fetcher
from cs_p2p.fetch.pieces import PIECE, RELAY_STEP, Fetch, FetchFailed
from cs_p2p.peer.server import PeerServer
from cs_p2p.store import LocalStore
from tests.test_peer_server import commit, wait_until

DATA = os.urandom(3 * PIECE + 12345)  # four pieces
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def record(addr: str) -> ProviderRecord:
    return ProviderRecord(os.urandom(20), addr, len(DATA), time.time() + 600)


async def serve_blobs(handler) -> tuple[web.AppRunner, str]:
    """A misbehaving peer: `handler` answers GET /blobs/{digest}; returns its runner and address."""
    app = web.Application()
    app.router.add_get("/blobs/{digest}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


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

        runner, addr = await serve_blobs(handler)
        running.append(runner.cleanup)
        return addr

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


async def test_the_applier_gets_the_last_bytes_once_they_verify_a_reader_once_they_are_committed(fetcher, servers):
    """The applier finishes a layer while the commit's fsyncs run, not after them (it answers
    containerd only once the commit is done); a `Read` of the blob's end waits for the commit."""
    honest, _ = servers
    _, good = await honest()
    store = fetcher.store
    release = threading.Event()
    commit_file = store.blobs.commit_file

    def slow_commit(*args) -> None:
        assert release.wait(30)
        commit_file(*args)

    store.blobs.commit_file = slow_commit
    fetch = fetcher.start(DIGEST, len(DATA), [record(good)])
    reader = asyncio.ensure_future(fetch.wait_range(fetch.size - 1, 1))
    try:
        await asyncio.wait_for(fetch.wait_range(fetch.size - 1, 1, verified_tail=True), 20)
        assert fetch.verified and not fetch.committed  # the commit is still held
        fd = fetch.open(store.blobs.blob_path(DIGEST[7:]))
        try:
            assert os.pread(fd, 4096, fetch.size - 4096) == DATA[-4096:]
        finally:
            os.close(fd)
        assert not reader.done()
    finally:
        release.set()
    await asyncio.wait_for(reader, 20)
    await fetch.task
    assert fetch.committed and open(store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA


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


async def test_a_fetch_containerd_relies_on_looks_again_when_its_relay_is_gone(fetcher, servers):
    """A relay whose own fetch ended answers 404 while its in-flight record lingers.  A fetch
    `Info` answered for (`only_way`: containerd will not download the blob) and that has no
    registry behind it looks again instead of failing the pull, and follows the node that
    holds the blob by now."""
    honest, _ = servers
    _, holder = await honest()

    async def gone(request: web.Request) -> web.Response:
        return web.Response(status=404)

    runner, relay = await serve_blobs(gone)
    lookups: list[float] = []

    async def lookup():
        lookups.append(time.monotonic())
        relayed = ProviderRecord(b"r" * 20, relay, len(DATA), time.time() + 600, started=time.time() - 5)
        return [relayed] if len(lookups) < 4 else [relayed, record(holder)]

    try:
        fetch = fetcher.start(DIGEST, len(DATA), [], more=lookup)
        fetch.only_way = True
        await fetch.task
        assert fetch.committed and set(fetch.bytes_from) == {holder}, fetch.error
        assert len(lookups) == 4  # the first, the fetch's own, two more after the relay failed it
        # Without `only_way` (containerd downloads it itself if this fails) nobody waits on a new lookup.
        os.unlink(fetcher.store.blobs.blob_path(DIGEST[7:]))
        lookups.clear()
        again = fetcher.start(DIGEST, len(DATA), [], more=lookup)
        await again.task
        assert not again.committed and "no provider left" in (again.error or "") and len(lookups) == 2
    finally:
        await runner.cleanup()


class HttpOrigin:
    """The blob's registry, as the mirror's `RegistryOrigin` presents it: ranges over HTTP."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession()
        self.ranges: list[tuple[int, int]] = []

    async def open_range(self, digest: str, start: int, end: int):
        self.ranges.append((start, end))
        return await self.session.get(f"{self.base}/blobs/{digest}", headers={"Range": f"bytes={start}-{end - 1}"})


@pytest.fixture
async def registry_origin(servers):
    """A registry holding DATA (a peer server stands in for its blob endpoint)."""
    honest, _ = servers
    _, addr = await honest()
    origin = HttpOrigin(f"http://{addr}")
    yield origin
    await origin.session.close()


async def test_when_every_provider_dies_the_registry_finishes_the_blob(fetcher, servers, registry_origin):
    fetcher.origin = lambda digest: registry_origin if digest == DIGEST else None
    fetch = fetcher.start(DIGEST, len(DATA), [record("127.0.0.1:1"), record("127.0.0.1:2")])
    await fetch.wait_range(0, fetch.size, trusted_only=True)
    await fetch.task
    assert fetch.committed and open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
    assert fetch.bytes_from == {"registry": len(DATA)}
    assert covered_once(registry_origin.ranges, len(DATA))  # a few long ranges, each byte asked once
    assert not fetcher.recently_failed(DIGEST)


def covered_once(ranges: list[tuple[int, int]], size: int) -> bool:
    at = 0
    for start, end in sorted(ranges):
        if start != at:
            return False
        at = end
    return at == size


def test_registry_requests_are_few_and_long():
    from cs_p2p.fetch.fetcher import REGISTRY_SPAN, REGISTRY_STREAMS, registry_spans

    big = 256 << 20
    spans = registry_spans(list(range(big // PIECE)), big)
    assert len(spans) == REGISTRY_STREAMS and spans[0] == (0, big // PIECE // REGISTRY_STREAMS - 1)
    assert registry_spans([0, 1, 2], 3 * PIECE) == [(0, 2)]  # a small blob: one request
    assert len(registry_spans(list(range(REGISTRY_SPAN // PIECE * 2)), 2 * REGISTRY_SPAN)) == 2
    assert registry_spans([1, 2, 5, 7], 8 * PIECE) == [(1, 2), (5, 5), (7, 7)]  # gaps: holes left by peers


async def test_a_registry_response_that_breaks_off_is_resumed_where_it_stopped(fetcher, tmp_path):
    """The registry resets the connection halfway through its first answer: the fetch asks
    again from the first piece it does not have, and the blob verifies."""
    asked: list[tuple[int, int]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        rng = request.http_range
        start, stop = rng.start or 0, rng.stop or len(DATA)
        asked.append((start, stop))
        resp = web.StreamResponse(status=206, headers={"Content-Length": str(stop - start)})
        await resp.prepare(request)
        if len(asked) == 1:
            await resp.write(DATA[start:start + PIECE + 100])  # one piece and a bit, then gone
            request.transport.close()
            return resp
        await resp.write(DATA[start:stop])
        return resp

    runner, addr = await serve_blobs(handler)
    origin = HttpOrigin(f"http://{addr}")
    try:
        fetch = fetcher.start(DIGEST, len(DATA), [], origin=origin)
        await fetch.task
        assert fetch.committed and open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
        assert asked == [(0, len(DATA)), (PIECE, len(DATA))]  # the second answer starts after the piece it had
    finally:
        await origin.session.close()
        await runner.cleanup()


async def test_a_registry_that_refuses_fails_the_fetch_with_its_reason(fetcher):
    class Refusing:
        async def open_range(self, digest: str, start: int, end: int):
            raise FetchFailed("registry.example: GET team/app/blobs/... answered 401 Unauthorized")

    fetch = fetcher.start(DIGEST, len(DATA), [], origin=Refusing())
    await asyncio.wait([fetch.task])
    assert not fetch.committed and "401 Unauthorized" in fetch.error
    assert "401 Unauthorized" in fetcher.recently_failed(DIGEST)  # what Info, Read and Apply say next


async def test_a_claimed_fetch_waits_out_a_burst_of_claims_but_not_a_reader(fetcher, registry_origin, dht_nodes,
                                                                          monkeypatch):
    """A claimed fetch holds off while claims keep coming (containerd's `Info` burst, answered
    inside its metadata transaction), however long that is: here longer than the test lasts.
    A reader of the blob ends the hold at once."""
    from cs_p2p.fetch import source
    from cs_p2p.fetch.origin import Claimable

    monkeypatch.setattr(source, "CLAIM_QUIET", 600.0)
    monkeypatch.setattr(source, "CLAIM_HOLD", 600.0)
    peers = source.PeerSource(await dht_nodes(), fetcher,
                              origin_claim=lambda d: Claimable(len(DATA), registry_origin, False))
    fetch = peers.claim(DIGEST)
    assert fetch is not None and registry_origin.ranges == []
    await asyncio.wait_for(fetch.wait_range(0, fetch.size), 20)
    await fetch.task
    assert fetch.committed and registry_origin.ranges


async def test_a_blob_fetched_registry_first_asks_no_peer_while_the_registry_answers(fetcher, registry_origin):
    asked = []

    async def lookup():
        asked.append(True)
        return []

    fetch = fetcher.start(DIGEST, len(DATA), [], origin=registry_origin, more=lookup, origin_first=True)
    await fetch.task
    assert fetch.committed and fetch.bytes_from == {"registry": len(DATA)} and asked == []


@pytest.mark.parametrize("registry", ["refusing", "corrupt"])
async def test_a_blob_fetched_registry_first_comes_from_peers_when_the_registry_fails(fetcher, servers, registry):
    honest, _ = servers
    _, good = await honest()

    class Refusing:
        async def open_range(self, digest: str, start: int, end: int):
            raise FetchFailed("registry.example: GET team/app/blobs/... answered 503 Service Unavailable")

    async def corrupt(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bytes(len(DATA)))  # the whole blob (Range ignored), all zeros

    runner = None
    if registry == "corrupt":
        runner, addr = await serve_blobs(corrupt)
        origin = HttpOrigin(f"http://{addr}")
    else:
        origin = Refusing()

    async def lookup():
        return [record(good)]

    try:
        fetch = fetcher.start(DIGEST, len(DATA), [], origin=origin, more=lookup, origin_first=True)
        await fetch.task
        assert fetch.committed and open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
        assert fetch.bytes_from.get(good) == len(DATA)
    finally:
        if runner:
            await origin.session.close()
            await runner.cleanup()


async def test_corrupt_pieces_no_peer_can_replace_are_fetched_again_from_the_registry(fetcher, servers,
                                                                                     registry_origin):
    _, corrupt = servers
    bad = await corrupt()
    fetcher.origin = lambda digest: registry_origin
    fetch = fetcher.start(DIGEST, len(DATA), [record(bad)])
    # Read streams only pieces of proven providers: nothing of the liar's before verification.
    waiting = asyncio.ensure_future(fetch.wait_range(0, PIECE, trusted_only=True))
    await fetch.task
    assert waiting.done() and fetch.committed and fetch.repaired  # the applier re-applies
    assert open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
    assert fetch.bytes_from["registry"] == len(DATA)
    assert bad not in fetcher.proven


async def test_a_stalled_provider_is_dropped_and_the_registry_takes_over(tmp_path, registry_origin):
    released = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers={"Content-Length": str(PIECE)})
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await released.wait()  # no other byte while the fetch runs
        return resp

    runner, stalled = await serve_blobs(stall)
    fetcher = Fetcher(LocalStore(str(tmp_path / "me")), timeout=1.0, origin=lambda d: registry_origin)
    try:
        fetch = fetcher.start(DIGEST, len(DATA), [record(stalled)])
        await asyncio.wait_for(fetch.task, 30)
        assert fetch.committed and fetch.bytes_from == {"registry": len(DATA)}
    finally:
        released.set()
        await fetcher.close()
        await runner.cleanup()


async def test_info_claims_a_blob_only_from_a_provider_that_answers(fetcher, servers):
    honest, _ = servers
    _, good = await honest()
    dead, other_blob = record("127.0.0.1:1"), ProviderRecord(os.urandom(20), good, len(DATA) + 1, time.time() + 60)
    assert await fetcher.reachable(DIGEST, [dead], within=1) == []
    assert await fetcher.reachable(DIGEST, [other_blob], within=1) == []  # answers, but not this blob
    live = record(good)
    assert await fetcher.reachable(DIGEST, [dead, live], within=1) == [live]
    for _ in range(3):  # a provider that keeps failing the check is banned
        await fetcher.reachable(DIGEST, [dead], within=1)
    assert dead.addr in fetcher.banned


async def test_pieces_go_to_the_provider_that_delivers_them_soonest(fetcher, tmp_path):
    """A fast holder and a slow one (2 MiB/s): the fast one sends most of the blob, rather than
    every other piece in turn."""
    data = os.urandom(10 * PIECE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    addrs, stops = [], []
    for name, rate in (("fast", 0), ("slow", 2 << 20)):
        store = LocalStore(str(tmp_path / name))
        await commit(store, data)
        srv = PeerServer(store, rate_limit=rate)
        addrs.append(f"127.0.0.1:{await srv.start('127.0.0.1', 0)}")
        stops.append(srv.stop)
    try:
        records = [ProviderRecord(os.urandom(20), a, len(data), time.time() + 600) for a in addrs]
        fetch = fetcher.start(digest, len(data), records)
        await fetch.task
        assert fetch.committed
        fast, slow = (fetch.bytes_from.get(a, 0) for a in addrs)
        assert fast + slow == len(data) and slow <= 3 * PIECE, (fast, slow)
    finally:
        for stop in stops:
            await stop()


async def test_a_registry_that_ignores_range_sends_the_blob_once_in_bounded_memory(fetcher, servers):
    """The registry answers every range with 200 and the whole blob: one body streams into
    the file (registry bytes 1x the blob, not one blob per piece), none held in memory."""
    import tracemalloc

    served = []

    async def whole(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Length": str(len(DATA))})
        await resp.prepare(request)
        for i in range(0, len(DATA), 1 << 16):
            chunk = DATA[i:i + (1 << 16)]
            await resp.write(chunk)
            served.append(len(chunk))
        return resp

    runner, addr = await serve_blobs(whole)
    origin = HttpOrigin(f"http://{addr}")
    try:
        fetcher.origin = lambda digest: origin
        tracemalloc.start()
        fetch = fetcher.start(DIGEST, len(DATA), [record("127.0.0.1:1")])
        await fetch.task
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert fetch.committed and open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
        assert fetch.bytes_from == {"registry": len(DATA)}
        assert sum(served) == len(DATA)  # the blob once
        # bounded buffers (the digest check reads 4 MiB at a time), less than the 12 MiB blob
        assert peak < 10 << 20, f"peak {peak >> 20} MiB traced during the fetch"
    finally:
        await origin.session.close()
        await runner.cleanup()


async def test_a_relay_forwards_what_has_landed_and_says_which_pieces_it_has(fetcher, tmp_path):
    """A node fetching a blob serves it on as it lands: bytes of its last piece before that
    piece is whole, and so before the blob is verified (the follower verifies it itself), with
    the pieces it has whole and arriving in a header; its digest follows the whole pieces."""
    from cs_p2p.fetch.pieces import PIECES_HEADER

    gate = asyncio.Event()
    last = 3 * PIECE  # the last piece's first byte

    async def upstream(request: web.Request) -> web.StreamResponse:
        rng = request.http_range
        start, stop = rng.start or 0, rng.stop or len(DATA)
        resp = web.StreamResponse(status=206, headers={"Content-Length": str(stop - start)})
        await resp.prepare(request)
        if start == last:  # the last piece: its first 8 KiB, then the rest once the test says so
            await resp.write(DATA[start:start + 8192])
            await gate.wait()
            start += 8192
        await resp.write(DATA[start:stop])
        return resp

    runner, addr = await serve_blobs(upstream)
    relay = PeerServer(fetcher.store, fetcher=fetcher)
    port = await relay.start("127.0.0.1", 0)
    try:
        fetch = fetcher.start(DIGEST, len(DATA), [record(addr)])
        await wait_until(lambda: fetch.done_pieces == {0, 1, 2} and fetch.landed.get(3, 0) >= 8192, 10,
                         "three pieces and the last one's first bytes")
        await wait_until(lambda: fetch.prefix.offset == last, 10, "the digest to take in the three whole pieces")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/blobs/{DIGEST}", headers={"Range": f"bytes={last}-"}) as r:
                assert r.status == 206 and r.headers[PIECES_HEADER] == "7,8"  # 0-2 whole, 3 arriving
                assert await asyncio.wait_for(r.content.readexactly(8192), 10) == DATA[last:last + 8192]
                assert not fetch.committed
                gate.set()
                assert await r.content.read() == DATA[last + 8192:]
        await fetch.task
        assert fetch.committed and open(fetcher.store.blobs.blob_path(DIGEST[7:]), "rb").read() == DATA
    finally:
        gate.set()
        await relay.stop()
        await runner.cleanup()


def test_a_follower_asks_a_relay_first_for_what_it_has_whole_then_for_what_is_arriving():
    from cs_p2p.fetch.fetcher import _next_piece
    from cs_p2p.fetch.pieces import pieces_of

    todo = [0, 1, 2, 5, 9]
    whole, arriving = pieces_of("220,2")  # pieces 5 and 9 whole, piece 1 arriving
    assert todo[_next_piece(todo, whole, arriving)] == 5
    assert todo[_next_piece(todo, 0, arriving)] == 1
    assert _next_piece(todo, 0, 0) == 0  # nothing known (a holder, or a relay not asked yet): in order
    assert pieces_of("") == pieces_of("zz,1") == (0, 0)  # no header, or a bad one: nothing known


async def test_blobs_fetched_together_come_from_the_registry_in_one_range_each(tmp_path, monkeypatch):
    """Alone, a blob comes in several ranges at once; four at once fill the link already and
    come in one range each, so each arrives in order (what relaying nodes forward at once)."""
    from cs_p2p.fetch import fetcher as fetcher_module

    monkeypatch.setattr(fetcher_module, "REGISTRY_SPAN", PIECE)
    store = LocalStore(str(tmp_path / "registry"))
    blobs = [os.urandom(4 * PIECE) for _ in range(5)]
    digests = [await commit(store, b, ref=f"r{i}") for i, b in enumerate(blobs)]
    registry = PeerServer(store)
    origin = HttpOrigin(f"http://127.0.0.1:{await registry.start('127.0.0.1', 0)}")
    me = Fetcher(LocalStore(str(tmp_path / "me")))
    try:
        alone = me.start(digests[0], len(blobs[0]), [], origin=origin)
        await alone.task
        assert len(origin.ranges) == fetcher_module.REGISTRY_STREAMS
        origin.ranges.clear()
        together = [me.start(d, len(b), [], origin=origin) for d, b in zip(digests[1:], blobs[1:])]
        await asyncio.gather(*(f.task for f in together))
        assert all(f.committed for f in together) and sorted(origin.ranges) == [(0, 4 * PIECE)] * 4
    finally:
        await me.close()
        await origin.session.close()
        await registry.stop()


async def test_the_registry_sends_the_blob_a_reader_waits_on_first(tmp_path):
    """Two blobs stream from the registry at once; containerd reads one (it applies that layer),
    the other not yet.  The one read lands whole while the other has come only in part (its
    response waits in the socket); then the other comes on, whole and verified."""
    size = 32 << 20
    store = LocalStore(str(tmp_path / "registry"))
    blobs = [os.urandom(size) for _ in range(2)]
    digests = [await commit(store, b, ref=f"r{i}") for i, b in enumerate(blobs)]
    registry = PeerServer(store)
    origin = HttpOrigin(f"http://127.0.0.1:{await registry.start('127.0.0.1', 0)}")
    me = Fetcher(LocalStore(str(tmp_path / "me")))
    try:
        read, later = (me.start(d, size, [], origin=origin) for d in digests)
        await asyncio.wait_for(read.wait_landed(size - 1), 30)  # a reader at the end of the first blob
        assert later.bytes_from.get("registry", 0) < size // 2
        await asyncio.wait_for(later.task, 30)
        assert later.committed and open(me.store.blobs.blob_path(digests[1][7:]), "rb").read() == blobs[1]
        await read.task
        assert read.committed
    finally:
        await me.close()
        await origin.session.close()
        await registry.stop()


async def test_a_relay_waiting_on_a_piece_wakes_with_its_bytes_and_with_a_failure():
    fetch = Fetch("sha256:" + "e" * 64, 3 * PIECE, "/nonexistent", 3)
    waiting = asyncio.ensure_future(fetch.wait_landed(PIECE))  # piece 1, nothing of it yet
    await fetch.arrived(0, 4 * RELAY_STEP)  # bytes of another piece
    await asyncio.sleep(0)
    assert not waiting.done()
    await fetch.arrived(1, RELAY_STEP - 1)  # less than a step: not yet
    await asyncio.sleep(0)
    assert not waiting.done()
    await fetch.arrived(1, RELAY_STEP)
    assert await asyncio.wait_for(waiting, 1) == PIECE + RELAY_STEP
    later = asyncio.ensure_future(fetch.wait_landed(PIECE + RELAY_STEP))
    await asyncio.sleep(0)
    fetch.error = "the registry answered 500"
    await fetch._notify()
    with pytest.raises(FetchFailed, match="500"):
        await asyncio.wait_for(later, 1)
