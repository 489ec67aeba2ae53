"""Hosts with shaped links on one machine, for the cluster benchmark.

Each host is a network namespace joined to one bridge by a veth pair; a token bucket (tc
tbf) on both ends of the pair limits what the host sends and what it receives, like a
host's network card.  Everything is created under names of our own and removed by
`close()`, even after a half-finished set-up.  Needs root and iproute2.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

BRIDGE = "csbr0"
SUBNET = "10.77.0"


def _ip(*args: str, netns: str | None = None) -> None:
    argv = (["ip", "netns", "exec", netns] if netns else []) + list(args)
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Host:
    netns: str
    ip: str


class ShapedNetwork:
    def __init__(self, rate_mbit: int) -> None:
        self.rate = f"{rate_mbit}mbit"
        self.hosts: list[Host] = []
        self.close()  # leftovers of an interrupted run
        _ip("ip", "link", "add", BRIDGE, "type", "bridge")
        _ip("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _ip("ip", "link", "set", BRIDGE, "up")

    def add_host(self, index: int) -> Host:
        """Host `index` (1..250) at 10.77.0.<index>, its link shaped in both directions."""
        ns, outer, inner = f"csb{index}", f"csb{index}b", f"csb{index}h"
        _ip("ip", "netns", "add", ns)
        host = Host(ns, f"{SUBNET}.{index}")
        self.hosts.append(host)
        _ip("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("ip", "link", "set", inner, "netns", ns)
        _ip("ip", "link", "set", outer, "master", BRIDGE)
        _ip("ip", "link", "set", outer, "up")
        _ip("ip", "link", "set", "lo", "up", netns=ns)
        _ip("ip", "addr", "add", f"{host.ip}/24", "dev", inner, netns=ns)
        _ip("ip", "link", "set", inner, "up", netns=ns)
        shape = ["root", "tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms"]
        _ip("tc", "qdisc", "add", "dev", inner, *shape, netns=ns)  # what the host sends
        _ip("tc", "qdisc", "add", "dev", outer, *shape)  # what it receives
        return host

    def close(self) -> None:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        for name in names:
            if name.startswith("csb") and name[3:].isdigit():
                subprocess.run(["ip", "netns", "del", name], capture_output=True)  # its veth goes with it
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        self.hosts = []
