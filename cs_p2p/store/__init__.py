"""The node's local content store: committed blobs, resumable ingests, and the cache of blobs
containerd let go of."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import metrics
from ..digests import parse_digest
from ..errors import NotFound
from .blobs import BlobInfo, BlobStore
from .cache import BlobCache
from .ingest import MAX_INGEST_BYTES, IngestStatus, Ingests, IngestWriter

__all__ = ["BlobInfo", "IngestStatus", "IngestWriter", "LocalStore", "Usage"]


@dataclass(frozen=True)
class Usage:
    """What the store holds, as `cs-p2p status` and the metrics report it."""

    blobs: int  # committed, containerd's
    blob_bytes: int
    cached: int
    cached_bytes: int
    ingests: int  # open
    ingest_bytes: int


class LocalStore:
    """One root directory: `blobs/`, `meta/`, `ingest/` and `cache/` (see the submodules)."""

    def __init__(self, root: str, max_ingest_bytes: int = MAX_INGEST_BYTES, cache_max_bytes: int = 0) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.ingests = Ingests(self.root, self.blobs, max_bytes=max_ingest_bytes)
        self.cache = BlobCache(self.root, cache_max_bytes)

    def delete(self, digest: str) -> tuple[bool, list[str]]:
        """containerd deleted `digest` (GC): kept in the cache if it fits.  Returns (still held
        here, digests the cache evicted to make room): what the DHT must withdraw."""
        hex_ = parse_digest(digest)
        path = self.blobs.blob_path(hex_)
        try:
            kept, evicted = self.cache.keep(hex_, path)
        except FileNotFoundError:
            raise NotFound(f"content {digest}: not found") from None
        if kept:
            self.blobs.drop_meta(hex_)  # containerd's labels went with its reference
        else:
            self.blobs.delete(digest)
        return kept, evicted

    def to_cache(self, digest: str) -> tuple[bool, list[str]]:
        """A blob fetched for the cluster (a replica), not for containerd: into the cache, as
        one containerd deleted goes (`delete`)."""
        return self.delete(digest)

    def restore(self, digest: str) -> bool:
        """Hand a cached blob back to containerd's store; False if the cache does not hold it."""
        hex_ = parse_digest(digest)
        path = self.blobs.blob_path(hex_)
        if not self.cache.take(hex_, path):
            return False
        self.blobs.record_commit(digest, {})
        metrics.CACHE_RETURNED_BYTES.inc(os.path.getsize(path))
        return True

    def usage(self) -> Usage:
        """A scan of the committed blobs (sizes only, no metadata read), and the cache's and
        the ingests' own accounting."""
        blobs = blob_bytes = 0
        with os.scandir(self.blobs.blob_dir) as it:
            for entry in it:
                if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                    blobs += 1
                    blob_bytes += entry.stat(follow_symlinks=False).st_size
        cached = self.cache.digests()
        return Usage(blobs, blob_bytes, len(cached), sum(size for _, size in cached),
                     sum(1 for _ in self.ingests.walk()), self.ingests.used)

    def served_path(self, hex_: str) -> str | None:
        """Where a blob this node holds for peers is: the store or the cache."""
        for path in (self.blobs.blob_path(hex_), self.cache.path(hex_)):
            if os.path.exists(path):
                return path
        return None
