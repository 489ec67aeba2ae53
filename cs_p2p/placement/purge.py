"""`cs-p2p purge REF|DIGEST`, on the node that runs it (through its admin socket).

The node works out what to purge and issues the purge (`purges`, `dht.node.DhtNode.purge`):

- a digest: that blob, and, if it is a manifest or an index, every manifest, config and layer
  it names;
- `registry/repository:tag`: every manifest the cluster's tag records say that tag pointed at
  (not what the registry says now: after a bad release is replaced, the purge is of what nodes
  still hold), with what they name, and the tag itself: nodes resolve it from the registry only
  from then on;
- `registry/repository@digest`: as the digest.

Manifests this node lacks are taken from peers to read what they name (into the cache, which
the purge then empties of them).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from ..digests import parse_digest
from ..errors import InvalidArgument
from .preheat import MAX_MANIFEST, parse_ref

if TYPE_CHECKING:
    from ..dht.node import DhtNode
    from ..fetch.source import PeerSource
    from ..store import LocalStore

log = logging.getLogger("cs_p2p.purge")


class PurgeError(ValueError):
    """A target that cannot be purged (bad reference, nothing known of it)."""


class Purger:
    def __init__(self, dht: "DhtNode", store: "LocalStore", peers: "PeerSource") -> None:
        self.dht = dht
        self.store = store
        self.peers = peers

    async def purge(self, target: str) -> dict:
        """Purge `target`; returns what was purged and how many contacts took it at once."""
        try:
            host, name, reference = parse_ref(target.strip())
        except InvalidArgument as exc:
            raise PurgeError(str(exc)) from None
        tag = ""
        if reference.startswith("sha256:"):
            roots = [reference]
        else:
            tag = f"{host}/{name}:{reference}"
            roots = sorted({r.digest for r in await self.dht.tag_records(tag)})
            if not roots:
                raise PurgeError(f"no node has resolved {tag} (no tag record): nothing to purge by tag; "
                                 "purge the image's digest instead")
        digests, unread = await self._expand(roots)
        records, reached = await self.dht.purge(tag, sorted(digests))
        log.warning("purge issued", extra={"target": target, "digests": len(digests), "contacts_told": reached})
        return {"target": target, "reference": tag, "digests": sorted(digests), "records": len(records),
                "contacts_told": reached, "contacts": len(self.dht.contacts()), "unread_manifests": unread}

    async def _expand(self, roots: list[str]) -> tuple[set[str], list[str]]:
        """`roots` and everything the manifests among them name; the roots that could not be read
        (held by no node, or not a manifest: then they are purged alone)."""
        found, pending, unread = set(roots), list(roots), []
        while pending:
            digest = pending.pop()
            doc = await self._document(digest)
            if doc is None:
                unread.append(digest)
                continue
            named = [d.get("digest") for d in [doc.get("config"), *(doc.get("layers") or []),
                                               *(doc.get("manifests") or [])] if isinstance(d, dict)]
            for child in named:
                try:
                    parse_digest(child)
                except (InvalidArgument, TypeError):
                    continue
                if child not in found:
                    found.add(child)
                    if any(isinstance(m, dict) and m.get("digest") == child for m in doc.get("manifests") or []):
                        pending.append(child)
        return found, [d for d in unread if d in roots]

    async def _document(self, digest: str) -> dict | None:
        """Manifest or index `digest` as JSON, from this node or its peers; None if it is neither."""
        path = self.store.served_path(parse_digest(digest))
        if path is None:
            held_by = await self.dht.find_providers(digest, want=1)
            if not held_by or held_by[0].size > MAX_MANIFEST:
                return None  # nobody has it, or too big for a manifest: not worth fetching
            await self.peers.replicate(digest, held_by[0].size)
            path = self.store.served_path(parse_digest(digest))
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read(MAX_MANIFEST + 1))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and ("layers" in doc or "manifests" in doc) else None
