"""IPv6 and dual-stack clusters: the peer-to-peer pull, the cold concurrent pull and the mirror
outage again with every listener on [::1]; a mixed cluster of a node on [::] and one on
127.0.0.1 serving each other; and a node whose DHT meets nobody says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import wait_for
from cs_p2p_dev.releases import release
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import nodes  # noqa: F401  (a fixture)
from tests.integration.test_mirror import test_pulls_by_tag_and_digest_survive_a_registry_outage as _outage
from tests.integration.test_p2p_pull import P2PNode, cluster, located  # noqa: F401  (fixture)
from tests.integration.test_p2p_pull import (  # noqa: F401
    test_nodes_pulling_at_once_get_each_blob_from_the_registry_about_once,
    test_second_and_third_node_pull_from_peers_not_the_registry)
from tests.test_secure_default import admin_metrics

pytestmark = requires_containerd

# containerd 1.6 and 1.7 cannot read an IPv6 mirror address in hosts.toml (`containerd-config`
# refuses it for them: tests/test_dht_ipv6.py); the mirror outage over IPv6 runs on 2.x.
@pytest.mark.skipif(not release().v2, reason="containerd 1.6/1.7 cannot read an IPv6 address in hosts.toml")
def test_pulls_by_tag_and_digest_survive_a_registry_outage(nodes, own_registry, tmp_path, workdir):  # noqa: F811
    _outage(nodes, own_registry, tmp_path, workdir)


@pytest.fixture
def loopback() -> str:
    return "::1"


@pytest.fixture
def mixed(workdir, registry):
    """A node on 127.0.0.1 (IPv4 only) and one on [::] (both families, advertising ::1), each
    bootstrapped through the other (the IPv4 one restarted once to learn the other's port)."""
    made: list[P2PNode] = []
    try:
        v4 = P2PNode(workdir, "v4", registry, None, ip="127.0.0.1")
        made.append(v4)
        dual = P2PNode(workdir, "dual", registry, v4.dht, ["--advertise-addr", "::1", "--insecure-open-membership"],
                       ip="::")
        made.append(dual)
        dual_dht = "127.0.0.1:" + dual.dht.rsplit(":", 1)[1]  # its IPv4 face
        v4.cs.stop()
        v4.cs.extra_args += ["--bootstrap", dual_dht]
        v4.cs.start()
        yield v4, dual, dual_dht
    finally:
        for n in made:
            n.stop()


def test_a_node_on_the_dual_stack_wildcard_and_an_ipv4_node_serve_each_other(mixed, registry, tmp_path, workdir):
    v4, dual, dual_dht = mixed
    one = build_image(str(tmp_path / "one"), [3 << 20])
    two = build_image(str(tmp_path / "two"), [3 << 20])
    ref_one, ref_two = push_image(one, registry.addr, "mixed/one"), push_image(two, registry.addr, "mixed/two")
    dual.ctr("image", "pull", "--plain-http", ref_one)
    v4.ctr("image", "pull", "--plain-http", ref_two)
    for d in one.digests + two.digests:
        wait_for(lambda: located(d, v4.dht) and located(d, dual_dht), 30, f"{d} announced to both")
    before = registry.blob_bytes_served()
    v4.ctr("image", "pull", "--plain-http", ref_one)  # from the dual-stack node, over IPv6 (::1)
    dual.ctr("image", "pull", "--plain-http", ref_two)  # from the IPv4 node, over IPv4
    assert registry.blob_bytes_served() == before  # not a byte from the registry
    assert_unpacked(v4, one, ref_one, os.path.join(workdir, "mnt-one"))
    assert_unpacked(dual, two, ref_two, os.path.join(workdir, "mnt-two"))
    peers = json.loads(subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", dual.cs.root,
                                       "--json"], capture_output=True, text=True, check=True).stdout)["peers"]
    assert peers == [v4.dht]  # the IPv4 node by its IPv4 address, not as ::ffff:127.0.0.1


def status(root: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", root, "--json"],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def metric(root: str, name: str) -> str:
    body = admin_metrics(root)
    return next(line.split()[-1] for line in body.splitlines() if line.startswith(name + " "))


@pytest.mark.parametrize("bootstrap, why", [
    ("[::1]:1", "no bootstrap contact answered"),
    ("127.0.0.1:1", "no bootstrap contact resolves to an address dht-listen can reach"),  # IPv4 for an IPv6 node
])
def test_a_node_whose_dht_meets_nobody_says_so(p2p_node, bootstrap, why):
    cs, _, _ = p2p_node("alone", [], bootstrap)
    wait_for(lambda: why in status(cs.root).get("dht_alone", ""), 30, "the status line")
    assert metric(cs.root, "cs_p2p_dht_alone") == "1.0"
    text = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", cs.root],
                          capture_output=True, text=True, timeout=30).stdout
    assert "WARNING    the DHT found no other node" in text
    assert "dht alone: every pull goes to the registry" in open(cs.proc.log_path).read()


def test_peers_and_locate_reach_an_ipv6_node(p2p_node):
    first, _, dht = p2p_node("v6-first", [])
    p2p_node("v6-second", [], dht)
    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "peers", "--bootstrap", dht], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.count("[::1]:") >= 2, out
    assert metric(first.root, "cs_p2p_dht_alone") == "0.0"
