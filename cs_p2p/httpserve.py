"""Serving HTTP with aiohttp as both of cs-p2p's HTTP servers (the peer transfer server and the
registry mirror) need it: short request lines only, no access log, files sent inside the
handler."""

from __future__ import annotations

import socket
import ssl

from aiohttp import web

from .addresses import dual_stack_socket, is_unspecified

MAX_LINE = 4096  # request line and each header: ours are short, anything longer is refused (400)


async def start_site(app: web.Application, host: str, port: int,
                     tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (port 0 picks one): its runner, to clean up, and the port.
    `::` serves IPv6 and IPv4 on one socket (asyncio alone would make it IPv6-only)."""
    runner = web.AppRunner(app, access_log=None, max_line_size=MAX_LINE, max_field_size=MAX_LINE)
    await runner.setup()
    if ":" in host and is_unspecified(host):
        sock = dual_stack_socket(socket.SOCK_STREAM, port)
        sock.listen(128)
        site: web.BaseSite = web.SockSite(runner, sock, ssl_context=tls)
    else:
        site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


class SentFileResponse(web.FileResponse):
    """A FileResponse sent inside the handler (so that the upload slot is held until the body
    is out).  aiohttp prepares what a handler returns once more, and FileResponse would then
    try to send its headers a second time: an error logged and the kept-alive connection
    dropped after every blob."""

    async def prepare(self, request: web.BaseRequest):
        if self.prepared:
            return None
        return await super().prepare(request)
