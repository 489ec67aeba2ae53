"""Where a blob lives upstream, so that a fetch peers cannot finish is finished from the
registry instead of failing the pull.

containerd keeps its `containerd.io/distribution.source.<registry>=<repository>` labels in
its own database; a content proxy never sees them (../shared/notes/containerd-pull-trace.md).
The registry mirror does see where things come from: every manifest containerd resolves
through it names its registry (`?ns=`) and repository.  Those manifests end up in the local
store, and their config, layers and (for an index) child manifests are the blobs containerd
asks `Info` about next: a blob's repository is that of a resolved manifest that references
it.  Memory is bounded: the newest `max_entries` manifests and blobs are remembered.

`named` answers, from memory, which repository and size the newest resolved manifest gives a
config or layer: what `Info` needs to claim a blob that cs-p2p then fetches itself (from peers,
else from that registry), so that containerd never downloads it (`fetch.source.PeerSource.claim`).
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ..errors import InvalidArgument
from .pieces import Origin

MAX_MANIFEST = 4 << 20


@dataclass(frozen=True)
class Location:
    host: str  # the registry, as containerd names it (`ns`)
    repo: str

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}"


@dataclass(frozen=True)
class Refs:
    children: frozenset[str]  # child manifests (an index's)
    blobs: frozenset[str]  # config and layers
    sizes: tuple[tuple[str, int], ...] = ()  # config and layers with the sizes their descriptors give
    config: str = ""  # the config's digest


@dataclass(frozen=True)
class Named:
    """A config or layer as a resolved manifest describes it."""
    where: Location
    size: int
    config: bool = False  # the image's config (containerd reads it before it asks for a layer)


class Claimable(NamedTuple):
    """A config or layer cs-p2p may fetch itself (`PeerSource.claim`): its size, the registry
    it comes from, and whether it is an image's config."""
    size: int
    origin: Origin
    config: bool = False


MAX_PENDING = 64  # resolved manifests not in the local store yet, looked for on the next `named`


class Origins:
    def __init__(self, blob_path: Callable[[str], str], max_entries: int = 4096) -> None:
        self.blob_path = blob_path  # digest -> its file in the local store
        self.max_entries = max_entries
        self._blobs: collections.OrderedDict[str, Location] = collections.OrderedDict()
        self._manifests: collections.OrderedDict[str, Location] = collections.OrderedDict()
        self._references: dict[str, frozenset[str]] = {}  # manifest -> what it references, once complete
        # a document's own references, parsed once (content-addressed: they never change)
        self._parsed: collections.OrderedDict[str, Refs] = collections.OrderedDict()
        # config or layer -> what the newest manifest resolved here says of it (`named`)
        self._named: collections.OrderedDict[str, Named] = collections.OrderedDict()
        self._pending: collections.OrderedDict[str, Location] = collections.OrderedDict()

    def _remember(self, table: collections.OrderedDict, digest: str, where: Location | Named) -> None:
        table[digest] = where
        table.move_to_end(digest)
        while len(table) > self.max_entries:
            gone, _ = table.popitem(last=False)
            self._references.pop(gone, None)

    def manifest_seen(self, host: str, repo: str, digest: str) -> None:
        """The mirror resolved or served manifest `digest` of `host/repo`."""
        self._remember(self._manifests, digest, Location(host, repo))
        self._remember(self._blobs, digest, Location(host, repo))
        self._pending[digest] = Location(host, repo)  # its blobs are indexed once it is in the store
        self._pending.move_to_end(digest)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def manifest_body(self, host: str, repo: str, digest: str, body: bytes) -> None:
        """The mirror holds manifest `digest` of `host/repo` (checked against its digest): its
        config and layers are indexed now, before containerd writes it into the store."""
        self.manifest_seen(host, repo, digest)
        try:
            doc = json.loads(body)
        except ValueError:
            return
        if isinstance(doc, dict):
            self._index(digest, Location(host, repo), self._parse(digest, doc))

    def named(self, digest: str) -> Named | None:
        """Repository and size of config or layer `digest` by the newest manifest resolved here
        that names it; None if none does.  Memory only, but for manifests resolved since the
        last call, each read once from the local store (`Info` runs inside containerd's
        metadata transaction: no network)."""
        for manifest in list(self._pending):
            refs = self._refs(manifest)
            if refs is not None:
                self._index(manifest, self._pending.pop(manifest), refs)
        named = self._named.get(digest)
        if named is not None:
            self._named.move_to_end(digest)
        return named

    def _index(self, manifest: str, where: Location, refs: Refs) -> None:
        self._pending.pop(manifest, None)
        for digest, size in refs.sizes:
            self._remember(self._named, digest, Named(where, size, digest == refs.config))

    def blob_seen(self, host: str, repo: str, digest: str) -> None:
        self._remember(self._blobs, digest, Location(host, repo))

    def is_manifest(self, digest: str) -> bool:
        """A resolved manifest, or a child manifest of a resolved index: registries serve those
        from `/manifests/`, not necessarily from `/blobs/`."""
        return digest in self._manifests or any(self._is_child_manifest(m, digest) for m in self._manifests)

    def _is_child_manifest(self, index: str, digest: str) -> bool:
        refs = self._refs(index)
        return refs is not None and digest in refs.children

    def locate(self, digest: str) -> Location | None:
        """The repository `digest` was pulled from, or None if no resolved manifest names it."""
        where = self._blobs.get(digest)
        if where is not None:
            return where
        for manifest, where in reversed(self._manifests.items()):
            if digest in self.references(manifest):
                self.blob_seen(where.host, where.repo, digest)
                return where
        return None

    def references(self, manifest: str) -> frozenset[str]:
        """Config, layers and child manifests (with theirs) of a manifest in the local store."""
        known = self._references.get(manifest)
        if known is not None:
            return known
        refs: set[str] = set()
        complete = True
        pending = [manifest]
        while pending:
            own = self._refs(pending.pop())
            if own is None:
                complete = False
                continue
            refs |= own.children | own.blobs
            pending.extend(own.children)
        result = frozenset(refs)
        if complete:
            if len(self._references) >= 2 * self.max_entries:
                self._references.clear()  # asked of manifests the tables forgot (`mirror.access`)
            self._references[manifest] = result
        return result

    def _refs(self, digest: str) -> "Refs | None":
        """What the document `digest` references itself, read and parsed once; None while it
        is not in the local store (or is no manifest)."""
        refs = self._parsed.get(digest)
        if refs is not None:
            self._parsed.move_to_end(digest)
            return refs
        doc = self._load(digest)
        if doc is None:
            return None
        return self._parse(digest, doc)

    def _parse(self, digest: str, doc: dict) -> Refs:
        refs = self._parsed.get(digest)
        if refs is not None:
            return refs
        children = frozenset(c["digest"] for c in doc.get("manifests") or []
                             if isinstance(c, dict) and isinstance(c.get("digest"), str))
        described = [d for d in [doc.get("config"), *(doc.get("layers") or [])]
                     if isinstance(d, dict) and isinstance(d.get("digest"), str)]
        sizes = tuple((d["digest"], d["size"]) for d in described
                      if isinstance(d.get("size"), int) and not isinstance(d["size"], bool) and d["size"] > 0)
        config = doc.get("config")
        refs = self._parsed[digest] = Refs(children, frozenset(d["digest"] for d in described), sizes,
                                           config["digest"] if described and described[0] is config else "")
        while len(self._parsed) > self.max_entries:
            self._parsed.popitem(last=False)
        return refs

    def _load(self, digest: str) -> dict | None:
        try:
            path = self.blob_path(digest)
            if os.path.getsize(path) > MAX_MANIFEST:
                return None
            with open(path, "rb") as f:
                doc = json.loads(f.read())
        except (OSError, ValueError, InvalidArgument):  # not here (yet), not a digest, or not JSON
            return None
        return doc if isinstance(doc, dict) else None
