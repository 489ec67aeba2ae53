"""The peer transfer server: what another node's fetcher sees over HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp
import pytest

from cs_p2p.peer.server import PeerServer
from cs_p2p.store import LocalStore


async def commit(store: LocalStore, data: bytes, ref: str = "r") -> str:
    w = store.ingests.open_writer(ref, len(data), "")
    await w.write(data)
    digest = w.commit_sync(len(data), "", {})
    return digest


@pytest.fixture
async def peer(tmp_path):
    servers = []

    async def start(**kw):
        store = LocalStore(str(tmp_path / f"root{len(servers)}"))
        srv = PeerServer(store, **kw)
        port = await srv.start("127.0.0.1", 0)
        servers.append(srv)
        return store, srv, f"http://127.0.0.1:{port}"

    yield start
    for srv in servers:
        await srv.stop()


async def test_get_head_and_ranges(peer):
    store, _, base = await peer()
    data = os.urandom(3 << 20)
    digest = await commit(store, data)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/blobs/{digest}") as r:
            assert r.status == 200 and await r.read() == data
            assert r.headers["Docker-Content-Digest"] == digest
        async with s.head(f"{base}/blobs/{digest}") as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == len(data)
        for rng, expect in [("bytes=10-19", data[10:20]), ("bytes=100-", data[100:]), ("bytes=-5", data[-5:])]:
            async with s.get(f"{base}/blobs/{digest}", headers={"Range": rng}) as r:
                assert r.status == 206, rng
                assert await r.read() == expect, rng
        async with s.get(f"{base}/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"}) as r:
            assert r.status == 416


async def test_unknown_malformed_and_uncommitted_blobs(peer):
    store, _, base = await peer()
    w = store.ingests.open_writer("in-flight", 10, "")
    await w.write(b"12345")
    partial = "sha256:" + hashlib.sha256(b"12345").hexdigest()
    async with aiohttp.ClientSession() as s:
        for path, status in [(f"/blobs/{partial}", 404), ("/blobs/sha256:xyz", 400),
                             ("/blobs/sha256:" + "0" * 64, 404), ("/blobs/..%2F..%2Fetc%2Fpasswd", 400)]:
            async with s.get(base + path) as r:
                assert r.status == status, path
    w.close()


async def test_full_upload_slots_answer_503_and_rate_limit_paces(peer):
    rate = 2 << 20
    store, srv, base = await peer(max_uploads=1, rate_limit=rate, slot_wait=0.1)
    data = os.urandom(5 << 20)
    digest = await commit(store, data)
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        first = asyncio.ensure_future(s.get(f"{base}/blobs/{digest}"))
        deadline = time.monotonic() + 10
        while srv.active == 0:  # wait until the first upload holds the only slot
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        async with s.get(f"{base}/blobs/{digest}") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"
        r1 = await first
        assert await r1.read() == data
        elapsed = time.monotonic() - t0
    # One second of burst, then `rate` bytes per second: 5 MiB at 2 MiB/s takes >= 1.5 s.
    assert elapsed >= (len(data) - rate) / rate * 0.9
    assert srv.bytes_sent == len(data)


def test_daemon_serves_committed_blobs_to_peers(workdir):
    """`cs-p2p serve --peer-listen`: a blob committed through containerd's API is fetchable."""
    import urllib.error
    import urllib.request

    from cs_p2p.api import content_pb2 as pb
    from cs_p2p_dev.processes import CsP2P, free_port
    from tests.conftest import commit_via_socket, content_stub

    port = free_port()
    # Without a cache: with one, a deleted blob stays served (tests/integration/test_cache.py).
    cs = CsP2P(os.path.join(workdir, "cs"), ["--peer-listen", f"127.0.0.1:{port}", "--cache-max-bytes", "0"]).start()
    try:
        data = os.urandom(100_000)
        digest = commit_via_socket(cs, data)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/blobs/{digest}", timeout=10) as r:
            assert r.read() == data
        stub_ch, stub = content_stub(cs)
        stub.Delete(pb.DeleteContentRequest(digest=digest))
        stub_ch.close()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/blobs/{digest}", timeout=10)
        assert exc.value.code == 404  # deleted by containerd's GC: no longer served
    finally:
        cs.stop()


async def test_blobs_are_sent_once_and_the_connection_is_kept_alive(peer, caplog):
    """aiohttp prepares what a handler returns again: a blob already sent must not be sent
    twice (an error, and the connection dropped after every piece)."""
    store, _, base = await peer()
    data = os.urandom(100_000)
    digest = await commit(store, data)
    caplog.set_level("ERROR", logger="aiohttp.server")
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(f"{base}/blobs/{digest}", headers={"Range": "bytes=0-9"}) as r:
                assert r.status == 206 and await r.read() == data[:10]
            async with s.get(f"{base}/blobs/{digest}") as r:
                assert await r.read() == data
        assert len(s.connector._conns) == 1  # one kept-alive connection served every request
    assert not [r for r in caplog.records if r.name == "aiohttp.server"]


async def test_a_proof_of_storage_is_the_hash_of_the_nonce_and_the_range_signed_in_key_pair_mode(peer):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cs_p2p.proofs import MAX_RANGE, SIG_HEADER, Challenge, signable

    key = Ed25519PrivateKey.generate()
    store, _, base = await peer(signer=key.sign)
    data = os.urandom(1 << 20)
    digest = await commit(store, data)
    nonce = os.urandom(16)
    ch = Challenge(digest, nonce, 1000, 4096)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/proofs/{digest}?{ch.query}") as r:
            assert r.status == 200
            result = await r.text()
            sig = bytes.fromhex(r.headers[SIG_HEADER])
        assert result == hashlib.sha256(nonce + data[1000:5096]).hexdigest()
        key.public_key().verify(sig, signable(ch, result))  # raises if not the holder's signature
        unknown = "sha256:" + "0" * 64
        for path, status in [
            (f"/proofs/{unknown}?{ch.query}", 404),  # not held
            (f"/proofs/{digest}?nonce=00&offset=0&length=10", 400),  # nonce too short to be fresh
            (f"/proofs/{digest}?nonce={nonce.hex()}&offset=0&length={MAX_RANGE + 1}", 400),  # too much work
            (f"/proofs/{digest}?nonce={nonce.hex()}&offset={len(data) - 10}&length=20", 416),  # past the end
        ]:
            async with s.get(base + path) as r:
                assert r.status == status, path


async def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def growing_blob(store: LocalStore, size: int, written: int):
    """A blob being written (published to peers as an in-flight download), `written` bytes in."""
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    w = store.ingests.open_writer(f"layer-{digest}", size, digest)
    await w.write(data[:written])
    assert store.ingests.publish(digest, w)
    return w, digest


async def test_an_upload_waiting_on_a_growing_blob_frees_its_slot_when_the_client_leaves(peer):
    store, srv, base = await peer(max_uploads=1)
    w, digest = await growing_blob(store, 2 << 20, 1 << 20)
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.get(f"{base}/blobs/{digest}")
            assert r.status == 200
            await r.content.readexactly(1 << 20)  # what is there; the rest never comes
            await wait_until(lambda: srv.active == 1, 10, "the upload to hold its slot")
            r.close()  # the client leaves
        await wait_until(lambda: srv.active == 0, 10, "the slot to come free")
    finally:
        w.close()


async def test_an_upload_on_a_blob_that_stopped_growing_ends_and_frees_its_slot(peer):
    store, srv, base = await peer(max_uploads=1, stall_seconds=0.5)
    w, digest = await growing_blob(store, 2 << 20, 1 << 20)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/blobs/{digest}") as r:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()  # cut short of its Content-Length: the client knows it failed
            assert srv.active == 0
    finally:
        w.close()


async def test_a_download_that_ends_before_its_first_byte_is_a_503_to_ask_again(peer):
    """A follower's ingest handed over (or abandoned) before it had a byte of the range: not a
    response cut short, which fetchers count as the provider failing."""
    store, srv, base = await peer()
    w, digest = await growing_blob(store, 2 << 20, 0)
    async with aiohttp.ClientSession() as s:
        asking = asyncio.ensure_future(s.get(f"{base}/blobs/{digest}", headers={"Range": "bytes=0-1023"}))
        await wait_until(lambda: srv.active == 1, 10, "the request to wait for bytes")
        w.close()  # the download ends without a byte
        r = await asking
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        r.close()
    assert srv.active == 0
