"""Purges: blobs (and a tag) the cluster stops sharing, for good (`cs-p2p purge`).

An image with a leaked secret, or a bad release: an operator on a member node purges it, and
every node stops serving those blobs to peers and through its mirror, drops its cached copies,
withdraws its provider records and refuses anyone else's, and resolves a purged tag from the
registry only.  A purge is a record like a provider record — issued by a member, signed by its
key in key-pair mode — that every node keeps (here, saved under the root) and hands to the
others (`dht.node`: pushed when issued, pulled by every node now and then and when it joins), so
a node that was down learns it when it is back, and no republished record brings a blob back.

Blobs that containerd itself still references on a node stay with that containerd: the purge
stops their sharing, not the node's own use of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

from .digests import parse_digest
from .errors import InvalidArgument

log = logging.getLogger("cs_p2p.purge")

PURGE_KEY = hashlib.sha1(b"cs-p2p/purges").digest()  # what purge records are signed over
MAX_DIGESTS = 128  # per record (4.3 KiB as raw hashes): a bigger image is purged by several records
MAX_REFERENCE = 512
MAX_RECORDS = 10_000


@dataclass(frozen=True)
class PurgeRecord:
    node_id: bytes  # the issuing node
    issued: float  # unix time
    reference: str  # "registry/repository:tag" purged, or ""
    digests: tuple[str, ...]  # the manifests and blobs purged
    sig: bytes = b""  # the issuer's signature (key-pair mode, `identity`)

    @property
    def id(self) -> bytes:
        """The same on every node: what nodes compare to find the records they lack."""
        fields = [self.node_id, self.issued, self.reference, [parse_digest(d) for d in self.digests]]
        return hashlib.sha1(json.dumps(fields, default=bytes.hex).encode()).digest()

    def to_wire(self) -> list:
        fields = [self.node_id, self.issued, self.reference, [bytes.fromhex(parse_digest(d)) for d in self.digests]]
        return fields + [self.sig] if self.sig else fields

    @classmethod
    def from_wire(cls, value: object) -> "PurgeRecord":
        if not isinstance(value, (list, tuple)) or len(value) not in (4, 5):
            raise ValueError("purge record must have 4 or 5 fields")
        node_id, issued, reference, raw = value[:4]
        sig = value[4] if len(value) == 5 else b""
        if not (isinstance(node_id, bytes) and len(node_id) == 20):
            raise ValueError("purge issuer must be a 20-byte node id")
        if not isinstance(issued, (int, float)) or isinstance(issued, bool) or issued > time.time() + 60:
            raise ValueError("purge time must be a number, not in the future")
        if not (isinstance(reference, str) and len(reference) <= MAX_REFERENCE):
            raise ValueError("purge reference must be a short string")
        if not (isinstance(raw, list) and 0 < len(raw) <= MAX_DIGESTS
                and all(isinstance(d, bytes) and len(d) == 32 for d in raw)):
            raise ValueError(f"purge digests must be 1 to {MAX_DIGESTS} sha256 hashes")
        if not (isinstance(sig, bytes) and len(sig) in (0, 64)):
            raise ValueError("purge signature must be 64 bytes")
        return cls(node_id, float(issued), reference, tuple("sha256:" + d.hex() for d in raw), sig)


class PurgeList:
    """Every purge this node knows, saved in `path` (one JSON record a line, appended)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._records: dict[bytes, PurgeRecord] = {}
        self._digests: set[str] = set()
        self._references: dict[str, float] = {}  # reference -> when it was last purged
        self.listeners: list[Callable[[PurgeRecord], None]] = []  # told of each new record
        self._load()

    def __len__(self) -> int:
        return len(self._records)

    def purged(self, digest: str) -> bool:
        return digest in self._digests

    def reference_purged_at(self, reference: str) -> float | None:
        """When `reference` (`host/repo:tag`) was last purged: tag records from before then are void."""
        return self._references.get(reference)

    def ids(self) -> list[bytes]:
        return list(self._records)

    def get(self, record_id: bytes) -> PurgeRecord | None:
        return self._records.get(record_id)

    def add(self, rec: PurgeRecord) -> bool:
        """Keep `rec` (checked by the caller); False if it was known (or the list is full)."""
        if rec.id in self._records or len(self._records) >= MAX_RECORDS:
            return False
        self._take(rec)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps([rec.node_id.hex(), rec.issued, rec.reference, list(rec.digests), rec.sig.hex()]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.warning("purged", extra={"reference": rec.reference, "digests": len(rec.digests),
                                     "issuer": rec.node_id.hex()})
        for listener in self.listeners:
            listener(rec)
        return True

    def _take(self, rec: PurgeRecord) -> None:
        self._records[rec.id] = rec
        self._digests.update(rec.digests)
        if rec.reference:
            self._references[rec.reference] = max(rec.issued, self._references.get(rec.reference, 0.0))

    def _load(self) -> None:
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                node_id, issued, reference, digests, sig = json.loads(line)
                for d in digests:
                    parse_digest(d)
                self._take(PurgeRecord(bytes.fromhex(node_id), float(issued), reference, tuple(digests),
                                       bytes.fromhex(sig)))
            except (ValueError, TypeError, InvalidArgument):
                log.warning("unreadable purge record skipped", extra={"path": self.path})  # a torn last line
