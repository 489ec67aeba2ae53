"""Tag records: which manifest a `registry/name:tag` pointed at, as nodes saw it.

A node that resolved a tag through the registry publishes (reference -> manifest digest,
media type, size, when, and whether it asked without any credentials: then the repository is
public).  A manifest the registry confirmed by digest is published the same way under
`registry/name@digest`: during an outage, such records are what says, cluster-wide, that a
digest belongs to a repository and whether anyone may read it (`mirror.access`).  Readers take the newest record: the registry stays the source of
freshness, the records are the fallback while it is unreachable.  Nothing secret goes in:
a reference and a digest, never credentials.  Each node keeps one record per reference and
publisher, like provider records.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from ..digests import parse_digest
from ..errors import InvalidArgument

MAX_TAGS_PER_KEY = 16
MAX_MEDIA_TYPE = 128
TAG_TTL = 7 * 24 * 3600.0


def tag_key(reference: str) -> bytes:
    """The DHT key of `host/name:tag`."""
    return hashlib.sha1(b"cs-p2p/tag/" + reference.encode()).digest()


@dataclass(frozen=True)
class TagRecord:
    node_id: bytes
    digest: str
    media_type: str
    size: int
    seen: float  # unix time the publisher got this answer from the registry
    sig: bytes = b""  # the publisher's signature (key-pair mode, `identity`)
    public: bool = False  # the registry answered a request without credentials

    def to_wire(self) -> list:
        fields = [self.node_id, self.digest, self.media_type, self.size, self.seen]
        if self.public:
            return fields + [self.sig, True]
        return fields + [self.sig] if self.sig else fields

    @classmethod
    def from_wire(cls, value: object) -> "TagRecord":
        if not isinstance(value, (list, tuple)) or len(value) not in (5, 6, 7):
            raise ValueError("tag record must have 5 to 7 fields")
        node_id, digest, media_type, size, seen = value[:5]
        sig = value[5] if len(value) >= 6 else b""
        public = value[6] if len(value) == 7 else False
        if not isinstance(public, bool):
            raise ValueError("tag public flag must be a boolean")
        if not (isinstance(node_id, bytes) and len(node_id) == 20):
            raise ValueError("tag node id must be 20 bytes")
        if not isinstance(digest, str):
            raise ValueError("tag digest must be a string")
        try:
            parse_digest(digest)
        except InvalidArgument as exc:
            raise ValueError(str(exc)) from None
        if not (isinstance(media_type, str) and 0 < len(media_type) <= MAX_MEDIA_TYPE):
            raise ValueError("tag media type must be a short string")
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 < size <= 4 << 20):
            raise ValueError("tag size must be a manifest size")
        if not isinstance(seen, (int, float)) or isinstance(seen, bool):
            raise ValueError("tag time must be a number")
        if not (isinstance(sig, bytes) and len(sig) in (0, 64)):
            raise ValueError("tag signature must be 64 bytes")
        return cls(node_id, digest, media_type, size, float(seen), sig, public)


class TagStore:
    """key -> {publisher -> record}; records older than `ttl` vanish on access."""

    def __init__(self, max_per_key: int = MAX_TAGS_PER_KEY, ttl: float = TAG_TTL) -> None:
        self.max_per_key = max_per_key
        self.ttl = ttl
        self._data: dict[bytes, dict[bytes, TagRecord]] = {}

    def add(self, key: bytes, rec: TagRecord) -> None:
        if rec.seen > time.time() + 60:
            return  # from the future: it would win every comparison
        recs = self._data.setdefault(key, {})
        recs[rec.node_id] = rec
        if len(recs) > self.max_per_key:
            oldest = min(recs.values(), key=lambda r: r.seen)
            del recs[oldest.node_id]

    def get(self, key: bytes) -> list[TagRecord]:
        recs = self._data.get(key)
        if not recs:
            return []
        horizon = time.time() - self.ttl
        live = {nid: r for nid, r in recs.items() if r.seen > horizon}
        self._data[key] = live
        return sorted(live.values(), key=lambda r: -r.seen)

    def drop_digests(self, digests: set[str]) -> None:
        """Every record that names one of `digests` (purged)."""
        for key in list(self._data):
            self._data[key] = {nid: r for nid, r in self._data[key].items() if r.digest not in digests}
