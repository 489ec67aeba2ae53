"""Blobs containerd has let go of, kept for the cluster within a budget.

When containerd's GC deletes a blob, the node keeps it here instead of dropping it, if it fits
`max_bytes` (least recently used blobs leave first to make room).  A cached blob is still
announced and served to peers, but never listed to containerd, whose GC must not see it; when
containerd asks for it again (`Info` of a re-pull or a rollback), it moves back into the store
at once, without a byte of network.  Blobs containerd references live in `blobs/` and are
never touched by the cache.

    cache/sha256/<hex>   the bytes (moved here by rename: same file system, no copy)

Least valuable out first: the blob the cluster asks for least (`value`, the demand this node
sees, `dht.demand`), and among equals the least recently used.  The time of a blob's last
use is its file's mtime, so that order survives restarts.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from ..digests import format_digest
from .blobs import fsync_dir


def default_budget(root: str, share: float = 0.1) -> int:
    """A share of the file system the root lives on."""
    st = os.statvfs(root)
    return int(st.f_blocks * st.f_frsize * share)


class BlobCache:
    def __init__(self, root: str, max_bytes: int) -> None:
        self.dir = os.path.join(root, "cache", "sha256")
        os.makedirs(self.dir, exist_ok=True)
        self.max_bytes = max_bytes
        self.value: Callable[[str], float] = lambda hex_: 0.0  # hex -> how much the cluster wants it
        self._lock = threading.Lock()  # keep/take run on executor threads too
        self._sizes: dict[str, int] = {}
        for name in os.listdir(self.dir):
            try:
                self._sizes[name] = os.stat(os.path.join(self.dir, name)).st_size
            except FileNotFoundError:
                continue

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def path(self, hex_: str) -> str:
        return os.path.join(self.dir, hex_)

    def holds(self, hex_: str) -> bool:
        return hex_ in self._sizes

    def digests(self) -> list[tuple[str, int]]:
        return [(format_digest(h), n) for h, n in self._sizes.items()]

    def keep(self, hex_: str, blob_path: str) -> tuple[bool, list[str]]:
        """Move a blob containerd deleted into the cache: (kept, digests evicted to make room).
        Not kept if it alone is over the budget: then it is deleted as containerd asked."""
        size = os.stat(blob_path).st_size
        with self._lock:
            if self.max_bytes <= 0 or size > self.max_bytes:
                return False, []
            evicted = self._make_room(size)
            os.rename(blob_path, self.path(hex_))
            os.utime(self.path(hex_))  # last use: now
            self._sizes[hex_] = size
        return True, evicted

    def take(self, hex_: str, blob_path: str) -> bool:
        """Hand a cached blob back to the store (containerd wants it again)."""
        with self._lock:
            if hex_ not in self._sizes:
                return False
            try:
                os.rename(self.path(hex_), blob_path)
                fsync_dir(os.path.dirname(blob_path))  # containerd is told it exists
            except FileNotFoundError:
                self._sizes.pop(hex_, None)
                return False
            del self._sizes[hex_]
        return True

    def drop(self, hex_: str) -> bool:
        """Delete a cached blob (purged); False if the cache does not hold it."""
        with self._lock:
            if self._sizes.pop(hex_, None) is None:
                return False
            try:
                os.unlink(self.path(hex_))
            except FileNotFoundError:
                pass
        return True

    def _make_room(self, size: int) -> list[str]:
        """Evict the least valuable blobs (least recently used among equals) until `size` more
        bytes fit."""
        evicted = []
        if self.used_bytes + size <= self.max_bytes:
            return evicted
        for hex_ in sorted(self._sizes, key=lambda h: (self.value(h), self._mtime(h))):
            if self.used_bytes + size <= self.max_bytes:
                break
            try:
                os.unlink(self.path(hex_))
            except FileNotFoundError:
                pass
            del self._sizes[hex_]
            evicted.append(format_digest(hex_))
        return evicted

    def _mtime(self, hex_: str) -> float:
        try:
            return os.stat(self.path(hex_)).st_mtime
        except FileNotFoundError:
            return time.time()
