"""The registry mirror on every node, with real containerd nodes whose hosts.toml puts it in
front of the registry: pulls by tag and by digest keep working while the registry is down."""

from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

from cs_p2p.api import cri_pb2, cri_pb2_grpc
from cs_p2p.addresses import join_host_port
from cs_p2p.config import MirrorRegistry
from cs_p2p.containerd_config import write_hosts_dir
from cs_p2p_dev.images import build_image, build_multiarch_image, push_image
from cs_p2p_dev.processes import Containerd, CsP2P, Registry, free_port, wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_p2p_pull import located

pytestmark = requires_containerd


class MirrorNode:
    """containerd + cs-p2p with the peer server, the DHT and the mirror for one registry."""

    def __init__(self, workdir: str, registry: Registry, bootstrap: str | None, extra: list[str] | None = None,
                 ip: str = "127.0.0.1") -> None:
        """`ip`: the loopback address of its peer server and DHT node (peers tell nodes apart by it)."""
        self.peer, self.dht = join_host_port(ip, free_port()), join_host_port(ip, free_port())
        # on IPv6, the mirror too: containerd reaches it at http://[::1]:PORT
        self.mirror = join_host_port(ip if ":" in ip else "127.0.0.1", free_port())
        args = ["--peer-listen", self.peer, "--dht-listen", self.dht, "--mirror-listen", self.mirror,
                "--mirror-registry", f"http://{registry.addr}", "--mirror-timeout-ms", "1000"]
        args += (["--bootstrap", bootstrap] if bootstrap else []) + (extra or [])
        self.cs = CsP2P(os.path.join(workdir, "cs"), args).start()
        hosts = os.path.join(workdir, "hosts")
        write_hosts_dir(hosts, [MirrorRegistry(registry.addr, plain_http=True)], self.mirror)
        self.containerd = Containerd(os.path.join(workdir, "ctd"), self.cs.socket, hosts_dir=hosts).start()

    def pull(self, ref: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*self.containerd.pull_args(ref), check=False, timeout=timeout)

    def image_digest(self, ref: str, namespace: str = "default") -> str:
        out = self.containerd.ctr("image", "ls", namespace=namespace).stdout.decode()
        return next(line.split()[2] for line in out.splitlines() if line.startswith(ref + " "))

    def stop(self) -> None:
        self.containerd.stop()
        self.cs.stop()


@pytest.fixture
def nodes(workdir, own_registry, loopback):
    made: list[MirrorNode] = []
    try:
        made.append(MirrorNode(os.path.join(workdir, "n1"), own_registry, None, ip=loopback))
        made.append(MirrorNode(os.path.join(workdir, "n2"), own_registry, made[0].dht, ip=loopback))
        yield made
    finally:
        for n in made:
            n.stop()


def cri_pull(node: MirrorNode, ref: str) -> str:
    ch = grpc.insecure_channel("unix:" + node.containerd.socket)
    try:
        cri = cri_pb2_grpc.ImageServiceStub(ch)
        return cri.PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref)), timeout=120).image_ref
    finally:
        ch.close()


def wait_shared(node: MirrorNode, digests: list[str]) -> None:
    for d in digests:
        wait_for(lambda: located(d, node.dht), 30, f"{d} to be announced")


def test_pulls_by_tag_and_digest_survive_a_registry_outage(nodes, own_registry, tmp_path, workdir):
    n1, n2 = nodes
    img = build_image(str(tmp_path / "oci"), [3 << 20, 2 << 20])
    ref = push_image(img, own_registry.addr, "mirror/app")
    assert n1.pull(ref).returncode == 0  # through the mirror, which asks the registry
    assert n1.image_digest(ref) == img.manifest_digest
    wait_shared(n2, img.digests)
    own_registry.stop()

    res = n2.pull(ref)
    assert res.returncode == 0, res.stderr.decode()
    assert n2.image_digest(ref) == img.manifest_digest
    assert_unpacked(n2.containerd, img, ref, os.path.join(workdir, "mnt-tag"))
    by_digest = f"{ref.rsplit(':', 1)[0]}@{img.manifest_digest}"
    res = n2.pull(by_digest)
    assert res.returncode == 0, res.stderr.decode()
    assert cri_pull(n2, ref)  # the kubelet's way, in the k8s.io namespace
    assert n2.image_digest(ref, namespace="k8s.io") == img.manifest_digest
    assert "tag resolved from peers" in open(n2.cs.proc.log_path).read()


def test_a_moved_tag_resolves_to_the_newest_digest(nodes, own_registry, tmp_path):
    n1, n2 = nodes
    old = build_image(str(tmp_path / "old"), [1 << 20])
    ref = push_image(old, own_registry.addr, "mirror/moving")
    assert n2.pull(ref).returncode == 0  # node 2 publishes tag -> old digest
    own_registry.stop()
    own_registry.start()  # back, and the tag moves to a new image
    new = build_image(str(tmp_path / "new"), [1 << 20])
    push_image(new, own_registry.addr, "mirror/moving")
    assert n1.pull(ref).returncode == 0
    assert n1.image_digest(ref) == new.manifest_digest  # the registry's answer wins while it is up
    wait_shared(n2, new.digests)
    own_registry.stop()
    n2.containerd.ctr("image", "rm", ref)
    res = n2.pull(ref)
    assert res.returncode == 0, res.stderr.decode()
    assert n2.image_digest(ref) == new.manifest_digest  # the newest record wins over node 2's own


def test_an_image_nobody_has_fails_clearly_and_in_bounded_time(nodes, own_registry):
    _, n2 = nodes
    own_registry.stop()
    t0 = time.monotonic()
    res = n2.pull(f"{own_registry.addr}/mirror/never:v1", timeout=90)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 60
    assert b"mirror/never" in res.stderr and (b"not found" in res.stderr or b"connection refused" in res.stderr)


def test_a_multi_arch_index_resolves_from_peers(nodes, own_registry, tmp_path, workdir):
    n1, n2 = nodes
    img, index_digest = build_multiarch_image(str(tmp_path / "multi"), [2 << 20])
    ref = push_image(img, own_registry.addr, "mirror/multi")
    assert n1.pull(ref).returncode == 0
    assert n1.image_digest(ref) == index_digest
    wait_shared(n2, [index_digest, *img.digests])
    own_registry.stop()
    res = n2.pull(ref)
    assert res.returncode == 0, res.stderr.decode()
    assert n2.image_digest(ref) == index_digest
    assert_unpacked(n2.containerd, img, ref, os.path.join(workdir, "mnt-multi"))
