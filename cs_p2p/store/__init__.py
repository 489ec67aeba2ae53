"""The node's local content store: committed blobs plus resumable ingests."""

from __future__ import annotations

import os

from .blobs import BlobInfo, BlobStore
from .ingest import MAX_INGEST_BYTES, IngestStatus, Ingests, IngestWriter

__all__ = ["BlobInfo", "IngestStatus", "IngestWriter", "LocalStore"]


class LocalStore:
    """One root directory: `blobs/`, `meta/` and `ingest/` (see the two submodules)."""

    def __init__(self, root: str, max_ingest_bytes: int = MAX_INGEST_BYTES) -> None:
        self.root = os.path.abspath(root)
        os.makedirs(self.root, exist_ok=True)
        self.blobs = BlobStore(self.root)
        self.ingests = Ingests(self.root, self.blobs, max_bytes=max_ingest_bytes)
