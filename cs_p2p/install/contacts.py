"""The DHT's bootstrap contacts, resolved where they resolve and written where cs-p2p reads them.

In Kubernetes the contacts are a headless Service's name (every node's address).  The host's
cs-p2p runs under systemd with the host's own resolver, which does not know the cluster's
names; the installer's pod does.  So the pod resolves the name and writes the addresses to a
file on the host (`bootstrap-file` in cs-p2p's settings), which the daemon reads again at each
join attempt: nodes that come and go need no restart of cs-p2p, and after a reboot cs-p2p joins
through the addresses written last, before the kubelet runs anything.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

from ..config import parse_host_port
from .files import write_if_changed

CONTACTS_FILE = "/etc/cs-p2p/bootstrap"  # on the host


def resolve(names: list[str]) -> list[str]:
    """Every `HOST:PORT` address each `NAME:PORT` resolves to (IPv4 and IPv6), sorted; a name
    that does not resolve adds none."""
    found: set[str] = set()
    for name in names:
        host, port = parse_host_port(name, "bootstrap name")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror:
            continue
        for family, _, _, _, addr in infos:
            found.add(f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}")
    return sorted(found)


def write_contacts(path: str, addrs: list[str]) -> bool:
    """Replace the file's addresses with `addrs` (atomically); an empty list keeps the old ones
    (a resolver that is briefly down must not leave the node with no way back in).  True if
    the file changed."""
    if not addrs:
        return False
    return write_if_changed(path, "".join(a + "\n" for a in addrs))


def keep_contacts(path: str, names: list[str], every: float, log: Callable[[str], None] = print) -> None:
    """Resolve and write the contacts now and every `every` seconds (the installer pod's main
    container does this for as long as it runs)."""
    while True:
        addrs = resolve(names)
        if write_contacts(path, addrs):
            log(f"bootstrap contacts: {' '.join(addrs)}")
        time.sleep(every)
