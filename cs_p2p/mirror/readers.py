"""With which credentials cs-p2p itself may download a repository's blobs from its registry.

When containerd resolves a manifest through the mirror, the registry has just accepted that
request: anonymously, with this node's own credentials (`credentials-file`), or with the
`Authorization` containerd sent (a pull secret, `ctr --user`).  The blobs that manifest names
can then be fetched by cs-p2p with the same credentials instead of by containerd through its
`Write` path (`fetch.source.PeerSource.claim`).

containerd's own credentials are kept in memory only, per repository, for no longer than
they are good for: `ttl` seconds after the request that presented them (a pull asks `Info`
of its blobs right after resolving the manifest), and never past the expiry a bearer token
states itself (`exp` of a JWT).  A fetch that started with them keeps them until it ends.
They are never written to disk, logged or published.
"""

from __future__ import annotations

import base64
import collections
import json
import time
from dataclasses import dataclass

MAX_REPOSITORIES = 1024


@dataclass(frozen=True)
class Reader:
    authorization: str | None  # None: anonymously or with the node's own credentials
    until: float  # time.monotonic() after which it is not used for new fetches


def token_expiry(authorization: str) -> float | None:
    """The unix time a bearer JWT says it expires at (unverified: only to stop using it
    sooner), or None for anything else."""
    scheme, _, token = authorization.partition(" ")
    parts = token.split(".")
    if scheme.lower() != "bearer" or len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class Readers:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._by_repo: collections.OrderedDict[tuple[str, str], Reader] = collections.OrderedDict()

    def accepted(self, host: str, repo: str, authorization: str | None) -> None:
        """The registry at `host` accepted a read of `repo` made with `authorization` (None:
        anonymous or the node's own credentials)."""
        until = time.monotonic() + self.ttl
        if authorization:
            expiry = token_expiry(authorization)
            if expiry is not None:
                until = min(until, time.monotonic() + expiry - time.time())
        key = (host, repo)
        self._by_repo[key] = Reader(authorization, until)
        self._by_repo.move_to_end(key)
        while len(self._by_repo) > MAX_REPOSITORIES:
            self._by_repo.popitem(last=False)

    def current(self, host: str, repo: str) -> Reader | None:
        """How to read `repo` now, or None if no request was accepted for it recently."""
        reader = self._by_repo.get((host, repo))
        if reader is None:
            return None
        if reader.until <= time.monotonic():
            del self._by_repo[(host, repo)]
            return None
        return reader
