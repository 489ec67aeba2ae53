"""The node's local content store: committed blobs, resumable ingests, and the cache of blobs
containerd let go of."""

from __future__ import annotations

import os

from ..digests import parse_digest
from ..errors import NotFound
from .blobs import BlobInfo, BlobStore
from .cache import BlobCache
from .ingest import MAX_INGEST_BYTES, IngestStatus, Ingests, IngestWriter

__all__ = ["BlobInfo", "IngestStatus", "IngestWriter", "LocalStore"]


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
        if not self.cache.take(hex_, self.blobs.blob_path(hex_)):
            return False
        self.blobs.record_commit(digest, {})
        return True

    def served_path(self, hex_: str) -> str | None:
        """Where a blob this node holds for peers is: the store or the cache."""
        for path in (self.blobs.blob_path(hex_), self.cache.path(hex_)):
            if os.path.exists(path):
                return path
        return None
