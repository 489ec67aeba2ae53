"""The DHT over IPv6 and across families, in-process on loopback: nodes on [::1] find each
other's records; a node on the dual-stack [::] and one on 127.0.0.1 join through each other and
know each other by the IPv4 address (not ::ffff:127.0.0.1)."""

from __future__ import annotations

import os
import socket

import pytest

from cs_p2p.addresses import join_host_port, unmapped
from cs_p2p.config import ConfigError, MirrorRegistry, parse_host_port
from cs_p2p.containerd_config import check_mirror_address, hosts_toml
from cs_p2p.dht.node import DhtNode

D1, D2 = "sha256:" + "11" * 32, "sha256:" + "22" * 32


@pytest.fixture
async def node():
    made: list[DhtNode] = []

    async def make(host: str) -> DhtNode:
        n = DhtNode(os.urandom(20), join_host_port("::1" if ":" in host else "127.0.0.1", 5000 + len(made)))
        n.port = await n.listen(host, 0)
        made.append(n)
        return n

    yield make
    for n in made:
        n.stop()


async def test_nodes_on_ipv6_loopback_join_and_find_records(node):
    a, b = await node("::1"), await node("::1")
    assert await b.bootstrap([f"[::1]:{a.port}"]) == 1
    await a.announce(D1, 5)
    found = await b.find_providers(D1)
    assert [r.addr for r in found] == [a.peer_addr] and a.peer_addr.startswith("[::1]:")


async def test_a_dual_stack_node_and_an_ipv4_node_join_through_each_other(node):
    v4, dual = await node("127.0.0.1"), await node("::")
    assert await v4.bootstrap([f"127.0.0.1:{dual.port}"]) == 1
    assert await dual.bootstrap([f"127.0.0.1:{v4.port}"]) == 1
    assert [(n.ip, n.port) for n in dual.contacts()] == [("127.0.0.1", v4.port)]
    await dual.announce(D1, 5)
    await v4.announce(D2, 5)
    assert [r.node_id for r in await v4.find_providers(D1)] == [dual.node_id]
    assert [r.node_id for r in await dual.find_providers(D2)] == [v4.node_id]


async def test_an_ipv4_node_skips_ipv6_contacts_instead_of_waiting_on_them(node):
    v4 = await node("127.0.0.1")
    assert await v4.bootstrap(["[::1]:9"]) == 0
    assert v4.families() == {socket.AF_INET}


def test_addresses_are_written_with_brackets_and_read_back():
    assert join_host_port("fd00::1", 5001) == "[fd00::1]:5001" and join_host_port("10.0.0.1", 1) == "10.0.0.1:1"
    assert parse_host_port("[fd00::1]:5001", "x") == ("fd00::1", 5001)
    assert unmapped("::ffff:10.1.2.3") == "10.1.2.3" and unmapped("fd00::1") == "fd00::1"
    with pytest.raises(ConfigError, match="brackets"):
        parse_host_port("fd00::1:5001", "peer-listen")
    assert '[host."http://[::1]:5080"]' in hosts_toml(MirrorRegistry("r.example"), "[::1]:5080")
    check_mirror_address("2.3", "[::1]:5080")
    with pytest.raises(ValueError, match="cannot read an IPv6 address in hosts.toml"):
        check_mirror_address("1.7", "[::1]:5080")  # its TOML parser refuses the bracketed table key
    check_mirror_address("1.7", "127.0.0.1:5080")
