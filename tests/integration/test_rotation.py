"""Both rotation procedures of docs/security.md, step by step, on real containerd nodes that
pull from each other over the TLS peer transport: after every step a blob goes each way
between a node that has taken the step and one that has not, and the registry sends nothing.
(Before certificates had names and key identifiers of their own, the token's second step and
the CA's second step failed every peer transfer: `certificate verify failed`.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import Containerd, CsP2P, free_port, wait_for
from tests.conftest import requires_containerd

pytestmark = requires_containerd

OLD, NEW = "old-cluster-token-0123456789abcdef", "new-cluster-token-0123456789abcdef"


class RotatingNode:
    """containerd + cs-p2p whose membership files change between restarts of cs-p2p."""

    def __init__(self, workdir: str, registry, auth: list[str], operator: list[str]) -> None:
        self.dir = workdir
        self.peer, self.dht = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        self.auth, self.operator = auth, operator  # serve flags; flags for `cs-p2p locate`
        self.registry = registry
        self.cs: CsP2P | None = None
        self.containerd: Containerd | None = None

    def start(self, bootstrap: str) -> "RotatingNode":
        args = ["--peer-listen", self.peer, "--dht-listen", self.dht, "--bootstrap", bootstrap, *self.auth]
        self.cs = CsP2P(os.path.join(self.dir, "cs"), args).start()
        self.containerd = Containerd(os.path.join(self.dir, "ctd"), self.cs.socket, [self.registry.addr]).start()
        return self

    def restart(self) -> None:
        """The operator's restart after changing a file (a DaemonSet roll, node by node)."""
        self.cs.stop()
        self.cs.start()

    def pull(self, ref: str) -> None:
        self.containerd.ctr(*self.containerd.pull_args(ref))

    def locates(self, digest: str, provider: "RotatingNode") -> bool:
        out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", self.dht,
                              *self.operator], capture_output=True, text=True, timeout=60).stdout
        return provider.peer in out

    def stop(self) -> None:
        if self.containerd:
            self.containerd.stop()
        if self.cs:
            self.cs.stop()


@pytest.fixture
def pair(workdir, registry):
    made: list[RotatingNode] = []

    def start(auth_a: list[str], auth_b: list[str], op_a: list[str], op_b: list[str]):
        a = RotatingNode(os.path.join(workdir, "a"), registry, auth_a, op_a)
        b = RotatingNode(os.path.join(workdir, "b"), registry, auth_b, op_b)
        made.extend([a, b])
        return a.start(b.dht), b.start(a.dht)

    yield start
    for n in made:
        n.stop()


def both_ways(a: RotatingNode, b: RotatingNode, registry, tmp_path, step: str) -> None:
    """An image pulled by one node from the registry is pulled by the other from it, and back."""
    for src, dst, name in ((a, b, "ab"), (b, a, "ba")):
        img = build_image(str(tmp_path / f"{step}-{name}"), [1 << 20])
        ref = push_image(img, registry.addr, f"rotation/{step}-{name}")
        src.pull(ref)
        for d in img.digests:
            try:
                wait_for(lambda: dst.locates(d, src), 30, f"{step}: {d} announced by {name[0]}")
            except TimeoutError:
                raise AssertionError(f"{step}: {d} not found; logs:\n" + "\n".join(
                    f"--- {n}\n{n.cs.proc.log_tail(3000)}" for n in (src, dst))) from None
        before = registry.blob_bytes_served()
        dst.pull(ref)
        assert registry.blob_bytes_served() == before, f"{step}: {name[1]} went to the registry"
        assert dst.cs.blob_digests() >= set(img.digests)


def write(path: str, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return path


def test_token_rotation_as_documented(pair, registry, workdir, tmp_path):
    files = [write(os.path.join(workdir, f"{n}.token"), OLD + "\n") for n in "ab"]
    a, b = pair(["--cluster-token-file", files[0]], ["--cluster-token-file", files[1]],
                ["--cluster-token-file", files[0]], ["--cluster-token-file", files[1]])
    both_ways(a, b, registry, tmp_path, "start")
    steps = [("1-second-line", f"{OLD}\n{NEW}\n"), ("2-first-line", f"{NEW}\n{OLD}\n"), ("3-old-removed", f"{NEW}\n")]
    for step, content in steps:
        for i, node in enumerate((a, b)):
            write(files[i], content)
            node.restart()
            if node is a:  # a has taken the step, b not yet
                both_ways(a, b, registry, tmp_path, step)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cs_p2p.cli", *args], check=True, capture_output=True, timeout=60)


def test_ca_rotation_as_documented(pair, registry, workdir, tmp_path):
    old, new = os.path.join(workdir, "ca-old"), os.path.join(workdir, "ca-new")
    cli("ca", "init", old)
    cli("ca", "init", new)
    keys = [os.path.join(workdir, f"{n}.key") for n in "ab"]
    certs = [os.path.join(workdir, f"{n}.crt") for n in "ab"]
    cas = [os.path.join(workdir, f"{n}-ca.crt") for n in "ab"]
    old_pem, new_pem = (open(os.path.join(d, "ca.crt")).read() for d in (old, new))
    for i in range(2):
        cli("ca", "issue", old, "--key", keys[i], "--cert", certs[i])
        write(cas[i], old_pem)
    auth = [["--node-key-file", keys[i], "--node-cert-file", certs[i], "--cluster-ca-file", cas[i]] for i in range(2)]
    a, b = pair(auth[0], auth[1], auth[0], auth[1])
    both_ways(a, b, registry, tmp_path, "start")
    for i, node in enumerate((a, b)):  # (1) the new CA certificate added to every node's CA file
        write(cas[i], old_pem + new_pem)
        node.restart()
    both_ways(a, b, registry, tmp_path, "1-both-cas")
    for i, node in enumerate((a, b)):  # (2) certificates from the new CA, one node at a time
        cli("ca", "issue", new, "--key", keys[i], "--cert", certs[i])
        node.restart()
        if node is a:
            both_ways(a, b, registry, tmp_path, "2-new-certificate")
    for i, node in enumerate((a, b)):  # (3) the old CA removed
        write(cas[i], new_pem)
        node.restart()
        if node is a:
            both_ways(a, b, registry, tmp_path, "3-old-ca-removed")
