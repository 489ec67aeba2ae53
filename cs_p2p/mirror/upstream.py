"""Client of one upstream registry (OCI distribution API), as the mirror uses it.

Each call is bounded by the registry's timeout: the mirror answers from peers when the
registry is slow or down, so waiting long for it would only delay that.

Authentication answers the registry's challenge: `Basic` with the registry's configured
credentials (`credentials-file`), `Bearer realm=…` (Docker Hub-style) with a token from
that realm, asked for anonymously or with those credentials and cached per repository.
The `Authorization` containerd sent the mirror, if any, goes upstream with that request, and
with the blob fetches cs-p2p makes for that pull (`readers`); it is never cached here.  A 401 that cannot be answered is `UpstreamUnauthorized`,
carrying the registry's challenge so that the mirror can pass it on to containerd.
Nothing from here is ever logged with its secret or published to the DHT.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import ssl
import urllib.parse
from dataclasses import dataclass

import aiohttp

from ..config import MirrorRegistry, read_credentials

MAX_MANIFEST = 4 << 20  # containerd refuses bigger manifests too
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def _basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class UpstreamUnavailable(Exception):
    """The registry could not be asked (down, slow, 5xx): peers may answer instead."""


class UpstreamNotFound(Exception):
    """The registry answered that it has no such manifest or blob."""


class UpstreamUnauthorized(Exception):
    """The registry wants credentials this request does not have (401)."""

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message)
        self.challenge = challenge  # its WWW-Authenticate, for containerd to answer


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    size: int
    body: bytes | None = None  # None for a HEAD


class Upstream:
    def __init__(self, registry: MirrorRegistry, session: aiohttp.ClientSession) -> None:
        self.registry = registry
        self.session = session
        # TLS is verified: against the registry's own CA if configured, else the system's.
        self._tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=registry.ca_file) \
            if registry.ca_file else True
        self._tokens: dict[str, str] = {}  # repository -> bearer token
        self._credentials = read_credentials(registry.credentials_file) if registry.credentials_file else None
        self._basic: str | None = None  # set once the registry asked for Basic and we have credentials
        self.last_challenge = ""  # the registry's latest WWW-Authenticate: asked of containerd while it is down

    @property
    def has_credentials(self) -> bool:
        """The operator gave this node credentials of its own for the registry."""
        return self._credentials is not None

    def _auth_header(self, repo: str) -> str | None:
        if repo in self._tokens:
            return f"Bearer {self._tokens[repo]}"
        return self._basic

    async def _request(self, method: str, repo: str, path: str, headers: dict[str, str],
                       authorization: str | None = None) -> aiohttp.ClientResponse:
        """`authorization`: what containerd sent the mirror; used for this request alone."""
        url = f"{self.registry.base_url}/v2/{repo}/{path}"
        timeout = aiohttp.ClientTimeout(total=None, connect=self.registry.timeout, sock_read=self.registry.timeout)
        for attempt in (0, 1):
            hdrs = dict(headers)
            auth = authorization or self._auth_header(repo)
            if auth:
                hdrs["Authorization"] = auth
            try:
                # Redirects (blob storage) must not carry the registry's credentials elsewhere:
                # aiohttp drops Authorization when a redirect changes the host.
                resp = await self.session.request(method, url, headers=hdrs, timeout=timeout, allow_redirects=True,
                                                  ssl=self._tls)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise UpstreamUnavailable(f"{self.registry.host}: {exc!r}") from None
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                self.last_challenge = challenge or self.last_challenge
                resp.release()
                if attempt == 0 and not authorization and await self._authorize(repo, challenge):
                    continue
                who = ("the credentials containerd sent" if authorization else
                       f"the credentials in {self.registry.credentials_file}" if self._credentials else
                       "no credentials (set credentials-file for this registry, or pull with credentials)")
                raise UpstreamUnauthorized(f"{self.registry.host}: {method} {repo}/{path} answered 401 "
                                           f"Unauthorized with {who}", challenge)
            if resp.status == 404:
                resp.release()
                raise UpstreamNotFound(f"{self.registry.host}: {repo}/{path} not found")
            if resp.status >= 400:
                resp.release()
                raise UpstreamUnavailable(f"{self.registry.host}: {method} {repo}/{path} answered {resp.status}")
            return resp
        raise AssertionError("unreachable")

    async def _authorize(self, repo: str, challenge: str) -> bool:
        """Answer the registry's challenge: Basic with the configured credentials, Bearer with
        a pull token from the realm it names (asked for with the credentials, if any)."""
        if challenge.lower().startswith("basic"):
            if self._credentials is None or self._basic is not None:
                return False
            self._basic = _basic_header(*self._credentials)
            return True
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm:
            return False
        params.setdefault("scope", f"repository:{repo}:pull")
        timeout = aiohttp.ClientTimeout(total=self.registry.timeout)
        headers = {"Authorization": _basic_header(*self._credentials)} if self._credentials else {}
        try:
            # The registry's own CA for a realm it serves itself; the system's for a token service elsewhere.
            tls = self._tls if urllib.parse.urlsplit(realm).netloc == self.registry.host else True
            async with self.session.get(realm, params=params, timeout=timeout, headers=headers, ssl=tls) as tr:
                if tr.status != 200:
                    return False
                body = await tr.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            raise UpstreamUnavailable(f"{self.registry.host}: token service {realm} failed") from None
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            return False
        self._tokens[repo] = token
        return True

    async def manifest(self, repo: str, reference: str, accept: str, head: bool,
                       authorization: str | None = None) -> Manifest:
        """Resolve `reference` (tag or digest).  A GET's body is checked against the digest."""
        resp = await self._request("HEAD" if head else "GET", repo, f"manifests/{reference}", {"Accept": accept},
                                   authorization)
        try:
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            digest = resp.headers.get("Docker-Content-Digest", "")
            if head:
                size = int(resp.headers.get("Content-Length", "-1"))
                if not digest or size < 0:  # not enough to describe it: GET it instead
                    return await self.manifest(repo, reference, accept, head=False, authorization=authorization)
                return Manifest(digest, media_type, size)
            body = b""
            while len(body) <= MAX_MANIFEST:  # a read returns what has arrived, not the whole body
                chunk = await resp.content.read(MAX_MANIFEST + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_MANIFEST:
                raise UpstreamUnavailable(f"{self.registry.host}: manifest larger than {MAX_MANIFEST} bytes")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"{self.registry.host}: {exc!r}") from None
        finally:
            resp.release()
        actual = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = reference if reference.startswith("sha256:") else digest
        if expected and expected != actual:
            raise UpstreamUnavailable(f"{self.registry.host}: manifest {reference} does not match {expected}")
        return Manifest(actual, media_type, len(body), body)

    async def readable(self, repo: str, kind: str, digest: str, authorization: str | None,
                       accept: str = "") -> tuple[str, int]:
        """Whether these credentials may read `digest` in `repo` (`kind`: manifests or blobs): a
        HEAD; returns its media type and size if the registry says yes, raises its no (or that
        it cannot be asked)."""
        resp = await self._request("HEAD", repo, f"{kind}/{digest}", {"Accept": accept} if accept else {},
                                   authorization)
        resp.release()
        try:
            size = int(resp.headers.get("Content-Length", "0"))
        except ValueError:
            size = 0
        return resp.headers.get("Content-Type", "").split(";")[0].strip(), size

    async def open_blob(self, repo: str, digest: str, authorization: str | None = None) -> aiohttp.ClientResponse:
        """The registry's response for blob `digest` (the caller reads and releases it)."""
        return await self._request("GET", repo, f"blobs/{digest}", {}, authorization)

    async def open_range(self, repo: str, digest: str, start: int, end: int, manifest: bool = False,
                         accept: str = "", authorization: str | None = None) -> aiohttp.ClientResponse:
        """Bytes [start, end) of blob `digest`: a 206, or a 200 with the whole blob from a
        registry that ignores Range (the caller skips to `start`).  Manifests are asked for
        where registries keep them (`/manifests/`; not every registry serves them as blobs)."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if manifest:
            headers["Accept"] = accept
        return await self._request("GET", repo, f"{'manifests' if manifest else 'blobs'}/{digest}", headers,
                                   authorization)

    async def chunks(self, resp: aiohttp.ClientResponse, digest: str):
        """The body of `open_blob`'s response in order, each chunk held back until the next
        arrives and the last one until the whole body matched `digest`: a consumer that
        forwards them never hands on a complete blob that is wrong."""
        hasher, held = hashlib.sha256(), b""
        try:
            async for chunk in resp.content.iter_chunked(1 << 20):
                hasher.update(chunk)
                if held:
                    yield held
                held = chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise UpstreamUnavailable(f"{self.registry.host}: {exc!r}") from None
        finally:
            resp.release()
        if "sha256:" + hasher.hexdigest() != digest:
            raise UpstreamUnavailable(f"{self.registry.host}: blob {digest} did not match its digest")
        if held:
            yield held
