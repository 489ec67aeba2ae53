"""The upstream client against a registry that wants a Bearer token from its realm (Docker
Hub-style; Debian's registry has no token service, so a small one stands in): the realm is
asked with the configured credentials, the token is used and kept per repository, and
containerd's own Authorization is passed for one request and never kept."""

from __future__ import annotations

import base64

import aiohttp
import pytest
from aiohttp import web

from cs_p2p.config import MirrorRegistry
from cs_p2p.mirror.upstream import Upstream, UpstreamUnauthorized

USER, PASSWORD = "puller", "pa:ss"
TOKEN = "token-for-puller"
CONTAINERDS = "Bearer token-containerd-got-itself"


@pytest.fixture
async def registry():
    seen: list[tuple[str, str | None]] = []
    realm_asks: list[str | None] = []
    app = web.Application()

    async def token(request: web.Request) -> web.Response:
        realm_asks.append(request.headers.get("Authorization"))
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != basic or request.query.get("scope") != "repository:app:pull":
            return web.json_response({"errors": []}, status=401)
        return web.json_response({"token": TOKEN})

    async def manifest(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen.append((request.path, auth))
        if auth not in (f"Bearer {TOKEN}", CONTAINERDS):
            host = request.host
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="http://{host}/token",service="{host}",scope="repository:app:pull"'})
        body = b'{"schemaVersion":2}'
        return web.Response(body=body, headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})

    app.router.add_get("/token", token)
    app.router.add_route("*", "/v2/app/manifests/{ref}", manifest)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}", seen, realm_asks
    await runner.cleanup()


async def upstream_for(addr: str, cred_file: str | None) -> tuple[Upstream, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    reg = MirrorRegistry(addr, plain_http=True, timeout=5.0, credentials_file=cred_file or "")
    return Upstream(reg, session), session


async def test_the_realm_is_asked_with_the_configured_credentials_and_the_token_kept(registry, tmp_path):
    addr, seen, realm_asks = registry
    cred = tmp_path / "cred"
    cred.write_text(f"{USER}:{PASSWORD}\n")
    up, session = await upstream_for(addr, str(cred))
    try:
        for _ in range(2):
            m = await up.manifest("app", "v1", "application/vnd.oci.image.manifest.v1+json", head=False)
            assert m.body == b'{"schemaVersion":2}'
    finally:
        await session.close()
    assert len(realm_asks) == 1  # one token, kept for the repository
    assert [auth for _, auth in seen] == [None, f"Bearer {TOKEN}", f"Bearer {TOKEN}"]


async def test_without_credentials_the_challenge_is_handed_back_and_containerds_are_used_once(registry):
    addr, seen, realm_asks = registry
    up, session = await upstream_for(addr, None)
    try:
        with pytest.raises(UpstreamUnauthorized) as err:
            await up.manifest("app", "v1", "application/vnd.oci.image.manifest.v1+json", head=False)
        assert err.value.challenge.startswith("Bearer realm=") and "credentials-file" in str(err.value)
        # containerd answered the challenge itself: its token goes upstream for that request ...
        m = await up.manifest("app", "v1", "application/vnd.oci.image.manifest.v1+json", head=False,
                              authorization=CONTAINERDS)
        assert m.body
        # ... and is not kept for the next one.
        with pytest.raises(UpstreamUnauthorized):
            await up.manifest("app", "v1", "application/vnd.oci.image.manifest.v1+json", head=False)
    finally:
        await session.close()
    assert [auth for _, auth in seen][-2:] == [CONTAINERDS, None]
