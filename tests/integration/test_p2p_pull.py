"""Three real containerd + cs-p2p nodes: after one pull from the registry, the others pull
the same image from peers and the registry serves them no blob bytes at all."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cs_p2p.devcluster.images import build_image, push_image
from cs_p2p.devcluster.processes import Containerd, CsP2P, free_port, wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import layer_file

pytestmark = requires_containerd


class P2PNode:
    def __init__(self, workdir: str, name: str, registry, bootstrap: str | None) -> None:
        self.peer = f"127.0.0.1:{free_port()}"
        self.dht = f"127.0.0.1:{free_port()}"
        args = ["--peer-listen", self.peer, "--dht-listen", self.dht] + (["--bootstrap", bootstrap] if bootstrap else [])
        self.cs = CsP2P(os.path.join(workdir, name, "cs"), args).start()
        self.containerd = Containerd(os.path.join(workdir, name, "ctd"), self.cs.socket, [registry.addr]).start()

    def ctr(self, *args: str, **kw):
        return self.containerd.ctr(*args, **kw)

    def stop(self) -> None:
        self.containerd.stop()
        self.cs.stop()


@pytest.fixture
def cluster(workdir, registry):
    nodes: list[P2PNode] = []
    try:
        first = P2PNode(workdir, "n1", registry, None)
        nodes.append(first)
        for i in (2, 3):
            nodes.append(P2PNode(workdir, f"n{i}", registry, first.dht))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def located(digest: str, via: str) -> bool:
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", via],
                         capture_output=True, text=True, timeout=60)
    return res.returncode == 0


def test_second_and_third_node_pull_from_peers_not_the_registry(cluster, registry, tmp_path, workdir):
    img = build_image(str(tmp_path / "oci"), [6 << 20, 9 << 20, 1 << 20])
    ref = push_image(img, registry.addr, "p2p/app")
    n1, n2, n3 = cluster
    n1.ctr("image", "pull", "--plain-http", ref)
    from_registry = registry.blob_bytes_served()
    assert sum(from_registry.get(d, 0) for d in img.layer_digests) == sum(
        os.path.getsize(n1.cs.blob_path(d)) for d in img.layer_digests)  # node 1 paid once
    for d in [img.config_digest, *img.layer_digests]:
        wait_for(lambda: located(d, n2.dht), 30, f"{d} to be announced")

    for node in (n2, n3):
        node.ctr("image", "pull", "--plain-http", ref)
        assert node.cs.blob_digests() == set(img.digests)
        target = os.path.join(workdir, f"mnt-{node.dht.split(':')[1]}")
        os.makedirs(target)
        node.ctr("image", "mount", ref, target)
        try:
            for i in range(len(img.layer_digests)):
                with open(os.path.join(target, f"layer{i}", "data.bin"), "rb") as f:
                    assert f.read() == layer_file(img, i)
        finally:
            node.ctr("image", "unmount", "--rm", target)
    # Not one more blob byte left the registry: config and layers came from peers.
    assert registry.blob_bytes_served() == from_registry
    logs = open(n2.cs.proc.log_path).read() + open(n3.cs.proc.log_path).read()
    assert logs.count("fetched from peers") >= 2 * (1 + len(img.layer_digests))
