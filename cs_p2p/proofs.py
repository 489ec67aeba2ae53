"""Proofs of storage, the format both sides share: a challenge names a blob, a nonce and a
range; the answer is sha256(nonce || bytes[offset:offset+length]), which cannot be computed
without the bytes nor ahead of the nonce.  In key-pair mode the holder signs the answer over
the digest, nonce, range and answer (`signable`).  Who challenges whom, and what a failed
proof costs: `challenger`."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from .digests import parse_digest

MAX_RANGE = 256 << 10  # bytes one challenge covers at most
SIG_HEADER = "X-CS-P2P-Proof-Sig"


@dataclass(frozen=True)
class Challenge:
    digest: str
    nonce: bytes
    offset: int
    length: int

    @property
    def query(self) -> str:
        return f"nonce={self.nonce.hex()}&offset={self.offset}&length={self.length}"


def answer(path: str, ch: Challenge) -> str:
    """sha256(nonce || bytes[offset:offset+length]) of the file at `path`."""
    h = hashlib.sha256(ch.nonce)
    with open(path, "rb") as f:
        f.seek(ch.offset)
        data = f.read(ch.length)
    if len(data) != ch.length:
        raise ValueError("range past the end of the blob")
    h.update(data)
    return h.hexdigest()


def signable(ch: Challenge, result: str) -> bytes:
    return b"cs-p2p/v1/proof/" + "/".join([ch.digest, ch.nonce.hex(), str(ch.offset), str(ch.length),
                                            result]).encode()


def parse_challenge(digest: str, query) -> Challenge:
    """From the peer server's query string; ValueError if malformed."""
    parse_digest(digest)
    nonce = bytes.fromhex(query.get("nonce", ""))
    offset, length = int(query.get("offset", "")), int(query.get("length", ""))
    if not 8 <= len(nonce) <= 64 or offset < 0 or not 0 < length <= MAX_RANGE:
        raise ValueError("nonce of 8 to 64 bytes, offset >= 0, 0 < length <= 256 KiB")
    return Challenge(digest, nonce, offset, length)


def pick(digest: str, size: int, budget: int) -> Challenge | None:
    """A fresh challenge over a random range of a blob of `size` bytes, at most `budget` long."""
    length = min(size, MAX_RANGE, budget)
    if length <= 0:
        return None
    return Challenge(digest, os.urandom(16), random.randrange(0, size - length + 1), length)


