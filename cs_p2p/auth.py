"""Cluster membership by a shared join token: every DHT datagram and peer request is
authenticated with keys derived from it, and anything else is dropped without a reply.

The token (a secret file, e.g. a mounted Kubernetes Secret) never travels: separate keys are
derived from it for the DHT and for peer transfers (HMAC-SHA256 as the KDF), so a leak of
one use does not give the other.  Each message carries its time and a random nonce under the
MAC; a receiver accepts a time within `WINDOW` seconds of its own and each nonce once, so a
captured message cannot be replayed.  What a token cannot do — tell members apart — is
written down in docs/security.md.

Rotation without downtime: the token file may hold several tokens, one per line.  Messages
are sealed with the first and accepted under any of them, so a new token is added (second
line) everywhere, then moved to the first line everywhere, then the old one removed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
import time

WINDOW = 30.0  # seconds of clock difference (and of replay memory)
TAG_LEN = 16
MIN_TOKEN_BYTES = 16
_TRAILER = struct.Struct("!QQ")  # time in ms, nonce
HEADER = "X-CS-P2P-Auth"


class AuthError(Exception):
    pass


def load_tokens(path: str) -> list[bytes]:
    """The join tokens in a file, one per line (blank lines and surrounding space ignored);
    the first is the one this node seals with."""
    try:
        with open(path, "rb") as f:
            tokens = [line.strip() for line in f.read().splitlines() if line.strip()]
    except OSError as exc:
        raise AuthError(f"cannot read cluster token {path}: {exc.strerror}") from None
    if not tokens:
        raise AuthError(f"no cluster token in {path}")
    if any(len(t) < MIN_TOKEN_BYTES for t in tokens):
        raise AuthError(f"a cluster token in {path} is shorter than {MIN_TOKEN_BYTES} bytes")
    return tokens


def derive(token: bytes, purpose: str) -> bytes:
    return hmac.new(token, b"cs-p2p/v1/" + purpose.encode(), hashlib.sha256).digest()


class ReplayGuard:
    """Nonces seen within the time window; older ones fall out (bounded memory)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[int, float] = {}
        self._order: collections.deque[tuple[float, int]] = collections.deque()
        self.max_entries = max_entries

    def fresh(self, stamp_ms: int, nonce: int, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if abs(now - stamp_ms / 1000) > WINDOW:
            return False
        while self._order and (self._order[0][0] < now - 2 * WINDOW or len(self._order) > self.max_entries):
            _, old = self._order.popleft()
            self._seen.pop(old, None)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        self._order.append((now, nonce))
        return True


class Sealer:
    """MACs for one purpose ("dht", "peer") under the cluster token(s): sealed with the first,
    opened under any."""

    def __init__(self, tokens: bytes | list[bytes], purpose: str) -> None:
        tokens = [tokens] if isinstance(tokens, bytes) else tokens
        self.keys = [derive(t, purpose) for t in tokens]
        self.replays = ReplayGuard()

    @staticmethod
    def _tag(key: bytes, body: bytes, trailer: bytes) -> bytes:
        return hmac.new(key, body + trailer, hashlib.sha256).digest()[:TAG_LEN]

    def seal(self, body: bytes) -> bytes:
        """`body` + time + nonce + tag."""
        trailer = _TRAILER.pack(int(time.time() * 1000), int.from_bytes(os.urandom(8), "big"))
        return body + trailer + self._tag(self.keys[0], body, trailer)

    def open(self, sealed: bytes) -> bytes:
        """The body of a sealed message; AuthError if forged, stale or replayed."""
        if len(sealed) < _TRAILER.size + TAG_LEN:
            raise AuthError("message too short")
        body, trailer = sealed[: -_TRAILER.size - TAG_LEN], sealed[-_TRAILER.size - TAG_LEN: -TAG_LEN]
        tag = sealed[-TAG_LEN:]
        if not any(hmac.compare_digest(self._tag(key, body, trailer), tag) for key in self.keys):
            raise AuthError("bad message authentication code")
        stamp, nonce = _TRAILER.unpack(trailer)
        if not self.replays.fresh(stamp, nonce):
            raise AuthError("stale or replayed message")
        return body

    def unseal(self, sealed: bytes) -> tuple[bytes, None]:
        """The body, and who sent it: a token cannot tell members apart, so nobody in particular."""
        return self.open(sealed), None

    # HTTP: the request line is sealed into a header instead of the body.
    def request_header(self, method: str, path: str) -> str:
        return self.seal(f"{method} {path}".encode())[-(_TRAILER.size + TAG_LEN):].hex()

    def check_request(self, method: str, path: str, header: str | None) -> None:
        try:
            trailer = bytes.fromhex(header or "")
        except ValueError:
            raise AuthError("malformed authentication header") from None
        if len(trailer) != _TRAILER.size + TAG_LEN:
            raise AuthError("missing or malformed authentication header")
        self.open(f"{method} {path}".encode() + trailer)
