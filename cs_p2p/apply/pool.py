"""Layers are applied in worker processes, so that several layers use several cores and the
event loop (which serves containerd's content calls meanwhile) never waits on tar work.

A committed blob is read by the worker straight from its file. A blob still arriving from
peers is handed over through a FIFO that the daemon feeds as pieces land (sendfile from the
partial file, its last byte only once the whole blob's digest matched), so the layer is
extracted while it downloads and never completes from unverified bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import multiprocessing
import os
import time
import uuid
from concurrent.futures.process import BrokenProcessPool
from typing import Callable

from ..errors import Aborted, LayerRejected
from ..fetch.pieces import Fetch, FetchFailed
from ..timeline import TIMELINE
from . import worker
from .layerfs import InvalidLayer
from .worker import Target

log = logging.getLogger("cs_p2p.apply")

FEED_CHUNK = 1 << 20
# Bytes at a streamed blob's end fed only once its digest matched: everything before them is
# applied while the digest is checked, and the worker cannot finish without them (it reads its
# input to the end), so a layer whose blob does not verify never applies.
HELD = 1
PIPE_SIZE = 1 << 20


class ApplyPool:
    def __init__(self, workers: int, fifo_dir: str, committed_path: Callable[[str], str]) -> None:
        self.workers = max(1, workers)
        self.committed_path = committed_path  # digest -> where the store keeps it once committed
        self.fifo_dir = fifo_dir
        os.makedirs(fifo_dir, exist_ok=True)
        for name in os.listdir(fifo_dir):  # FIFOs of a previous run
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(fifo_dir, name))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._slots = asyncio.Semaphore(workers)
        # FIFO feeders block (on open until a worker reads, on a full pipe): threads of their
        # own, so that queued applies never starve the default executor Read and Write use.
        self._feeders = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="apply-feed")

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork (grpc's threads) nor forkserver: a forkserver outlives a killed
            # daemon, held alive by its workers, and they by it; spawned workers are the daemon's
            # own children and die with it (PR_SET_PDEATHSIG).
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker.init_worker)
        return self._pool

    def prestart(self) -> None:
        """Start every worker now rather than at the first layer: a spawned worker costs
        ~0.1 s and ~0.1 CPU-s to start (an interpreter, then this package's imports)."""
        executor = self._executor()
        for _ in range(self.workers):
            executor.submit(worker.ready)  # one each: a submit finding no idle worker spawns one

    def close(self) -> None:
        """Waits for layers being applied: containerd is told of their end (or of ours) anyway."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._feeders.shutdown(wait=False, cancel_futures=True)

    async def apply_file(self, path: str, target: Target, sync_fs: bool) -> tuple[str, int]:
        return await self._run(path, target, sync_fs)

    async def apply_fetch(self, fetch: Fetch, target: Target, sync_fs: bool) -> tuple[str, int]:
        """Apply a blob as a peer fetch writes it.  If pieces the worker already read were
        replaced afterwards (a provider sent corrupt bytes, or the registry finished the blob
        after a peer's pieces did not verify), the snapshot is emptied and the layer applied
        again from the verified blob."""
        try:
            result = await self._apply_streaming(fetch, target, sync_fs)
        except LayerRejected:
            if fetch.task is not None:
                await asyncio.wait([fetch.task])  # rejected because of bytes replaced since?
            if not (fetch.committed and fetch.repaired):
                raise
        if fetch.task is not None:
            # the last byte came once the digest matched, before the commit's fsyncs: a layer is
            # applied only with its blob kept (a failed commit fails the pull, as in containerd)
            await asyncio.wait([fetch.task])
        if not fetch.committed:
            raise Aborted(f"fetching {fetch.digest} failed: {fetch.error}")
        if not fetch.repaired:
            return result
        log.warning("layer applied again from the verified blob", extra={"digest": fetch.digest})
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor(), worker.clear_target, target)
        return await self.apply_file(self.committed_path(fetch.digest), target, sync_fs)

    async def _apply_streaming(self, fetch: Fetch, target: Target, sync_fs: bool) -> tuple[str, int]:
        fifo = os.path.join(self.fifo_dir, uuid.uuid4().hex)
        os.mkfifo(fifo, 0o600)
        try:
            job = asyncio.ensure_future(self._run(fifo, target, sync_fs))
            feeder = asyncio.ensure_future(self._feed(fetch, fifo))
            try:
                await asyncio.wait({job, feeder}, return_when=asyncio.FIRST_COMPLETED)
                if job.done() and not feeder.done():
                    _unblock_writer(fifo)  # the worker gave up before reading it all
                    feeder.cancel()
                with contextlib.suppress(asyncio.CancelledError, BrokenPipeError, FetchFailed):
                    await feeder
                if feeder.done() and not feeder.cancelled() and isinstance(feeder.exception(), FetchFailed):
                    job.cancel()
                    raise Aborted(f"fetching {fetch.digest} from peers failed: {feeder.exception()}")
                return await job
            finally:
                job.cancel()
                feeder.cancel()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(fifo)

    async def _feed(self, fetch: Fetch, fifo: str) -> None:
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(self._feeders, os.open, fifo, os.O_WRONLY | os.O_CLOEXEC)
        try:
            out = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the open may still complete: its fd must not leak
            opening.add_done_callback(lambda f: f.cancelled() or f.exception() or os.close(f.result()))
            raise
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(out, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
            src = fetch.open(self.committed_path(fetch.digest))
            try:
                offset = 0
                while offset < fetch.size:
                    before_tail = fetch.size - HELD - offset
                    n = min(FEED_CHUNK, before_tail) if before_tail > 0 else fetch.size - offset
                    await fetch.wait_range(offset, n, verified_tail=True)
                    sent = await loop.run_in_executor(self._feeders, _send, out, src, offset, n)
                    offset += sent
            finally:
                os.close(src)
        finally:
            os.close(out)

    async def _run(self, source: str, target: Target, sync_fs: bool) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        async with self._slots:  # one layer per worker: the wait for a free one is measured
            TIMELINE.waited("apply_worker", time.monotonic() - t0)
            return await self._apply(loop, source, target, sync_fs)

    async def _apply(self, loop: asyncio.AbstractEventLoop, source: str, target: Target,
                     sync_fs: bool) -> tuple[str, int]:
        try:
            return await loop.run_in_executor(self._executor(), worker.apply_layer, source, target, sync_fs)
        except BrokenProcessPool:
            # Not retried: the snapshot is half written; containerd discards it and retries.
            self._pool = None
            raise Aborted("the apply worker died") from None
        except InvalidLayer as exc:
            raise LayerRejected(str(exc)) from None


def _send(out: int, src: int, offset: int, n: int) -> int:
    done = 0
    while done < n:
        sent = os.sendfile(out, src, offset + done, n - done)
        if sent == 0:
            raise FetchFailed("the fetched file is shorter than the blob")
        done += sent
    return done


def _unblock_writer(fifo: str) -> None:
    """A writer blocked opening a FIFO nobody will read: open it for reading once."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
