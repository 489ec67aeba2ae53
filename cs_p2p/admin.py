"""The daemon's admin endpoint: `/status` (what `cs-p2p status` prints), `/metrics`
(Prometheus), `/timeline` (`cs-p2p status --timeline`) and `/purge` (`cs-p2p purge`: only root
on a member node purges), on a unix socket in the root that only root (or the root's owner) can open —
status names peers and blobs, which is nobody else's business.  `--metrics-listen` serves
`/metrics` alone on TCP for Prometheus to scrape.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web

from . import __version__, metrics
from .addresses import join_host_port
from .httpserve import start_site
from .membership import Membership
from .timeline import TIMELINE

if TYPE_CHECKING:
    from .dht.node import DhtNode
    from .fetch.fetcher import Fetcher
    from .store import LocalStore

SOCKET_NAME = "admin.sock"
STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
PURGE_PATH = "/purge"
TIMELINE_PATH = "/timeline"


def admin_socket(root: str) -> str:
    return os.path.join(os.path.abspath(root), SOCKET_NAME)


def membership_mode(member: Membership) -> str:
    if member.identity is not None:
        return "key-pair"
    return "token" if member.peer_sealer is not None else "open"


@dataclass
class NodeView:
    """What the admin endpoint reads from the running daemon."""

    store: "LocalStore"
    member: Membership
    dht: "DhtNode | None" = None
    fetcher: "Fetcher | None" = None
    listeners: dict[str, str] = field(default_factory=dict)
    open_on_network: list[str] = field(default_factory=list)  # listeners an open cluster exposes
    started: float = field(default_factory=time.time)
    refusals: collections.Counter = field(default_factory=collections.Counter)  # the mirror's, by reason
    purges: Callable[[], int] = lambda: 0  # purges this node knows
    # `cs-p2p purge`: TARGET -> what was purged; raises ValueError for a target it cannot purge
    purge: Callable[[str], Awaitable[dict]] | None = None

    def status(self) -> dict:
        usage = self.store.usage()
        fetcher = self.fetcher
        now = time.monotonic()
        return {
            "version": __version__,
            "node_id": self.dht.node_id.hex() if self.dht else None,
            "membership": membership_mode(self.member),
            "open_on_network": self.open_on_network,
            "uptime_seconds": round(time.time() - self.started, 1),
            "listeners": self.listeners,
            "peers": sorted(join_host_port(n.ip, n.port) for n in self.dht.contacts()) if self.dht else [],
            "dht_alone": self.dht.alone if self.dht else "",
            "blobs": {"count": usage.blobs, "bytes": usage.blob_bytes},
            "cache": {"count": usage.cached, "bytes": usage.cached_bytes, "budget_bytes": self.store.cache.max_bytes},
            "ingests_open": usage.ingests,
            "ingests_bytes": usage.ingest_bytes,  # containerd's downloads under way
            "fetches": [{"digest": f.digest, "size": f.size, "done_bytes": sum(f.bytes_from.values()),
                         "pieces": [len(f.done_pieces), f.pieces], "sources": dict(f.bytes_from)}
                        for f in (fetcher.inflight.values() if fetcher else [])],
            "recent_fetches": list(reversed(fetcher.recent)) if fetcher else [],
            "recent_bans": list(reversed(fetcher.recent_bans)) if fetcher else [],
            "banned_now": sorted(a for a, until in fetcher.banned.items() if until > now) if fetcher else [],
            "mirror_refusals": dict(self.refusals),
            "purges": self.purges(),
        }


async def _metrics(_request: web.Request) -> web.Response:
    return web.Response(body=metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})


class AdminServer:
    def __init__(self, view: NodeView) -> None:
        self.view = view
        self._runners: list[web.AppRunner] = []

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(self.view.status())

    async def _timeline(self, request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since: unix time, seconds") from None
        return web.json_response(TIMELINE.events(since))

    async def _purge(self, request: web.Request) -> web.Response:
        if self.view.purge is None:
            raise web.HTTPConflict(text="this node has no DHT: a purge needs the cluster (dht-listen)")
        try:
            body = await request.json()
            target = body["target"]
            if not isinstance(target, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='expected {"target": "REF or DIGEST"}') from None
        try:
            return web.json_response(await self.view.purge(target))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    async def start_socket(self, path: str) -> None:
        app = web.Application()
        app.router.add_get(STATUS_PATH, self._status)
        app.router.add_post(PURGE_PATH, self._purge)
        app.router.add_get(TIMELINE_PATH, self._timeline)
        app.router.add_get(METRICS_PATH, _metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if os.path.exists(path):
            os.unlink(path)  # a previous run's; the root lock says none is running
        umask = os.umask(0o077)
        try:
            await web.UnixSite(runner, path).start()
        finally:
            os.umask(umask)
        self._runners.append(runner)

    async def start_metrics(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get(METRICS_PATH, _metrics)
        runner, port = await start_site(app, host, port)
        self._runners.append(runner)
        return port

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
