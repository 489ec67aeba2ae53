"""Network addresses written and read the same way everywhere, IPv4 and IPv6 alike.

`HOST:PORT` with an IPv6 literal in brackets (`[fd00::1]:5001`), as in URLs: provider records,
logs, `cs-p2p status` and hosts.toml all carry addresses in this form.  A dual-stack socket
(`[::]`) sees IPv4 peers as IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`); they are written as
the IPv4 address they are, so that a node is known by one name whichever socket it reached.
"""

from __future__ import annotations

import ipaddress
import socket


def join_host_port(host: str, port: int) -> str:
    """`host:port`, or `[host]:port` for an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it is; any other host as it is."""
    if host.startswith("::ffff:") or host.startswith("::FFFF:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


def family_of(host: str) -> int | None:
    """AF_INET or AF_INET6 for an IP literal, None for a name."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host.strip("[]")).version == 6 else socket.AF_INET
    except ValueError:
        return None


def is_unspecified(host: str) -> bool:
    """`0.0.0.0`, `::` (every address of its family; `::` serves IPv4 too, `httpserve`)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def dual_stack_socket(kind: int, port: int) -> socket.socket:
    """A socket bound to `[::]:port` that takes IPv4 too (IPv4-mapped addresses)."""
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
