"""Preheat: bring every blob of an image into the cluster before a rollout needs it.

Without it, the first node of a rollout waits on the registry for every layer.  `cs-p2p
preheat REF` asks one node (through its mirror's listener) to resolve the image as containerd
would, take every blob it lacks — from peers, or from the registry the mirror resolved it at —
into its cache, and then wait until the replication floor (`floor`) has brought each blob to
`replicas` holders.  The node reports progress as it goes, one JSON object a line, and a
summary at the end: bytes from the registry, bytes from peers, time.

REF is `registry/repository:tag`, `registry/repository@sha256:…` (the registry must be one the
mirror serves), or a bare manifest digest some node already holds (then every blob must come
from peers).  For an index, every platform's manifest is taken, or those asked
(`os/arch[/variant]`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from aiohttp import web

from ..digests import parse_digest
from ..errors import InvalidArgument
from ..fetch.fetcher import ORIGIN
from .floor import keep_for_cluster

if TYPE_CHECKING:
    from ..dht.node import DhtNode
    from ..fetch.source import PeerSource
    from ..mirror.server import Mirror
    from ..service.content import ContentEvents
    from ..store import LocalStore

log = logging.getLogger("cs_p2p.placement")

PATH = "/_cs-p2p/v1/preheat"
PARALLEL = 4  # blobs fetched at once
POLL = 1.0  # seconds between counts of holders
MAX_MANIFEST = 4 << 20
MANIFEST_TYPES = ("manifest", "index")


def floor_wait(check_interval: float) -> float:
    """How long preheat waits for the floor's copies: a few rounds of checks (the closest node
    copies at its first check, the next ones two checks later per place), at least a minute."""
    return max(60.0, 6 * check_interval)


class PreheatError(Exception):
    pass


@dataclass
class Blob:
    digest: str
    size: int
    kind: str  # index, manifest, config or layer


@dataclass
class Totals:
    blobs: int = 0
    bytes: int = 0
    from_registry: int = 0
    from_peers: int = 0
    held: int = 0
    below_floor: list[str] = field(default_factory=list)


def parse_ref(ref: str) -> tuple[str, str, str]:
    """(registry, repository, tag or digest); registry and repository are "" for a bare digest."""
    if ref.startswith("sha256:"):
        parse_digest(ref)
        return "", "", ref
    host, sep, rest = ref.partition("/")
    if not sep or not rest:
        raise InvalidArgument(f"{ref!r}: expected REGISTRY/REPOSITORY:TAG, REGISTRY/REPOSITORY@DIGEST or a digest")
    if "@" in rest:
        name, _, reference = rest.partition("@")
        parse_digest(reference)
    else:
        name, colon, reference = rest.rpartition(":")
        if not colon:
            name, reference = rest, "latest"
    return host, name, reference


def platform_matches(desc: dict, wanted: list[str]) -> bool:
    if not wanted:
        return True
    p = desc.get("platform") if isinstance(desc.get("platform"), dict) else {}
    have = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x)
    return any(have == w or have.startswith(w + "/") for w in wanted)


class Preheater:
    def __init__(self, mirror: "Mirror", peers: "PeerSource", dht: "DhtNode", store: "LocalStore", replicas: int,
                 floor_wait: float, events: "ContentEvents | None" = None) -> None:
        self.mirror = mirror
        self.peers = peers
        self.dht = dht
        self.store = store
        self.replicas = replicas
        self.floor_wait = floor_wait  # how long to wait for the floor's copies
        self.events = events

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """POST {"ref": REF, "platforms": [...]}: the progress, one JSON object a line."""
        try:
            body = await request.json()
            ref, platforms = body["ref"], body.get("platforms") or []
            if not isinstance(ref, str) or not all(isinstance(p, str) for p in platforms):
                raise TypeError
            parse_ref(ref)
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"ref": REF, "platforms": ["os/arch", ...]}') from None
        except InvalidArgument as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async for event in self.run(ref, platforms):
            await resp.write(json.dumps(event).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def run(self, ref: str, platforms: list[str]) -> AsyncIterator[dict]:
        t0 = time.monotonic()
        totals = Totals()
        try:
            host, name, reference = parse_ref(ref)
            if host:
                upstream = self.mirror.upstream_of(host, name)
                manifest = await self.mirror.resolve(upstream, name, reference)
                top = Blob(manifest.digest, manifest.size, "manifest")
            else:
                top = Blob(reference, 0, "manifest")
            yield {"event": "resolved", "ref": ref, "digest": top.digest}
            blobs: list[Blob] = []
            async for event in self._walk(top, platforms, blobs, totals):
                yield event
            sem = asyncio.Semaphore(PARALLEL)

            async def take(blob: Blob) -> dict:
                async with sem:
                    return await self._take(blob, totals)

            for done in asyncio.as_completed([take(b) for b in blobs if b.kind not in MANIFEST_TYPES]):
                yield await done
            digests = [b.digest for b in blobs]
            async for event in self._await_floor(digests, totals):
                yield event
            ok = not totals.below_floor
        except (PreheatError, InvalidArgument, web.HTTPException) as exc:
            message = oci_message(exc) if isinstance(exc, web.HTTPException) else str(exc)
            log.warning("preheat failed", extra={"ref": ref, "error": message})
            yield {"event": "error", "message": message}
            ok = False
        seconds = round(time.monotonic() - t0, 3)
        log.info("preheated" if ok else "preheat incomplete", extra={"ref": ref, "seconds": seconds,
                                                                     **totals.__dict__})
        yield {"event": "done", "ok": ok, "ref": ref, "replicas": self.replicas, "seconds": seconds, **totals.__dict__}

    async def _walk(self, top: Blob, platforms: list[str], blobs: list[Blob], totals: Totals) -> AsyncIterator[dict]:
        """Take the manifests (they name the rest), listing every blob of the image in `blobs`."""
        pending = [top]
        while pending:
            blob = pending.pop()
            yield await self._take(blob, totals)
            doc = self._load(blob.digest)
            blobs.append(Blob(blob.digest, blob.size or totals_size(self.store, blob.digest), blob.kind))
            for child in doc.get("manifests") or []:
                if isinstance(child, dict) and platform_matches(child, platforms):
                    pending.append(Blob(_digest(child), _size(child), "manifest"))
            if isinstance(doc.get("config"), dict):
                blobs.append(Blob(_digest(doc["config"]), _size(doc["config"]), "config"))
            for layer in doc.get("layers") or []:
                if isinstance(layer, dict):
                    blobs.append(Blob(_digest(layer), _size(layer), "layer"))

    def _load(self, digest: str) -> dict:
        path = self.store.served_path(parse_digest(digest))
        try:
            with open(path or "", "rb") as f:
                doc = json.loads(f.read(MAX_MANIFEST + 1))
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict):
            raise PreheatError(f"{digest} is not an image manifest or index")
        return doc

    async def _take(self, blob: Blob, totals: Totals) -> dict:
        """Make sure this node holds `blob` (in its cache unless containerd holds it)."""
        t0 = time.monotonic()
        hex_ = parse_digest(blob.digest)
        event = {"event": "blob", "digest": blob.digest, "kind": blob.kind}
        if self.store.served_path(hex_):
            size = totals_size(self.store, blob.digest)
            totals.held += size
            got = {"from": "held"}
        else:
            fetch = await self.peers.replicate(blob.digest, blob.size)
            if fetch is None:
                if not self.store.served_path(hex_):  # containerd here took it meanwhile otherwise
                    why = self.peers.failure(blob.digest) or "no peer holds it and no registry is known for it"
                    raise PreheatError(f"{blob.kind} {blob.digest}: {why}")
                size = totals_size(self.store, blob.digest)
                got = {"from": "held"}
            else:
                keep_for_cluster(self.store, blob.digest, self.events)
                size = fetch.size
                registry = fetch.bytes_from.get(ORIGIN, 0)
                peers = sum(n for addr, n in fetch.bytes_from.items() if addr != ORIGIN)
                totals.from_registry += registry
                totals.from_peers += peers
                got = {"from": "registry" if not peers else "peers" if not registry else "peers and registry",
                       "from_registry": registry, "from_peers": peers}
        totals.blobs += 1
        totals.bytes += size
        return {**event, "size": size, **got, "seconds": round(time.monotonic() - t0, 3)}

    async def _await_floor(self, digests: list[str], totals: Totals) -> AsyncIterator[dict]:
        """Wait for the floor's copies: every blob at `replicas` holders, or `floor_wait` over."""
        deadline = time.monotonic() + self.floor_wait
        while True:
            counts = await asyncio.gather(*(self._holders(d) for d in digests))
            below = [d for d, n in zip(digests, counts) if n < self.replicas]
            yield {"event": "holders", "at_floor": len(digests) - len(below), "blobs": len(digests),
                   "replicas": self.replicas}
            if not below or time.monotonic() >= deadline:
                totals.below_floor = below
                return
            await asyncio.sleep(POLL)

    async def _holders(self, digest: str) -> int:
        others = [r for r in await self.dht.find_providers(digest) if not r.inflight]
        return len(others) + (1 if self.store.served_path(parse_digest(digest)) else 0)


def oci_message(exc: web.HTTPException) -> str:
    """The message of the mirror's OCI error body (what containerd would have been told)."""
    try:
        return json.loads(exc.text or "")["errors"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return exc.text or exc.reason


def totals_size(store: "LocalStore", digest: str) -> int:
    path = store.served_path(parse_digest(digest))
    return os.path.getsize(path) if path else 0


def _digest(desc: dict) -> str:
    digest = desc.get("digest")
    if not isinstance(digest, str):
        raise PreheatError("a descriptor without a digest")
    parse_digest(digest)
    return digest


def _size(desc: dict) -> int:
    size = desc.get("size")
    return size if isinstance(size, int) and size >= 0 else 0
