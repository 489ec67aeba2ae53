"""Blobs handed between containerd's builtin content store and cs-p2p's: `adopt` when cs-p2p
becomes the node's content store, `release` when it stops being it.

Both stores keep a blob as `blobs/sha256/<hex>`, so a hand-over is a hard link per blob when
both live on one file system (no byte copied, no extra space) and a copy otherwise.  Neither
direction deletes anything: the store handed from keeps its files, so an interrupted or
abandoned install or uninstall leaves both stores usable, and running either again finishes
the job (a blob already there is skipped).

Adoption verifies every blob against its name before cs-p2p takes it: once in cs-p2p's store a
blob is trusted everywhere (served to containerd, to peers, as proofs of storage), so the one
check is made where it comes in, as for every blob containerd writes or a peer sends.  A blob
whose bytes do not match is left where it is and reported.  Release does not re-verify: cs-p2p
verified each blob when it came in.

A temporary name (`.cs-p2p-<hex>.<pid>`) is used until the file is complete and verified, then
renamed into place; neither store lists such names, and leftovers of an interrupted run are
removed by the next.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..digests import format_digest
from .blobs import BlobStore, fsync_dir, sha256_of_fd

BUILTIN_BLOBS = os.path.join("io.containerd.content.v1.content", "blobs", "sha256")
_TMP_PREFIX = ".cs-p2p-"
_COPY_CHUNK = 4 << 20


def builtin_blob_dir(containerd_root: str) -> str:
    """Where containerd's builtin content store keeps its blobs."""
    return os.path.join(containerd_root, BUILTIN_BLOBS)


@dataclass
class Report:
    """What a hand-over did, blob by blob: for the command's summary and the tests."""

    linked: int = 0  # hard links: same file system
    copied: int = 0  # other file systems
    present: int = 0  # already in the store handed to (an earlier run, or the same blob)
    bytes: int = 0  # of the blobs linked or copied
    corrupt: list[str] = field(default_factory=list)  # bytes that do not match the name: not taken

    @property
    def taken(self) -> int:
        return self.linked + self.copied


Progress = Callable[[int, int, Report], None]  # (blobs done, blobs in all, report so far)


def _blob_names(directory: str) -> Iterator[str]:
    try:
        with os.scandir(directory) as it:
            for entry in it:
                if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                    yield entry.name
    except FileNotFoundError:
        return


def _remove_leftovers(directory: str) -> None:
    """Temporary files of an interrupted run."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(_TMP_PREFIX):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass


def _copy(src: str, tmp: str, hasher: "hashlib._Hash | None") -> None:
    """Copy in bounded chunks, hashing what is written; the copy is fsynced and read-only."""
    with open(src, "rb") as fin, open(tmp, "xb") as fout:
        while chunk := fin.read(_COPY_CHUNK):
            if hasher is not None:
                hasher.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fchmod(fout.fileno(), 0o444)
        os.fsync(fout.fileno())


def _hand_over(hex_: str, src_dir: str, dst_dir: str, verify: bool) -> tuple[str, int]:
    """Put blob `hex_` of `src_dir` into `dst_dir`: ("linked" | "copied" | "present" |
    "corrupt", size)."""
    src, dst = os.path.join(src_dir, hex_), os.path.join(dst_dir, hex_)
    if os.path.exists(dst):
        return "present", 0
    tmp = os.path.join(dst_dir, f"{_TMP_PREFIX}{hex_}.{os.getpid()}")
    try:
        hasher = hashlib.sha256() if verify else None
        try:
            os.link(src, tmp)
            how = "linked"
            if verify:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    hasher, _ = sha256_of_fd(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            _copy(src, tmp, hasher)
            how = "copied"
        if hasher is not None and hasher.hexdigest() != hex_:
            return "corrupt", 0
        size = os.stat(tmp).st_size
        os.rename(tmp, dst)
        return how, size
    finally:
        try:
            os.unlink(tmp)  # still there if corrupt, failed, or dst was the same file already
        except FileNotFoundError:
            pass


def _run(src_dir: str, dst_dir: str, verify: bool, on_taken: Callable[[str], None],
         progress: Progress | None, workers: int | None) -> Report:
    os.makedirs(dst_dir, exist_ok=True)
    _remove_leftovers(dst_dir)
    names = list(_blob_names(src_dir))
    report = Report()
    last = 0.0
    # hashlib and file I/O release the GIL: verification runs on every core
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        futures = {pool.submit(_hand_over, hex_, src_dir, dst_dir, verify): hex_ for hex_ in names}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            hex_ = futures[fut]
            how, size = fut.result()
            if how == "corrupt":
                report.corrupt.append(format_digest(hex_))
            elif how == "present":
                report.present += 1
            else:
                setattr(report, how, getattr(report, how) + 1)
                report.bytes += size
                on_taken(hex_)
            now = time.monotonic()
            if progress is not None and (now - last >= 1.0 or done == len(names)):
                progress(done, len(names), report)
                last = now
    fsync_dir(dst_dir)
    return report


def adopt(containerd_root: str, store_root: str, progress: Progress | None = None,
          workers: int | None = None) -> Report:
    """Take every blob of containerd's builtin store (under `containerd_root`) into cs-p2p's
    store at `store_root`, verified; the builtin store's files stay as they are."""
    blobs = BlobStore(store_root)
    return _run(builtin_blob_dir(containerd_root), blobs.blob_dir, True,
                lambda hex_: blobs.record_commit(format_digest(hex_), {}), progress, workers)


def release(store_root: str, containerd_root: str, progress: Progress | None = None,
            workers: int | None = None) -> Report:
    """Give every blob containerd holds in cs-p2p's store (not the cache: containerd let go of
    those) back to containerd's builtin store, so that stock containerd has every image."""
    return _run(BlobStore(store_root).blob_dir, builtin_blob_dir(containerd_root), False,
                lambda hex_: None, progress, workers)
