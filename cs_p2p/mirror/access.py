"""Who may read what through the mirror: the registry's answers to each request's own
credentials, remembered briefly (to confirm) and for a while (to ride out an outage).

Digests are not secrets, and a node's store and its peers hold every image any node pulled.
So nothing leaves the mirror for a repository unless the registry said, to these credentials,
that they may read this digest in this repository (`docs/security.md`, the tenant model):

- `confirmed`: the registry answered 200 for (credentials, repository, digest) within
  `confirm_ttl` — directly, or for a manifest that references the digest (a registry accepts a
  manifest only when its blobs are in the repository, so a rollout costs one confirmation per
  image and node, not one per blob).
- During an outage (`outage_refusal`): a repository anonymous requests were let read within
  `outage_window` is public and served to anyone; a private one only to credentials the
  registry accepted for it within that window; and either only for digests recorded as that
  repository's (confirmed there, or named by a cluster member's record of it, `note_record`).

Credentials are never kept: `who` is a keyed hash (HMAC-SHA256 under a random key of this
node's, 0600 in the state directory) of the `Authorization` a request carried.  Outage records
are saved in that directory, so a restart during an outage changes nothing.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Callable, Iterable

from ..store.blobs import write_file_atomic

log = logging.getLogger("cs_p2p.mirror")

ANONYMOUS = "anonymous"  # no credentials at all: what the registry lets anyone read
NODE = "node"  # the mirror's own credentials (credentials-file): what every workload on the node may read
MAX_CONFIRMED = 100_000  # fresh confirmations kept
MAX_RECORDED = 20_000  # (credentials, repository) acceptances and repository digests kept for outages
_SAVE_EVERY = 60.0  # seconds: a record seen again is saved again only this much later


class Grants:
    def __init__(self, state_dir: str, confirm_ttl: float = 60.0, outage_window: float = 6 * 3600.0,
                 references: Callable[[str], Iterable[str]] = lambda digest: ()) -> None:
        """`references(manifest)`: the digests a manifest in the local store names (with its
        child manifests'), empty while it is not here."""
        self.confirm_ttl = confirm_ttl
        self.outage_window = outage_window
        self.references = references
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._key = _load_or_create_key(os.path.join(state_dir, "key"))
        self._path = os.path.join(state_dir, "grants.json")
        # (who, host, repo) -> {digest: monotonic expiry}
        self._fresh: dict[tuple[str, str, str], collections.OrderedDict[str, float]] = {}
        self._fresh_count = 0
        # For outages, in unix time: (who, host, repo) -> accepted; (host, repo, digest) -> confirmed there.
        self._accepted: collections.OrderedDict[tuple[str, str, str], float] = collections.OrderedDict()
        self._bound: collections.OrderedDict[tuple[str, str, str], float] = collections.OrderedDict()
        self._load()

    def who(self, authorization: str | None, node_credentials: bool) -> str:
        """The identity a request reads as: its own credentials (hashed), else the mirror's, else nobody's."""
        if authorization:
            return hmac.new(self._key, authorization.encode(), hashlib.sha256).hexdigest()[:32]
        return NODE if node_credentials else ANONYMOUS

    def confirm(self, who: str, host: str, repo: str, digest: str) -> None:
        """The registry let `who` read `digest` in `host/repo` just now."""
        fresh = self._fresh.setdefault((who, host, repo), collections.OrderedDict())
        if digest not in fresh:
            self._fresh_count += 1
        fresh[digest] = time.monotonic() + self.confirm_ttl
        fresh.move_to_end(digest)
        if self._fresh_count > MAX_CONFIRMED:
            self._expire_fresh()
        now = time.time()
        changed = _touch(self._accepted, (who, host, repo), now)
        changed |= _touch(self._bound, (host, repo, digest), now)
        if changed:
            self._save()

    def note_record(self, host: str, repo: str, digest: str, seen: float, public: bool) -> None:
        """A cluster member's record says the registry confirmed `digest` in `host/repo` at `seen`
        (a tag or digest record, `dht.tags`), to a request without credentials if `public`."""
        changed = _touch(self._bound, (host, repo, digest), seen)
        if public:
            changed |= _touch(self._accepted, (ANONYMOUS, host, repo), seen)
        if changed:
            self._save()

    def confirmed(self, who: str, host: str, repo: str, digest: str) -> bool:
        fresh = self._fresh.get((who, host, repo))
        if not fresh:
            return False
        now = time.monotonic()
        if fresh.get(digest, 0.0) > now:
            return True
        return any(until > now and digest in self.references(manifest) for manifest, until in fresh.items()
                   if manifest != digest)

    def outage_refusal(self, who: str, host: str, repo: str, digest: str) -> str | None:
        """Why `who` may not read `digest` in `host/repo` while the registry cannot be asked, or
        None if it may."""
        horizon = time.time() - self.outage_window
        if not self._recorded_in(host, repo, digest, horizon):
            return "outage_not_in_repository"
        if self._accepted.get((ANONYMOUS, host, repo), 0.0) > horizon:
            return None  # public: anonymous reads were allowed
        if self._accepted.get((who, host, repo), 0.0) > horizon:
            return None
        return "outage_unknown_credentials"

    def _recorded_in(self, host: str, repo: str, digest: str, horizon: float) -> bool:
        if self._bound.get((host, repo, digest), 0.0) > horizon:
            return True
        return any(h == host and r == repo and seen > horizon and digest in self.references(manifest)
                   for (h, r, manifest), seen in self._bound.items() if manifest != digest)

    def _expire_fresh(self) -> None:
        now = time.monotonic()
        for key in list(self._fresh):
            live = collections.OrderedDict((d, t) for d, t in self._fresh[key].items() if t > now)
            if live:
                self._fresh[key] = live
            else:
                del self._fresh[key]
        self._fresh_count = sum(len(v) for v in self._fresh.values())
        while self._fresh_count > MAX_CONFIRMED and self._fresh:  # all fresh: the oldest identities go
            key = next(iter(self._fresh))
            self._fresh_count -= len(self._fresh.pop(key))

    def _load(self) -> None:
        try:
            with open(self._path) as f:
                doc = json.load(f)
            for who, host, repo, at in doc.get("accepted", []):
                self._accepted[(who, host, repo)] = float(at)
            for host, repo, digest, at in doc.get("bound", []):
                self._bound[(host, repo, digest)] = float(at)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("outage records unreadable: starting without them", extra={"path": self._path,
                                                                                   "error": str(exc)})

    def _save(self) -> None:
        horizon = time.time() - self.outage_window
        for table in (self._accepted, self._bound):
            for key in [k for k, at in table.items() if at <= horizon]:
                del table[key]
        doc = {"accepted": [[*k, at] for k, at in self._accepted.items()],
               "bound": [[*k, at] for k, at in self._bound.items()]}
        try:
            write_file_atomic(self._path, json.dumps(doc).encode(), 0o600)
        except OSError as exc:
            log.warning("outage records not saved", extra={"path": self._path, "error": str(exc)})


def _touch(table: collections.OrderedDict, key: tuple, now: float) -> bool:
    """Record `key` as seen `now` (unless seen later already); True if that is news worth saving."""
    before = table.get(key)
    if before is not None and before >= now:
        return False
    table[key] = now
    table.move_to_end(key)
    while len(table) > MAX_RECORDED:
        table.popitem(last=False)
    return before is None or now - before > _SAVE_EVERY


def _load_or_create_key(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    write_file_atomic(path, key, 0o600)
    return key
