"""What an apply worker process does for one layer: pick the directory to write, as
containerd's `apply_linux.go` does from the snapshot's mounts, and apply the stream there.

- one overlay mount: straight into its upperdir, overlay whiteouts, lowerdirs lend
  attributes to missing parents;
- one bind mount: into its source;
- anything else: mounted on a temporary directory for the time of the apply.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from typing import Iterator

from .layerfs import InvalidLayer, LayerApplier
from .stream import CorruptLayer, HashingStream
from .tarheaders import BoundedTarInfo

MountSpec = tuple[str, str, tuple[str, ...]]  # (type, source, options)


@dataclass(frozen=True)
class Target:
    """Where a layer goes; picklable, so it crosses to the worker process."""

    kind: str  # "overlay", "dir" or "mount"
    path: str = ""  # the upperdir ("overlay") or the directory ("dir")
    parents: tuple[str, ...] = ()  # lowerdirs, topmost first ("overlay")
    mounts: tuple[MountSpec, ...] = ()  # ("mount")


def target_for(mounts: list[MountSpec]) -> Target:
    if len(mounts) == 1:
        kind, source, options = mounts[0]
        if kind == "overlay":
            upper = next((o[len("upperdir="):] for o in options if o.startswith("upperdir=")), "")
            lower = next((o[len("lowerdir="):] for o in options if o.startswith("lowerdir=")), "")
            if upper:
                return Target("overlay", upper, tuple(lower.split(":")) if lower else ())
        elif kind == "bind" and "ro" not in options:
            return Target("dir", source)
    if not mounts:
        raise InvalidLayer("no mounts to apply the layer to")
    return Target("mount", mounts=tuple(mounts))


@contextlib.contextmanager
def _destination(target: Target) -> Iterator[LayerApplier]:
    """The applier for the target; other mounts stacked on a temporary directory for the time
    of the apply, as containerd's WithTempMount does."""
    if target.kind != "mount":
        yield LayerApplier(target.path, target.kind == "overlay", list(target.parents))
        return
    where = tempfile.mkdtemp(prefix="cs-p2p-apply-")
    done = 0
    try:
        for kind, source, options in target.mounts:
            argv = ["mount", "-t", kind] + (["-o", ",".join(options)] if options else []) + [source, where]
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                raise OSError(f"mount {kind} {source}: {res.stderr.strip()}")
            done += 1
        yield LayerApplier(where)
    finally:
        for _ in range(done):
            subprocess.run(["umount", where], capture_output=True)
        with contextlib.suppress(OSError):
            os.rmdir(where)  # never a recursive delete: a mount may have stayed


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _write(stream: HashingStream, applier: LayerApplier) -> None:
    try:
        # headers bounded and parsed in linear time: the layer's author chooses every byte
        tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=BoundedTarInfo)  # type: ignore[call-overload]
    except tarfile.ReadError:
        if stream.size == 0:
            return  # an empty layer: nothing to write
        raise
    with tar:
        applier.apply(tar)


def apply_layer(source: str, target: Target, sync_fs: bool = False) -> tuple[str, int]:
    """Apply the blob at `source` (a file or a FIFO fed by the daemon); returns the
    uncompressed stream's (digest, size)."""
    with open(source, "rb", buffering=0) as f:
        try:
            stream = HashingStream(f)
            with _destination(target) as applier:
                _write(stream, applier)
                stream.drain()
                if sync_fs:
                    _syncfs(applier.root)
        except (tarfile.TarError, CorruptLayer, EOFError) as exc:
            raise InvalidLayer(f"invalid layer: {exc}") from None
    return stream.diff_id, stream.size


def clear_target(target: Target) -> None:
    """Empty a snapshot a layer was half (or wrongly) applied to, so it can be applied again:
    what an apply wrote is everything the directory holds (a new snapshot starts empty)."""
    with _destination(target) as applier:
        root = applier.root
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
            with contextlib.suppress(OSError):
                os.removexattr(root, attr)


def ready() -> None:
    """Nothing: what a worker runs to be started before the first layer (`ApplyPool.prestart`)."""


def init_worker() -> None:
    """Die with the daemon: a worker must not write into a snapshot nobody waits for."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
