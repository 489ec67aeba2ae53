"""In-progress writes ("ingests"), resumable across restarts.

Layout (containerd's `content/local` does the same): `ingest/<sha256(ref)>/` holds

    ref        the client's ref, to list and match statuses
    data       the bytes written so far; its size is the offset
    startedat  when the ingest began (ns)
    total      the size the client announced, if any
    expected   the digest the client announced, if any

The directory name is a hash of the ref, so no ref can point outside the root.  The hash
state cannot be saved, so a resumed ingest re-reads its data once to rebuild it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..digests import parse_digest
from .blobs import sha256_of_fd
from .progress import Progress

if TYPE_CHECKING:
    from .blobs import BlobStore
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable

# Write-behind: bytes accepted but not yet on disk, per writer.  Bounds memory per ingest.
MAX_BYTES_IN_FLIGHT = 16 << 20
_INLINE_WRITE = 64 << 10
MAX_REF_LEN = 4096
MAX_INGESTS = 4096  # ingests on disk; containerd keeps a handful per pull, abandoned ones until GC
MAX_INGEST_BYTES = 100 << 30  # their data on disk, together
# containerd names a download's ingest `<namespace>/<n>/<kind>-sha256:<hex>` (remotes.MakeRefKey).
_REF_DIGEST = re.compile(r"(?:^|[-/])(sha256:[0-9a-f]{64})$")


def digest_in_ref(ref: str) -> str | None:
    """The digest a download's ref names, if it names one."""
    m = _REF_DIGEST.search(ref)
    return m.group(1) if m else None


@dataclass
class IngestStatus:
    ref: str
    offset: int
    total: int
    started_at_ns: int
    updated_at_ns: int
    expected: str = ""


def validate_ref(ref: str) -> None:
    """Refuse refs no containerd client sends and that could be used to confuse the store."""
    if not ref:
        raise InvalidArgument("ref must not be empty")
    if len(ref) > MAX_REF_LEN:
        raise InvalidArgument(f"ref longer than {MAX_REF_LEN} characters")
    if any(ord(c) < 0x20 or c == "\x7f" for c in ref):
        raise InvalidArgument("ref contains control characters")
    if any(part in ("..", ".") for part in ref.replace("\\", "/").split("/")) or ref.startswith("/"):
        raise InvalidArgument(f"ref {ref!r} contains a path that would escape the ingest root")


def _read_text(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return default


class IngestWriter:
    """The single writer of one ref.  Not thread-safe; one gRPC stream drives it."""

    def __init__(self, ingests: "Ingests", ref: str, path: str, status: IngestStatus) -> None:
        self._ingests = ingests
        self.ref = ref
        self.path = path
        self.data_path = os.path.join(path, "data")
        self.started_at_ns = status.started_at_ns
        self.updated_at_ns = status.updated_at_ns
        self.total = status.total
        self.expected = status.expected
        self.offset = status.offset
        self._hasher = hashlib.sha256()
        self._fd = os.open(self.data_path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._io: ThreadPoolExecutor | None = None
        self._inflight: collections.deque[Future[None]] = collections.deque()
        self._inflight_bytes: collections.deque[int] = collections.deque()
        self.closed = False
        self.committed = False
        self.messages = 0  # requests of the Write stream (benchmarks: how containerd chunks a blob)
        self.published_as: str | None = None
        # Peers may stream the ingest while it is written: they follow its durable length.
        self.generation = 0
        self.progress = self.fresh_progress()

    def fresh_progress(self) -> Progress:
        """A progress at this writer's generation and length, for new readers to follow."""
        progress = Progress()
        progress.advance(self.generation, self.offset)
        return progress

    def rehash(self) -> None:
        """Rebuild the hash of bytes already on disk (resume after a restart)."""
        fd = os.open(self.data_path, os.O_RDONLY)
        try:
            self._hasher, self.offset = sha256_of_fd(fd)
        finally:
            os.close(fd)

    def digest(self) -> str:
        return "sha256:" + self._hasher.copy().hexdigest()

    def set_total(self, total: int) -> None:
        if total > 0 and total != self.total:
            self.total = total
            _write_small(os.path.join(self.path, "total"), str(total))

    def truncate(self) -> None:
        self.drain_sync()
        os.ftruncate(self._fd, 0)
        self._ingests.charge(-self.offset)
        self._hasher = hashlib.sha256()
        self.offset = 0
        self.generation += 1
        self.progress.reset(self.generation)
        self.updated_at_ns = time.time_ns()

    def _pwrite_all(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self._fd, view[written:], offset + written)

    async def write(self, data: bytes | memoryview) -> None:
        """Append `data`.  The hash is updated before returning (responses carry the digest);
        the disk write is queued behind it on this writer's own thread, in order, so that it
        overlaps with receiving the next message.  A failed disk write surfaces on the next
        call, and commit, truncate and close wait for all of them first.
        """
        self._raise_io_error()
        self._ingests.charge(len(data))
        offset = self.offset
        self.offset += len(data)
        self.updated_at_ns = time.time_ns()
        end, generation = self.offset, self.generation
        if len(data) < _INLINE_WRITE and not self._inflight:
            self._pwrite_all(data, offset)
            self._hasher.update(data)
            self.progress.advance(generation, end)
            return
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-io")
        fut = self._io.submit(self._pwrite_all, data, offset)
        fut.add_done_callback(
            lambda f: f.exception() is None and self.progress.advance(generation, end))
        self._inflight.append(fut)
        self._inflight_bytes.append(len(data))
        await asyncio.get_running_loop().run_in_executor(None, self._hasher.update, data)
        while sum(self._inflight_bytes) > MAX_BYTES_IN_FLIGHT:
            await asyncio.wrap_future(self._inflight[0])
            self._raise_io_error()

    def _raise_io_error(self) -> None:
        while self._inflight and self._inflight[0].done():
            fut = self._inflight.popleft()
            self._inflight_bytes.popleft()
            fut.result()  # re-raises the OSError of a failed write

    def drain_sync(self) -> None:
        while self._inflight:
            self._inflight[0].result()
            self._raise_io_error()

    def commit_sync(self, size: int, expected: str, labels: dict[str, str]) -> str:
        """Verify size and digest, then fsync and atomically rename into the blob store.

        On a mismatch the ingest stays as it was (FAILED_PRECONDITION), so nothing is lost
        and the client can inspect, truncate or abort it.
        """
        if self.closed:
            raise FailedPrecondition("cannot commit on closed writer")
        self.drain_sync()
        if not os.path.isdir(self.path):
            raise NotFound(f"ingest ref {self.ref!r} was aborted")
        if size > 0 and size != self.offset:
            raise FailedPrecondition(f"unexpected commit size {self.offset}, expected {size}")
        digest = self.digest()
        if expected and expected != digest:
            raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
        blobs = self._ingests.blobs
        if os.path.exists(blobs.blob_path(parse_digest(digest))):
            self.close()
            shutil.rmtree(self.path, ignore_errors=True)
            self._ingests.charge(-self.offset)
            raise AlreadyExists(f"content {digest}: already exists")
        blobs.commit_file(self._fd, self.data_path, digest, labels)
        self.committed = True
        self.progress.committed(self.offset)
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._ingests.charge(-self.offset)
        return digest

    def close(self) -> None:
        """Release the ref.  Queued writes finish first (bounded by MAX_BYTES_IN_FLIGHT), so
        the data file holds every byte a response acknowledged before anyone resumes it."""
        if not self.closed:
            self.closed = True
            try:
                for fut in self._inflight:
                    fut.exception()  # wait; an error here only shortens the resumable prefix
            finally:
                if self._io is not None:
                    self._io.shutdown(wait=True)
                os.close(self._fd)
                self.progress.failed()  # no-op after a commit
                self._ingests.release(self)


def _write_small(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class Ingests:
    def __init__(self, root: str, blobs: "BlobStore", max_ingests: int = MAX_INGESTS,
                 max_bytes: int = MAX_INGEST_BYTES) -> None:
        self.max_ingests = max_ingests
        self.max_bytes = max_bytes
        self.dir = os.path.join(root, "ingest")
        os.makedirs(self.dir, exist_ok=True)
        self.used = self._measure()  # bytes of ingest data on disk
        self.blobs = blobs
        self._locked: dict[str, int] = {}
        self._published: dict[str, IngestWriter] = {}  # digest -> writer peers may stream

    def path(self, ref: str) -> str:
        return os.path.join(self.dir, hashlib.sha256(ref.encode()).hexdigest())

    def _measure(self) -> int:
        return sum(status.offset for status in self.walk())

    def charge(self, n: int) -> None:
        """Account `n` more (or, negative, fewer) bytes of ingest data; RESOURCE_EXHAUSTED,
        with nothing written, if that would pass `max_bytes`.  The count is kept as writes
        happen and measured from disk again before it refuses anything, so it cannot drift
        into refusing wrongly."""
        if n > 0 and self.used + n > self.max_bytes:
            self.used = self._measure()
            if self.used + n > self.max_bytes:
                raise ResourceExhausted(f"ingests hold {self.used} bytes, the limit is {self.max_bytes}: "
                                        "commit or abort some first")
        self.used = max(0, self.used + n)

    def release(self, writer: IngestWriter) -> None:
        self._locked.pop(writer.ref, None)
        self.unpublish(writer)

    def publish(self, digest: str, writer: IngestWriter) -> bool:
        """Let peers stream `writer` as `digest` while it is written (one writer per digest)."""
        if self._published.setdefault(digest, writer) is not writer:
            return False
        writer.published_as = digest
        return True

    def publish_again(self, digest: str, writer: IngestWriter) -> bool:
        """Publish `writer` again after `unpublish` and a failed `progress` (it was to be
        filled from peers, and that fell through), before any byte of it was written: readers
        that find its in-flight record stream what containerd now writes instead of a 404."""
        writer.progress = writer.fresh_progress()
        return self.publish(digest, writer)

    def unpublish(self, writer: IngestWriter) -> None:
        digest = writer.published_as
        if digest and self._published.get(digest) is writer:
            del self._published[digest]
        writer.published_as = None

    def published(self, digest: str) -> IngestWriter | None:
        """The ingest being written as `digest`, if peers may stream it."""
        return self._published.get(digest)

    def open_writer(self, ref: str, total: int, expected: str) -> IngestWriter:
        """Create or resume the ingest of `ref` and lock it (UNAVAILABLE if already locked)."""
        validate_ref(ref)
        if expected:
            if os.path.exists(self.blobs.blob_path(parse_digest(expected))):
                raise AlreadyExists(f"content {expected}: already exists")
        if ref in self._locked:
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._locked[ref] / 1e9))
            raise Unavailable(f"ref {ref} locked for writing (since {since})")
        path = self.path(ref)
        now = time.time_ns()
        resumed = os.path.isdir(path)
        if not resumed and len(os.listdir(self.dir)) >= self.max_ingests:
            raise ResourceExhausted(f"{self.max_ingests} ingests are open: commit or abort some first")
        if total > self.max_bytes:
            raise ResourceExhausted(f"an ingest of {total} bytes exceeds the limit of {self.max_bytes}")
        if resumed:
            status = self._status_at(path)
            if status.ref != ref:
                raise FailedPrecondition(f"ingest ref key does not match: {ref} != {status.ref}")
        else:
            tmp = f"{path}.new.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            _write_small(os.path.join(tmp, "ref"), ref)
            _write_small(os.path.join(tmp, "startedat"), str(now))
            if total > 0:
                _write_small(os.path.join(tmp, "total"), str(total))
            if expected:
                _write_small(os.path.join(tmp, "expected"), expected)
            open(os.path.join(tmp, "data"), "wb").close()
            os.rename(tmp, path)
            status = IngestStatus(ref, 0, total, now, now, expected)
        self._locked[ref] = now
        try:
            writer = IngestWriter(self, ref, path, status)
            if resumed:
                writer.set_total(total)
        except BaseException:
            self._locked.pop(ref, None)
            raise
        return writer

    def _status_at(self, path: str) -> IngestStatus:
        ref = _read_text(os.path.join(path, "ref"))
        try:
            st = os.stat(os.path.join(path, "data"))
        except FileNotFoundError:
            raise NotFound(f"ingest ref {ref!r}: not found") from None
        started = int(_read_text(os.path.join(path, "startedat"), "0") or 0)
        total = int(_read_text(os.path.join(path, "total"), "0") or 0)
        expected = _read_text(os.path.join(path, "expected"))
        return IngestStatus(ref, st.st_size, total, started or st.st_mtime_ns, st.st_mtime_ns, expected)

    def status(self, ref: str) -> IngestStatus:
        validate_ref(ref)
        path = self.path(ref)
        if not os.path.isdir(path):
            raise NotFound(f"ingest ref {ref!r}: not found")
        return self._status_at(path)

    def walk(self) -> Iterator[IngestStatus]:
        with os.scandir(self.dir) as it:
            names = [e.name for e in it if e.is_dir() and len(e.name) == 64]
        for name in names:
            try:
                yield self._status_at(os.path.join(self.dir, name))
            except NotFound:
                continue  # committed or aborted while we listed

    def abort(self, ref: str) -> None:
        validate_ref(ref)
        path = self.path(ref)
        if not os.path.isdir(path):
            raise NotFound(f"ingest ref {ref!r}: not found")
        size = self._status_at(path).offset
        shutil.rmtree(path)
        self.charge(-size)
