"""Provider records: which nodes hold a blob, many per digest, each with an expiry.

The `kademlia` package stores ONE value per key (a second `set` overwrites it), so provider
records live in this store of their own and travel through RPCs of our own
(`cs_p2p.dht.protocol`).  A record is keyed by the publishing node's id, so a node's
re-announce replaces its own record and a withdraw removes only its own.

A record with `started` > 0 is an in-flight provider: the node is downloading the blob
right now (from the registry) and serves the prefix it has written.  `started` (the
ingest's start, unix time) orders in-flight providers, so that nodes downloading the same
blob at the same moment agree on one of them to follow.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

MAX_PROVIDERS_PER_KEY = 64  # what one node keeps per digest; the newest win
MAX_RECORDS_PER_PUBLISHER = 100_000  # what one node keeps from one publisher over all digests


def provider_key(digest: str) -> bytes:
    """The 20-byte DHT key under which the providers of `digest` are kept."""
    return hashlib.sha1(b"cs-p2p/providers/" + digest.encode()).digest()


@dataclass(frozen=True)
class ProviderRecord:
    node_id: bytes  # 20-byte Kademlia id of the provider
    addr: str  # host:port of its peer transfer server
    size: int
    expires: float  # unix time
    started: float = 0.0  # > 0: still being written since then (unix time)
    sig: bytes = b""  # the publisher's signature (key-pair mode, `identity`)
    cached: bool = False  # held in the node's cache, not by its containerd (`store.cache`)

    @property
    def inflight(self) -> bool:
        return self.started > 0

    def to_wire(self) -> list:
        fields = [self.node_id, self.addr, self.size, self.expires, self.started]
        if self.cached:
            return fields + [self.sig, True]
        return fields + [self.sig] if self.sig else fields

    @classmethod
    def from_wire(cls, value: object) -> "ProviderRecord":
        """Parse a record from an RPC; anything malformed raises ValueError."""
        if not isinstance(value, (list, tuple)) or len(value) not in (4, 5, 6, 7):
            raise ValueError("provider record must have 4 to 7 fields")
        node_id, addr, size, expires = value[:4]
        started = value[4] if len(value) >= 5 else 0.0
        sig = value[5] if len(value) >= 6 else b""
        cached = value[6] if len(value) == 7 else False
        if not isinstance(cached, bool):
            raise ValueError("provider cache flag must be a boolean")
        if not (isinstance(node_id, bytes) and len(node_id) == 20):
            raise ValueError("provider node id must be 20 bytes")
        if not (isinstance(addr, str) and 0 < len(addr) <= 262 and ":" in addr):
            raise ValueError("provider address must be host:port")
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
            raise ValueError("provider size must be a non-negative integer")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise ValueError("provider expiry must be a number")
        if not isinstance(started, (int, float)) or isinstance(started, bool) or started < 0:
            raise ValueError("provider start time must be a non-negative number")
        if not (isinstance(sig, bytes) and len(sig) in (0, 64)):
            raise ValueError("provider signature must be 64 bytes")
        return cls(node_id, addr, size, float(expires), float(started), sig, cached)


class ProviderStore:
    """key (20 bytes) -> {node id -> record}; expired records vanish on access."""

    def __init__(self, max_per_key: int = MAX_PROVIDERS_PER_KEY,
                 max_per_publisher: int = MAX_RECORDS_PER_PUBLISHER) -> None:
        self.max_per_key = max_per_key
        self.max_per_publisher = max_per_publisher
        self._data: dict[bytes, dict[bytes, ProviderRecord]] = {}
        self._count: dict[bytes, int] = {}  # publisher -> records held (may count expired ones)

    def add(self, key: bytes, rec: ProviderRecord) -> bool:
        """Keep `rec`; False if its publisher already fills its share of this store."""
        if rec.node_id not in self._data.get(key, {}):
            if self._count.get(rec.node_id, 0) >= self.max_per_publisher:
                self._recount()
                if self._count.get(rec.node_id, 0) >= self.max_per_publisher:
                    return False
            self._count[rec.node_id] = self._count.get(rec.node_id, 0) + 1
        recs = self._data.setdefault(key, {})
        recs[rec.node_id] = rec
        if len(recs) > self.max_per_key:
            oldest = min(recs.values(), key=lambda r: r.expires)
            del recs[oldest.node_id]
            self._count[oldest.node_id] = max(0, self._count.get(oldest.node_id, 1) - 1)
        return True

    def _recount(self) -> None:
        """Drop expired records and count again (cheap enough when a publisher hits its cap)."""
        now = time.time()
        counts: dict[bytes, int] = {}
        for key in list(self._data):
            live = {nid: r for nid, r in self._data[key].items() if r.expires > now}
            if live:
                self._data[key] = live
                for nid in live:
                    counts[nid] = counts.get(nid, 0) + 1
            else:
                del self._data[key]
        self._count = counts

    def remove(self, key: bytes, node_id: bytes) -> bool:
        recs = self._data.get(key)
        if not recs or node_id not in recs:
            return False
        del recs[node_id]
        self._count[node_id] = max(0, self._count.get(node_id, 1) - 1)
        if not recs:
            del self._data[key]
        return True

    def drop(self, key: bytes) -> None:
        """Every record under `key` (a purged digest's)."""
        for node_id in list(self._data.get(key, {})):
            self.remove(key, node_id)

    def get(self, key: bytes, now: float | None = None) -> list[ProviderRecord]:
        now = time.time() if now is None else now
        recs = self._data.get(key)
        if not recs:
            return []
        live = {nid: r for nid, r in recs.items() if r.expires > now}
        if live:
            self._data[key] = live
        else:
            del self._data[key]
        return sorted(live.values(), key=lambda r: -r.expires)

    def keys(self) -> list[bytes]:
        return list(self._data)
