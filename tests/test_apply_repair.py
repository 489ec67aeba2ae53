"""The layer applier and a peer that sends corrupt bytes: the worker has already read the
bad pieces by the time the digest check fails, so once the registry has replaced them the
snapshot is emptied and the layer applied again from the verified blob."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import time
from typing import Awaitable, Callable

import pytest
from aiohttp import web

from cs_p2p.apply.pool import ApplyPool
from cs_p2p.apply.worker import Target
from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.errors import Aborted
from cs_p2p.fetch.fetcher import Fetcher
from cs_p2p.fetch.pieces import PIECE
from cs_p2p.store import LocalStore
from tests.test_diff_service import layer_tar
from tests.test_fetcher import HttpOrigin, serve_blobs


def layer() -> tuple[bytes, bytes, dict[str, bytes]]:
    files = {f"dir/f{i}": os.urandom(3 << 20) for i in range(3)}  # incompressible: three pieces
    tar = layer_tar(files)
    return tar, gzip.compress(tar, compresslevel=1), files


def ranges_of(blob: bytes, flip: bool = False, before: Callable[[], Awaitable[None]] | None = None):
    """A handler serving `blob` by Range, as a peer or a registry does; with `flip`, one byte of
    every range wrong (in its middle, inside a file's bytes: the tar still parses); `before`
    is awaited before each answer."""
    async def handler(request: web.Request) -> web.Response:
        if before is not None:
            await before()
        rng = request.http_range
        start, stop = rng.start or 0, len(blob) if rng.stop is None else rng.stop
        body = bytearray(blob[start:stop])
        if flip:
            body[len(body) // 2] ^= 0xFF
        return web.Response(body=bytes(body), status=206)
    return handler


def streaming_pool(tmp_path, store: LocalStore) -> ApplyPool:
    """One apply worker, reading committed blobs from `store`."""
    return ApplyPool(1, str(tmp_path / "fifos"), lambda d: store.blobs.blob_path(d.split(":")[1]))


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "tar"])
async def test_a_layer_streamed_from_a_liar_is_applied_again_from_the_verified_blob(tmp_path, compressed):
    """gzip: the worker finds the liar's bytes corrupt (its checksum) and stops; a plain tar
    applies them without noticing.  Either way the layer is applied again once verified."""
    tar, blob, files = layer()
    blob = blob if compressed else tar
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert len(blob) > 2 * PIECE

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    async def liar_read() -> None:  # the registry answers once the worker is writing what the liar sent
        deadline = time.monotonic() + 30
        while not (snapshot / "dir" / "f0").exists():
            assert time.monotonic() < deadline, "the worker never started on the liar's bytes"
            await asyncio.sleep(0.01)

    liar_runner, liar = await serve_blobs(ranges_of(blob, flip=True))
    registry_runner, registry = await serve_blobs(ranges_of(blob, before=liar_read))
    origin = HttpOrigin(f"http://{registry}")
    store = LocalStore(str(tmp_path / "store"))
    commit_file = store.blobs.commit_file

    def slow_commit(*args) -> None:  # a slow disk: the worker is done with the stream long before
        time.sleep(0.5)
        commit_file(*args)

    store.blobs.commit_file = slow_commit
    fetcher = Fetcher(store, origin=lambda d: origin)
    pool = streaming_pool(tmp_path, store)
    try:
        fetch = fetcher.start(digest, len(blob), [ProviderRecord(os.urandom(20), liar, len(blob), time.time() + 60)])
        diff_id, size = await pool.apply_fetch(fetch, Target("dir", str(snapshot)), sync_fs=False)
    finally:
        pool.close()
        await fetcher.close()
        await origin.session.close()
        await liar_runner.cleanup()
        await registry_runner.cleanup()
    assert fetch.committed and fetch.repaired and fetch.bytes_from["registry"] == len(blob)
    assert (diff_id, size) == ("sha256:" + hashlib.sha256(tar).hexdigest(), len(tar))
    got = {str(p.relative_to(snapshot)): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
    assert got == files


async def test_a_streamed_layer_whose_blob_never_verifies_is_not_applied(tmp_path):
    """Everything but the blob's last byte is applied as it arrives; without a match that byte
    never comes, and the apply fails even where the worker could end there (a plain tar)."""
    tar, _, _ = layer()
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()

    runner, addr = await serve_blobs(ranges_of(tar, flip=True))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    store = LocalStore(str(tmp_path / "store"))
    fetcher = Fetcher(store)
    pool = streaming_pool(tmp_path, store)
    try:
        fetch = fetcher.start(digest, len(tar), [ProviderRecord(os.urandom(20), addr, len(tar), time.time() + 60)])
        with pytest.raises(Aborted, match="do not match"):
            await pool.apply_fetch(fetch, Target("dir", str(snapshot)), sync_fs=False)
    finally:
        pool.close()
        await fetcher.close()
        await runner.cleanup()
    assert not fetch.committed


async def test_a_streamed_layer_whose_blob_cannot_be_committed_is_not_applied(tmp_path):
    """The worker gets the last byte once the digest matched, while the commit's fsyncs run;
    if the commit then fails (a full disk), the apply fails too: no layer without its blob."""
    tar, blob, _ = layer()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()

    runner, addr = await serve_blobs(ranges_of(blob))
    origin = HttpOrigin(f"http://{addr}")
    store = LocalStore(str(tmp_path / "store"))

    def full_disk(*args) -> None:
        time.sleep(0.5)  # the worker is done with the stream first
        raise OSError(28, "No space left on device")

    store.blobs.commit_file = full_disk
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    fetcher = Fetcher(store, origin=lambda d: origin)
    pool = streaming_pool(tmp_path, store)
    try:
        fetch = fetcher.start(digest, len(blob), [], origin=origin, origin_first=True)
        with pytest.raises(Aborted, match="No space left"):
            await pool.apply_fetch(fetch, Target("dir", str(snapshot)), sync_fs=False)
    finally:
        pool.close()
        await fetcher.close()
        await origin.session.close()
        await runner.cleanup()
    assert fetch.verified and not fetch.committed
