"""containerd may give up on a Write while its COMMIT is in the commit thread (fsync and
rename, which cannot be stopped).  The writer's file and its ref stay with that thread until
it ends, and a blob that did land is announced like any other (issue: hardening, item 4)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import grpc
import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p.api import content_pb2_grpc as pb_grpc
from cs_p2p.service import content_handler
from cs_p2p.service.content import ContentService
from cs_p2p.store import LocalStore


class Events:
    def __init__(self) -> None:
        self.committed_digests: list[str] = []

    def committed(self, digest: str, size: int) -> None:
        self.committed_digests.append(digest)

    def deleted(self, digest: str) -> None:
        pass

    def kept(self, digest: str) -> None:
        pass


async def until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_a_write_cancelled_during_its_commit_still_commits_and_announces(tmp_path):
    store = LocalStore(str(tmp_path / "root"))
    events = Events()
    entered, release = threading.Event(), threading.Event()
    handlers: list[asyncio.Task] = []  # the Write handler's task
    real_commit = store.blobs.commit_file

    def slow_commit(fd, path, digest, labels):  # the commit thread, held in its fsync
        entered.set()
        release.wait(30)
        real_commit(fd, path, digest, labels)

    store.blobs.commit_file = slow_commit

    class Watched(ContentService):
        async def Write(self, request_iterator, context):
            handlers.append(asyncio.current_task())
            async for resp in super().Write(request_iterator, context):
                yield resp

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((content_handler(Watched(store, events)),))
    sock = str(tmp_path / "cs.sock")
    server.add_insecure_port("unix:" + sock)
    await server.start()
    try:
        async with grpc.aio.insecure_channel("unix:" + sock) as ch:
            data = os.urandom(1 << 20)
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            call = pb_grpc.ContentStub(ch).Write()
            await call.write(pb.WriteContentRequest(action=pb.WRITE, ref="r1", total=len(data), data=data))
            await call.read()
            await call.write(pb.WriteContentRequest(action=pb.COMMIT, ref="r1", total=len(data),
                                                    offset=len(data), expected=digest))
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            call.cancel()  # containerd gives up mid-commit
            await until(lambda: handlers[0].cancelling() or handlers[0].done(), 30, "the server to see the cancellation")
            for _ in range(10):
                await asyncio.sleep(0)  # the handler's task is cancelled: without the fix it closes the writer
            release.set()
            await until(lambda: digest in events.committed_digests, 30, "the blob to be announced")
            assert store.blobs.info(digest).size == len(data)
            with open(store.blobs.blob_path(digest[7:]), "rb") as f:
                assert f.read() == data
    finally:
        release.set()
        await server.stop(None)
