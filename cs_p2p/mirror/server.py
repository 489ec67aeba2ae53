"""A read-only OCI distribution endpoint for the node's own containerd.

containerd is pointed at it through `hosts.toml` (capabilities pull + resolve, upstream kept
as the next host) and adds `?ns=<registry host>` to every request, which names the upstream.

- Tags: the upstream registry first, bounded by its timeout; its answer is published in the
  DHT as a tag record.  If it cannot be asked, the newest tag record any node published
  answers instead, so pulls by tag survive a registry outage.  If the registry says the tag
  does not exist, that is the answer.
- Manifests by digest and blobs: the local store, then peers, then upstream.  Whatever comes
  from elsewhere is verified against its digest before it is served.
- Nothing is served for a repository before the registry confirmed that the request's own
  credentials may read that digest there (`access`): digests are not secrets, and the store
  and the peers hold every private image any node pulled.  While the registry is down,
  outage records decide (`access.Grants.outage_refusal`).  Purged blobs (`purges`) are not
  served at all.

Answers 404 (with an OCI error body) when it cannot help, so containerd moves on to the next
host; never writes.

It also remembers which registry and repository each manifest and blob it was asked for
belongs to (`fetch.origin`), and with which credentials the registry accepted the request
(`readers`).  That lets `Info` claim the config and layers of a manifest just resolved here,
which cs-p2p then fetches itself (`claim`: from peers, else from the registry, several ranges
at once) instead of containerd downloading them through this mirror and its `Write` path; and
a peer fetch that fails is finished from the registry (`origin_for`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import tempfile
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .. import metrics
from .. import __version__
from ..config import MirrorRegistry
from ..digests import parse_digest
from ..errors import InvalidArgument
from ..fetch.pieces import FetchFailed
from ..fetch.origin import Claimable, Location, Origins
from ..httpserve import SentFileResponse, start_site
from ..purges import PurgeList
from ..store import LocalStore
from .access import ANONYMOUS, NODE, Grants
from .readers import Readers
from .upstream import MAX_MANIFEST, Manifest, Upstream, UpstreamNotFound, UpstreamUnauthorized, UpstreamUnavailable

if TYPE_CHECKING:
    from ..dht.node import DhtNode
    from ..fetch.source import PeerSource

log = logging.getLogger("cs_p2p.mirror")

_NAME = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DEFAULT_ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def _unauthorized(exc: UpstreamUnauthorized) -> web.HTTPException:
    """401 to containerd with the registry's challenge: containerd answers it with the
    credentials it has for the image (a pull secret, `ctr --user`), which this mirror then
    passes upstream; without any, containerd tries the registry itself and reports the 401."""
    log.warning("upstream registry wants credentials", extra={"error": str(exc)})
    err = oci_error(web.HTTPUnauthorized, "UNAUTHORIZED", str(exc))
    if exc.challenge:
        err.headers["WWW-Authenticate"] = exc.challenge
    return err


def _outcome(status: int) -> str:
    if status < 400:
        return "served"
    return {404: "not_found", 401: "unauthorized", 403: "unauthorized"}.get(
        status, "bad_request" if status < 500 else "error")


@web.middleware
async def _count_requests(request: web.Request, handler) -> web.StreamResponse:
    """`cs_p2p_mirror_requests_total{kind, outcome}`: 404s are how containerd is sent on to
    the registry, so their rate is the share of pulls the cluster could not serve."""
    parts = request.path.rstrip("/").split("/")
    kind = parts[-2] if len(parts) >= 4 and parts[-2] in ("manifests", "blobs") else "other"
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        metrics.MIRROR_REQUESTS.labels(kind=kind, outcome=_outcome(exc.status)).inc()
        raise
    except Exception:
        metrics.MIRROR_REQUESTS.labels(kind=kind, outcome="error").inc()
        raise
    metrics.MIRROR_REQUESTS.labels(kind=kind, outcome=_outcome(resp.status)).inc()
    return resp


def oci_error(status: type[web.HTTPException], code: str, message: str) -> web.HTTPException:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return status(text=body, content_type="application/json")


def media_type_of(body: bytes) -> str:
    """The media type a manifest declares, or the one its shape implies (OCI makes the field
    optional)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return "application/octet-stream"
    if isinstance(doc, dict):
        if isinstance(doc.get("mediaType"), str) and doc["mediaType"]:
            return doc["mediaType"]
        if "manifests" in doc:
            return "application/vnd.oci.image.index.v1+json"
        if "layers" in doc or "config" in doc:
            return "application/vnd.oci.image.manifest.v1+json"
    return "application/octet-stream"


class Mirror:
    def __init__(self, store: LocalStore, registries: list[MirrorRegistry], dht: "DhtNode | None" = None,
                 peers: "PeerSource | None" = None, confirm_ttl: float = 60.0, outage_window: float = 6 * 3600.0,
                 purges: PurgeList | None = None) -> None:
        self.store = store
        self.purges = purges
        self.refusals: collections.Counter[str] = collections.Counter()  # by reason, for `status`
        self.registries = {r.host: r for r in registries}
        self.dht = dht
        self.peers = peers
        self.upstreams: dict[str, Upstream] = {}
        # Resolved manifests may sit in the cache (preheat puts them there).
        self.origins = Origins(lambda digest: store.served_path(parse_digest(digest))
                               or store.blobs.blob_path(parse_digest(digest)))
        self.grants = Grants(os.path.join(store.root, "access"), confirm_ttl, outage_window, self.origins.references)
        self.readers = Readers(confirm_ttl)
        self.tmp = os.path.join(store.root, "mirror")
        os.makedirs(self.tmp, exist_ok=True)
        for name in os.listdir(self.tmp):  # left by a crash
            os.unlink(os.path.join(self.tmp, name))
        self.app = web.Application(middlewares=[_count_requests])
        self.app.router.add_get("/v2/", self.base)
        self.app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", self.manifests)
        self.app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self.blobs)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._background: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        self._session = aiohttp.ClientSession(headers={"User-Agent": f"cs-p2p-mirror/{__version__}"})
        self.upstreams = {h: Upstream(r, self._session) for h, r in self.registries.items()}
        self._runner, port = await start_site(self.app, host, port)
        return port

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def origin_for(self, digest: str) -> "RegistryOrigin | None":
        """The registry repository `digest` was pulled from, if a manifest resolved here names it."""
        where = self.origins.locate(digest)
        return self._registry_origin(where, manifest=self.origins.is_manifest(digest)) if where else None

    def claim(self, digest: str) -> Claimable | None:
        """Size and origin of config or layer `digest` if cs-p2p may fetch it itself: a manifest
        resolved here names it, and the registry accepted a request for that repository within
        `readers.ttl` (whose credentials the fetch uses).  Memory only: `Info` asks it."""
        named = self.origins.named(digest)
        if named is None or (self.purges is not None and self.purges.purged(digest)):
            return None
        origin = self._registry_origin(named.where, reader_needed=True)
        return Claimable(named.size, origin, named.config) if origin else None

    def _registry_origin(self, where: Location, manifest: bool = False,
                         reader_needed: bool = False) -> "RegistryOrigin | None":
        """`where` at its registry, read with the credentials the registry accepted for that
        repository lately (`readers`), or with the mirror's own if none (unless `reader_needed`)."""
        upstream = self.upstreams.get(where.host)
        reader = self.readers.current(where.host, where.repo)
        if upstream is None or (reader_needed and reader is None):
            return None
        return RegistryOrigin(upstream, where.repo, manifest, reader.authorization if reader else None)

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    def _route(self, request: web.Request) -> tuple[Upstream, str]:
        if request.method not in ("GET", "HEAD"):
            raise oci_error(_ReadOnly, "UNSUPPORTED", "this mirror is read-only")
        name = request.match_info["name"]
        ns = request.query.get("ns") or (next(iter(self.registries)) if len(self.registries) == 1 else "")
        return self.upstream_of(ns, name), name

    async def manifests(self, request: web.Request) -> web.StreamResponse:
        upstream, name = self._route(request)
        head = request.method == "HEAD"
        manifest = await self.resolve(upstream, name, request.match_info["reference"],
                                      request.headers.get("Accept") or DEFAULT_ACCEPT, head,
                                      request.headers.get("Authorization"))
        headers = {"Docker-Content-Digest": manifest.digest, "Content-Type": manifest.media_type,
                   "Content-Length": str(manifest.size)}
        if head:
            return web.Response(headers=headers)
        return web.Response(body=manifest.body, headers=headers)

    async def resolve(self, upstream: Upstream, name: str, reference: str, accept: str = DEFAULT_ACCEPT,
                      head: bool = False, authorization: str | None = None) -> Manifest:
        """A manifest by tag or digest, as containerd gets it through this mirror; where it came
        from is remembered (`origins`).  Failures raise OCI errors (HTTP exceptions).
        `authorization`: what containerd sent, passed upstream for this request only."""
        who = self.grants.who(authorization, upstream.has_credentials)
        try:
            if reference.startswith("sha256:"):
                manifest = await self._manifest_by_digest(upstream, name, reference, accept, media_type="",
                                                          authorization=authorization, who=who)
            elif _TAG.match(reference):
                manifest = await self._manifest_by_tag(upstream, name, reference, accept, head, authorization, who)
            else:
                raise oci_error(web.HTTPBadRequest, "MANIFEST_INVALID", f"invalid reference {reference!r}")
        except UpstreamUnauthorized as exc:
            raise _unauthorized(exc) from None
        host = upstream.registry.host
        if manifest.body is not None:
            self.origins.manifest_body(host, name, manifest.digest, manifest.body)
        else:
            self.origins.manifest_seen(host, name, manifest.digest)
        self.readers.accepted(host, name, authorization)
        return manifest

    def upstream_of(self, host: str, name: str) -> Upstream:
        """The mirrored registry `host`, for repository `name`."""
        if not _NAME.match(name):
            raise oci_error(web.HTTPBadRequest, "NAME_INVALID", f"invalid repository name {name!r}")
        upstream = self.upstreams.get(host)
        if upstream is None:
            raise oci_error(web.HTTPNotFound, "NAME_UNKNOWN", f"registry {host!r} is not mirrored here")
        return upstream

    async def _manifest_by_tag(self, upstream: Upstream, name: str, tag: str, accept: str, head: bool,
                               authorization: str | None, who: str) -> Manifest:
        reference = f"{upstream.registry.host}/{name}:{tag}"
        try:
            manifest = await upstream.manifest(name, tag, accept, head, authorization)
            self.grants.confirm(who, upstream.registry.host, name, manifest.digest)
        except UpstreamNotFound:
            raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN", f"{reference} does not exist upstream") from None
        except UpstreamUnavailable as exc:
            log.warning("upstream unavailable: resolving from peers", extra={"ref": reference, "error": str(exc)})
            record = await self.dht.find_tag(reference) if self.dht else None
            if record is None:
                raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN",
                                f"{reference}: registry unreachable ({exc}) and no peer has resolved it") from None
            log.info("tag resolved from peers", extra={"ref": reference, "digest": record.digest})
            self.grants.note_record(upstream.registry.host, name, record.digest, record.seen, record.public)
            self._allow_in_outage(upstream, name, record.digest, who, str(exc))
            return await self._manifest_by_digest(upstream, name, record.digest, accept, record.media_type,
                                                  allow_upstream=False, who=who, checked=True)
        self._publish(reference, manifest.digest, manifest.media_type, manifest.size, who)
        self._publish(f"{upstream.registry.host}/{name}@{manifest.digest}", manifest.digest, manifest.media_type,
                      manifest.size, who)
        return manifest

    def _publish(self, reference: str, digest: str, media_type: str, size: int, who: str) -> None:
        """The registry just resolved `reference` (`host/name:tag` or `host/name@digest`) for `who`:
        a record for every node, for outages (`dht.tags`, `access.Grants.note_record`)."""
        if self.dht and media_type and 0 < size <= MAX_MANIFEST:
            self._spawn(self.dht.publish_tag(reference, digest, media_type, size, public=who == ANONYMOUS))

    async def _manifest_by_digest(self, upstream: Upstream, name: str, digest: str, accept: str, media_type: str,
                                  allow_upstream: bool = True, authorization: str | None = None, who: str = "",
                                  checked: bool = False) -> Manifest:
        """`checked`: access was decided already (a tag record during an outage)."""
        self._check_digest(digest)
        self._not_purged(digest, "MANIFEST_UNKNOWN")
        if not checked:
            await self._check_access(upstream, name, "manifests", digest, who, authorization, accept)
        path = await self._local_or_peers(digest)
        if path is not None and os.path.getsize(path) <= MAX_MANIFEST:
            with open(path, "rb") as f:
                body = f.read()
            return Manifest(digest, media_type_of(body) if not media_type or media_type == "application/octet-stream"
                            else media_type, len(body), body)
        if not allow_upstream:
            raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN", f"manifest {digest} not held by any peer")
        try:
            return await upstream.manifest(name, digest, accept, head=False, authorization=authorization)
        except UpstreamNotFound:
            raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN", f"manifest {digest} unknown") from None
        except UpstreamUnavailable as exc:
            raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN",
                            f"manifest {digest}: not held by peers and registry unreachable ({exc})") from None

    def _not_purged(self, digest: str, code: str) -> None:
        if self.purges is not None and self.purges.purged(digest):
            self._refuse("purged")
            raise oci_error(web.HTTPNotFound, code, f"{digest} was purged from this cluster (`cs-p2p purge`): "
                                                    "only the registry serves it")

    def _refuse(self, reason: str) -> None:
        self.refusals[reason] += 1
        metrics.MIRROR_REFUSALS.labels(reason=reason).inc()

    async def _check_access(self, upstream: Upstream, name: str, kind: str, digest: str, who: str,
                            authorization: str | None, accept: str = "") -> None:
        """Return if `who` may read `digest` in repository `name` (`access`); raise the OCI error
        that says why not."""
        host = upstream.registry.host
        if self.grants.confirmed(who, host, name, digest):
            metrics.MIRROR_ACCESS_CHECKS.labels(result="cached").inc()
            return
        code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
        try:
            media_type, size = await upstream.readable(name, kind, digest, authorization, accept)
        except UpstreamUnauthorized as exc:
            metrics.MIRROR_ACCESS_CHECKS.labels(result="registry").inc()
            self._refuse("unauthorized")
            raise _unauthorized(exc) from None
        except UpstreamNotFound:
            metrics.MIRROR_ACCESS_CHECKS.labels(result="registry").inc()
            self._refuse("not_in_repository")
            raise oci_error(web.HTTPNotFound, code, f"{digest} is not in {host}/{name}") from None
        except UpstreamUnavailable as exc:
            if kind == "manifests" and self.dht:  # a member's record of it in this repository, if any
                record = await self.dht.find_tag(f"{host}/{name}@{digest}")
                if record is not None and record.digest == digest:
                    self.grants.note_record(host, name, digest, record.seen, record.public)
            self._allow_in_outage(upstream, name, digest, who, str(exc))
            return
        metrics.MIRROR_ACCESS_CHECKS.labels(result="registry").inc()
        self.grants.confirm(who, host, name, digest)
        if kind == "manifests":
            self._publish(f"{host}/{name}@{digest}", digest, media_type, size, who)

    def _allow_in_outage(self, upstream: Upstream, name: str, digest: str, who: str, why: str) -> None:
        """The registry cannot be asked: return if outage records allow it, else raise why not."""
        host = upstream.registry.host
        metrics.MIRROR_ACCESS_CHECKS.labels(result="outage").inc()
        reason = self.grants.outage_refusal(who, host, name, digest)
        if reason is None:
            return
        self._refuse(reason)
        hours = self.grants.outage_window / 3600
        if reason == "outage_not_in_repository":
            log.warning("refused during registry outage: digest never confirmed in this repository",
                        extra={"repository": f"{host}/{name}", "digest": digest})
            raise oci_error(web.HTTPNotFound, "MANIFEST_UNKNOWN",
                            f"registry {host} unreachable ({why}) and {digest} was not confirmed in {name} "
                            f"within the last {hours:g} h")
        whose = "these credentials" if who not in (ANONYMOUS, NODE) else "requests without credentials"
        log.warning("refused during registry outage: credentials not accepted for this repository before",
                    extra={"repository": f"{host}/{name}", "digest": digest})
        err = oci_error(web.HTTPUnauthorized, "UNAUTHORIZED",
                        f"registry {host} unreachable ({why}) and {name} is private: {whose} were not accepted for "
                        f"it within the last {hours:g} h")
        if upstream.last_challenge and who in (ANONYMOUS, NODE):
            err.headers["WWW-Authenticate"] = upstream.last_challenge  # containerd may have credentials to send
        raise err

    async def _local_or_peers(self, digest: str) -> str | None:
        """The path of `digest` in the local store, fetched from peers first if need be."""
        path = self.store.blobs.blob_path(parse_digest(digest))
        if os.path.exists(path):
            return path
        if self.store.restore(digest):
            if self.dht:
                self.dht.committed(digest, os.path.getsize(path))  # containerd's again, not the cache's
            return path
        fetch = await self.peers.locate(digest) if self.peers else None
        if fetch is None or fetch.task is None:
            return None
        fetch.wanted.set()  # containerd's request waits on it
        await asyncio.wait([fetch.task])
        return path if os.path.exists(path) else None

    @staticmethod
    def _check_digest(digest: str) -> None:
        try:
            parse_digest(digest)
        except InvalidArgument as exc:
            raise oci_error(web.HTTPBadRequest, "DIGEST_INVALID", str(exc)) from None

    async def blobs(self, request: web.Request) -> web.StreamResponse:
        upstream, name = self._route(request)
        digest = request.match_info["digest"]
        self._check_digest(digest)
        self._not_purged(digest, "BLOB_UNKNOWN")
        authorization = request.headers.get("Authorization")
        await self._check_access(upstream, name, "blobs", digest,
                                 self.grants.who(authorization, upstream.has_credentials), authorization)
        self.origins.blob_seen(upstream.registry.host, name, digest)
        headers = {"Docker-Content-Digest": digest, "Content-Type": "application/octet-stream"}
        path = await self._local_or_peers(digest)
        if path is not None:
            log.info("blob served", extra={"digest": digest, "from": "peers or local store", "method": request.method})
            if request.method == "GET":
                metrics.MIRROR_BYTES.labels(source="local").inc(os.path.getsize(path))
            return web.FileResponse(path, headers=headers)
        try:
            upstream_resp = await upstream.open_blob(name, digest, authorization)
        except UpstreamUnauthorized as exc:
            raise _unauthorized(exc) from None
        except UpstreamNotFound:
            raise oci_error(web.HTTPNotFound, "BLOB_UNKNOWN", f"blob {digest} unknown") from None
        except UpstreamUnavailable as exc:
            raise oci_error(web.HTTPNotFound, "BLOB_UNKNOWN",
                            f"blob {digest}: not held by peers and registry unreachable ({exc})") from None
        if request.method == "HEAD":
            upstream_resp.release()
            return web.Response(headers={**headers, "Content-Length": str(upstream_resp.content_length or 0)})
        if request.headers.get("Range"):
            return await self._verified_range(request, upstream, upstream_resp, digest, headers)
        out = web.StreamResponse(headers=headers)
        if upstream_resp.content_length is not None:
            out.content_length = upstream_resp.content_length
        await out.prepare(request)
        try:
            async for chunk in upstream.chunks(upstream_resp, digest):
                await out.write(chunk)
                metrics.MIRROR_BYTES.labels(source="registry").inc(len(chunk))
        except UpstreamUnavailable as exc:
            log.warning("upstream blob failed", extra={"digest": digest, "error": str(exc)})
            out.force_close()  # short of the length: containerd sees the download fail
            return out
        await out.write_eof()
        log.info("blob served", extra={"digest": digest, "from": "registry", "registry": upstream.registry.host})
        return out

    async def _verified_range(self, request: web.Request, upstream: Upstream, upstream_resp, digest: str,
                              headers: dict[str, str]) -> web.StreamResponse:
        """A range of an upstream blob: a range cannot be verified on its own, so the whole
        blob is downloaded and verified first (into a file that goes once it is sent)."""
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        try:
            offset = 0
            try:
                async for chunk in upstream.chunks(upstream_resp, digest):
                    os.pwrite(fd, chunk, offset)
                    offset += len(chunk)
            except UpstreamUnavailable as exc:
                raise oci_error(web.HTTPNotFound, "BLOB_UNKNOWN", f"blob {digest}: {exc}") from None
            resp = SentFileResponse(tmp, headers=headers)
            await resp.prepare(request)  # sends the body: the file can go afterwards
            metrics.MIRROR_BYTES.labels(source="registry").inc(resp.content_length or 0)
            log.info("blob served", extra={"digest": digest, "from": "registry", "registry": upstream.registry.host,
                                           "range": request.headers.get("Range")})
            return resp
        finally:
            os.close(fd)
            os.unlink(tmp)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class RegistryOrigin:
    """A blob's repository at its registry, as a fetch's last source (`fetch.fetcher.Origin`)."""

    def __init__(self, upstream: Upstream, repo: str, manifest: bool = False, authorization: str | None = None) -> None:
        self.upstream = upstream
        self.repo = repo
        self.manifest = manifest
        self.authorization = authorization  # containerd's, accepted for this repository (`readers`)

    def __str__(self) -> str:
        return f"{self.upstream.registry.host}/{self.repo}"

    async def open_range(self, digest: str, start: int, end: int) -> aiohttp.ClientResponse:
        try:
            return await self.upstream.open_range(self.repo, digest, start, end, self.manifest, DEFAULT_ACCEPT,
                                                  self.authorization)
        except (UpstreamUnavailable, UpstreamNotFound, UpstreamUnauthorized) as exc:
            raise FetchFailed(str(exc)) from None


class _ReadOnly(web.HTTPMethodNotAllowed):
    def __init__(self, **kw) -> None:
        super().__init__("GET", ["GET", "HEAD"], **kw)
