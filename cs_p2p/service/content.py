"""containerd.services.content.v1.Content over the local store.

Behaviour follows containerd's own content service + `content/local` store, because
containerd's metadata layer, `ctr` and the CRI plugin rely on its exact codes:
UNAVAILABLE only for a ref locked by another writer (clients retry it forever),
OUT_OF_RANGE for writes away from the current offset and reads past the end,
FAILED_PRECONDITION for size/digest mismatches, ALREADY_EXISTS for a known digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Protocol

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .. import metrics
from ..api import content_pb2 as pb
from ..api import content_pb2_grpc as pb_grpc
from ..digests import parse_digest
from ..errors import Aborted, AlreadyExists, InvalidArgument, NotFound, OutOfRange
from ..fetch.pieces import Fetch, FetchFailed
from ..filters import info_adaptor, parse_filters, status_adaptor
from ..store import BlobInfo, IngestStatus, IngestWriter, LocalStore
from ..store.ingest import digest_in_ref
from ..timeline import TIMELINE
from .errors import check_request, grpc_errors
from .wire import WriteRequest

if TYPE_CHECKING:
    from ..fetch.source import PeerSource, SharedIngest

log = logging.getLogger("cs_p2p.service")

READ_CHUNK = 1 << 20  # containerd's read messages are 1 MiB too
LIST_BATCH = 100
_INLINE_IO = 64 << 10  # smaller reads/writes are not worth a thread hop


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info_pb(info: BlobInfo) -> pb.Info:
    return pb.Info(
        digest=info.digest,
        size=info.size,
        created_at=_ts(info.created_at_ns),
        updated_at=_ts(info.updated_at_ns),
        labels=info.labels,
    )


def _status_pb(st: IngestStatus) -> pb.Status:
    return pb.Status(
        started_at=_ts(st.started_at_ns),
        updated_at=_ts(st.updated_at_ns),
        ref=st.ref,
        offset=st.offset,
        total=st.total,
        expected=st.expected,
    )


class ContentEvents(Protocol):
    """Told of blobs appearing and disappearing (the DHT announces and withdraws them).
    Called on the event loop; must not block."""

    def committed(self, digest: str, size: int) -> None: ...

    def deleted(self, digest: str) -> None: ...

    def kept(self, digest: str) -> None: ...  # let go of by containerd, kept in the cache


class ContentService(pb_grpc.ContentServicer):
    def __init__(self, store: LocalStore, events: ContentEvents | None = None,
                 peers: "PeerSource | None" = None) -> None:
        self.store = store
        self.events = events
        self.peers = peers

    @grpc_errors
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        with metrics.Timer(metrics.INFO_LATENCY, "local") as timed:
            try:
                return pb.InfoResponse(info=_info_pb(self.store.blobs.info(request.digest)))
            except NotFound:
                timed.result = "cache"
                if self._restore(request.digest):  # let go of by GC, kept in the cache: back at once
                    return pb.InfoResponse(info=_info_pb(self.store.blobs.info(request.digest)))
                # Known to the mirror: fetched here, answered from memory (no network).
                fetch = self.peers.claim(request.digest) if self.peers else None
                timed.result = "origin"
                if fetch is None:
                    timed.result = "peers"
                    t0 = time.monotonic()
                    fetch = await self.peers.locate(request.digest) if self.peers else None
                    TIMELINE.waited("lookup", time.monotonic() - t0, request.digest, by="info")
                if fetch is None:
                    timed.result = "not_found"
                    TIMELINE.mark("info_not_found", request.digest)
                    raise self._not_found(request.digest) from None
        TIMELINE.mark("info_claimed", fetch.digest, size=fetch.size)
        fetch.only_way = True  # containerd will not download it: the fetch must deliver (`RELOOK_PAUSES`)
        # Held by peers or fetched from its registry here: containerd records it as present
        # and reads it through Read (or has it applied, `diff`), which streams the bytes as
        # the background fetch brings them.
        now = time.time_ns()
        return pb.InfoResponse(info=_info_pb(BlobInfo(fetch.digest, fetch.size, now, now, {})))

    def _restore(self, digest: str) -> bool:
        """Hand a cached blob back to containerd; announced as containerd's again."""
        if not self.store.restore(digest):
            return False
        log.info("blob restored from the cache", extra={"digest": digest})
        if self.events:
            self.events.committed(digest, self.store.blobs.info(digest).size)
        return True

    def _not_found(self, digest: str) -> NotFound:
        return self.peers.not_found(digest) if self.peers else NotFound(f"content {digest}: not found")

    @grpc_errors
    async def Update(self, request: pb.UpdateRequest, context: grpc.aio.ServicerContext) -> pb.UpdateResponse:
        info = self.store.blobs.update(
            request.info.digest, dict(request.info.labels), list(request.update_mask.paths)
        )
        return pb.UpdateResponse(info=_info_pb(info))

    @grpc_errors
    async def List(self, request: pb.ListContentRequest, context: grpc.aio.ServicerContext):
        flt = parse_filters(request.filters)
        batch: list[pb.Info] = []
        for info in self.store.blobs.walk():
            if flt.match(info_adaptor(info.digest, info.labels)):
                batch.append(_info_pb(info))
                if len(batch) >= LIST_BATCH:
                    yield pb.ListContentResponse(info=batch)
                    batch = []
        if batch:
            yield pb.ListContentResponse(info=batch)

    @grpc_errors
    async def Delete(self, request: pb.DeleteContentRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        # off the loop: keeping the blob in the cache may evict gigabytes (unlinks, a stat per
        # cached blob), and containerd's Info calls wait on the loop meanwhile
        cached, evicted = await asyncio.get_running_loop().run_in_executor(None, self.store.delete, request.digest)
        log.info("blob deleted", extra={"digest": request.digest, "cached": cached, "evicted": evicted})
        if self.events:  # a cached blob stays announced: peers may still fetch it here
            if cached:
                self.events.kept(request.digest)
            for digest in evicted if cached else [request.digest, *evicted]:
                self.events.deleted(digest)
        return empty_pb2.Empty()

    @grpc_errors
    async def Read(self, request: pb.ReadContentRequest, context: grpc.aio.ServicerContext):
        hex_ = parse_digest(request.digest)
        fd, fetch = self._open(request.digest, hex_)
        try:
            size = fetch.size if fetch else os.fstat(fd).st_size
            offset = max(request.offset, 0)
            if offset > size:
                raise OutOfRange(f"read past object length {size} bytes")
            end = size if request.size <= 0 or offset + request.size > size else offset + request.size
            loop = asyncio.get_running_loop()
            while offset < end:
                n = min(READ_CHUNK, end - offset)
                if fetch is not None:
                    try:
                        # Stream pieces as they arrive, those of providers not yet proven honest
                        # once the blob verified (`fetch.fetcher`).
                        held_back = not fetch.covered(offset, n, trusted_only=True) and fetch.covered(offset, n)
                        t0 = time.monotonic()
                        await fetch.wait_range(offset, n, trusted_only=True)
                        if held_back:  # on disk, but from a provider not proven honest yet
                            TIMELINE.waited("unverified", time.monotonic() - t0, request.digest)
                    except FetchFailed as exc:
                        raise Aborted(f"fetching {request.digest} from peers failed: {exc}") from None
                if n <= _INLINE_IO:
                    data = os.pread(fd, n, offset)
                else:
                    data = await loop.run_in_executor(None, os.pread, fd, n, offset)
                if not data:
                    raise OutOfRange(f"blob {request.digest} shrank while reading at {offset}")
                metrics.READ_BYTES.inc(len(data))
                yield pb.ReadContentResponse(offset=offset, data=data)
                offset += len(data)
        finally:
            os.close(fd)

    def _open(self, digest: str, hex_: str) -> tuple[int, Fetch | None]:
        """The blob's file, or the file a fetch from peers is writing (and the fetch)."""
        path = self.store.blobs.blob_path(hex_)
        try:
            return os.open(path, os.O_RDONLY), None
        except FileNotFoundError:
            pass
        # Moved to the cache between containerd's Info and this Read (a replica): back.
        if self._restore(digest):
            return os.open(path, os.O_RDONLY), None
        fetch = self.peers.inflight(digest) if self.peers else None
        if fetch is None:
            raise self._not_found(digest)
        try:
            return fetch.open(path), fetch
        except FetchFailed as exc:
            raise Aborted(f"fetching {digest} from peers failed: {exc}") from None

    @grpc_errors
    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        return pb.StatusResponse(status=_status_pb(self.store.ingests.status(request.ref)))

    @grpc_errors
    async def ListStatuses(
        self, request: pb.ListStatusesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStatusesResponse:
        flt = parse_filters(request.filters)
        statuses = [_status_pb(st) for st in self.store.ingests.walk() if flt.match(status_adaptor(st.ref))]
        return pb.ListStatusesResponse(statuses=statuses)

    @grpc_errors
    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        # off the loop: an ingest may hold gigabytes to unlink
        await asyncio.get_running_loop().run_in_executor(None, self.store.ingests.abort, request.ref)
        log.info("ingest aborted", extra={"ref": request.ref})
        return empty_pb2.Empty()

    @grpc_errors
    async def Write(self, request_iterator, context: grpc.aio.ServicerContext):
        req = await context.read()
        if req is grpc.aio.EOF:
            return
        check_request(req)
        if not req.ref:
            raise InvalidArgument("first message must have a reference")
        writer = self.store.ingests.open_writer(req.ref, req.total, req.expected)
        shared = self._share(writer)
        try:
            if writer.offset > 0:
                # Resuming after a restart: rebuild the hash of what is on disk, off the loop.
                await asyncio.get_running_loop().run_in_executor(None, writer.rehash)
                log.info("ingest resumed", extra={"ref": writer.ref, "offset": writer.offset})
            while True:
                if shared and not shared.decided and req.action == pb.STAT and not req.ref:
                    if await self._follow(writer, shared):
                        async for resp in self._answer_filled(context, req, shared):
                            yield resp
                        return
                writer.messages += 1
                resp = await self._write_step(writer, req)
                yield resp
                if req.action == pb.COMMIT:
                    return
                req = await context.read()
                if req is grpc.aio.EOF:
                    return
                check_request(req)
        finally:
            writer.close()
            if shared:
                shared.end(committed=writer.committed)

    def _share(self, writer: IngestWriter) -> "SharedIngest | None":
        """Announce a fresh download (its ref names the digest) so that peers can stream it
        while it is written, and can follow it instead of downloading it themselves."""
        digest = digest_in_ref(writer.ref)
        if self.peers is None or digest is None or writer.total <= 0 or writer.offset > 0:
            return None
        if self.store.blobs.exists(digest) or not self.store.ingests.publish(digest, writer):
            return None
        return self.peers.share(digest, writer.total, writer.started_at_ns / 1e9)

    async def _follow(self, writer: IngestWriter, shared: "SharedIngest") -> bool:
        """containerd's Status() before it downloads: True if the blob came from peers instead."""
        sources = await shared.sources()
        if not sources:
            return False
        self.store.ingests.unpublish(writer)  # not written here: peers get the fetch's pieces
        writer.progress.failed()
        log.info("following in-flight download", extra={"digest": shared.digest,
                                                        "providers": [p.addr for p in sources]})
        if not await shared.follow(sources):
            # containerd downloads it after all: nodes that found our in-flight record stream that
            self.store.ingests.publish_again(shared.digest, writer)
            return False
        writer.close()
        self.store.ingests.abort(writer.ref)
        return True

    async def _answer_filled(self, context: grpc.aio.ServicerContext, req: WriteRequest,
                             shared: "SharedIngest"):
        """The rest of a Write stream whose blob came from peers: the ingest reads as complete,
        so containerd commits, and the commit finds the blob (ALREADY_EXISTS, which
        containerd's fetch and metadata layer accept as success)."""
        now = _ts(time.time_ns())
        while True:
            if req.action != pb.STAT:
                raise AlreadyExists(f"content {shared.digest}: already exists")
            yield pb.WriteContentResponse(action=pb.STAT, started_at=now, updated_at=now, offset=shared.size,
                                          total=shared.size, digest=shared.digest)
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            check_request(req)

    def _committed(self, writer: IngestWriter, digest: str) -> None:
        log.info("blob committed", extra={"digest": digest, "size": writer.offset, "ref": writer.ref,
                                          "messages": writer.messages})
        metrics.WRITTEN_BYTES.inc(writer.offset)
        TIMELINE.mark("write_committed", digest, size=writer.offset)  # containerd downloaded it itself
        if self.events:
            self.events.committed(digest, writer.offset)

    async def _write_step(self, writer: IngestWriter, req: WriteRequest) -> pb.WriteContentResponse:
        """One request of a Write stream, as containerd's content service handles it."""
        if req.expected and self.store.blobs.exists(req.expected):
            writer.close()
            self.store.ingests.abort(writer.ref)
            raise AlreadyExists(f"blob with expected digest {req.expected} exists")
        if req.expected:
            writer.expected = req.expected
        writer.set_total(req.total)
        if req.action == pb.STAT:
            return pb.WriteContentResponse(
                action=pb.STAT,
                started_at=_ts(writer.started_at_ns),
                updated_at=_ts(writer.updated_at_ns),
                offset=writer.offset,
                total=writer.total,
                digest=writer.digest(),
            )
        if req.action not in (pb.WRITE, pb.COMMIT):
            raise InvalidArgument(f"unknown write action {req.action}")
        if req.offset > 0 and req.offset != writer.offset:
            raise OutOfRange(f"write @{req.offset} must occur at current offset {writer.offset}")
        if req.offset == 0 and writer.offset > 0:
            writer.truncate()
        if req.data:
            await writer.write(req.data)
        digest = writer.digest()
        if req.action == pb.COMMIT:
            labels = dict(req.labels)
            expected = req.expected or writer.expected
            commit = asyncio.get_running_loop().run_in_executor(
                None, writer.commit_sync, req.total or writer.total, expected, labels)
            try:
                digest = await asyncio.shield(commit)
            except asyncio.CancelledError:
                # containerd went away mid-commit: the thread's fsync and rename cannot be
                # stopped, so the writer (its fd, its ref lock) stays open until they end, and a
                # blob that did land is announced like any other
                with contextlib.suppress(Exception):
                    self._committed(writer, await commit)
                raise
            self._committed(writer, digest)
        return pb.WriteContentResponse(
            action=req.action,
            started_at=_ts(writer.started_at_ns),
            updated_at=_ts(writer.updated_at_ns),
            offset=writer.offset,
            total=writer.total,
            digest=digest,
        )
