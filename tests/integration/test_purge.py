"""`cs-p2p purge`: five real containerd + cs-p2p nodes hold an image; a purge by tag (and one by
digest) reaches every node within a minute — no mirror or peer port serves the blobs, no
provider is found, a node that was down learns it when it is back — while the blobs each
node's containerd holds stay with it, and the tag is resolved from the registry only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import Registry, wait_for
from tests.conftest import requires_containerd
from tests.integration.test_mirror import MirrorNode, wait_shared
from tests.integration.test_p2p_pull import located

pytestmark = requires_containerd

PURGE_DEADLINE = 60.0


def status_of(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def serves(node: MirrorNode, registry: Registry, repo: str, digest: str, manifest: bool = False) -> bool:
    """Whether `node` hands out `digest`: through its mirror or its peer port."""
    kind = "manifests" if manifest else "blobs"
    return (status_of(f"http://{node.mirror}/v2/{repo}/{kind}/{digest}?ns={registry.addr}") == 200
            or status_of(f"http://{node.peer}/blobs/{digest}", "HEAD") == 200)


def purge(node: MirrorNode, target: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "purge", target, "--root", node.cs.root],
                          capture_output=True, text=True, timeout=120)


def assert_purged_everywhere(nodes: list[MirrorNode], registry: Registry, repo: str, img, t0: float) -> None:
    def gone() -> bool:
        return not any(serves(n, registry, repo, d, manifest=d == img.manifest_digest)
                       for n in nodes for d in img.digests)

    wait_for(gone, max(1.0, PURGE_DEADLINE - (time.monotonic() - t0)), "no node to serve the purged image")
    for d in img.digests:
        assert not located(d, nodes[0].dht), f"{d} still has a provider"


@pytest.fixture
def five(workdir, own_registry):
    made: list[MirrorNode] = []
    try:
        for i in range(5):
            made.append(MirrorNode(os.path.join(workdir, f"n{i + 1}"), own_registry, made[0].dht if made else None))
        yield made
    finally:
        for n in made:
            n.stop()


def test_a_purge_by_tag_and_by_digest_reaches_every_node_and_holds(five, own_registry, tmp_path):
    img = build_image(str(tmp_path / "bad"), [2 << 20, 1 << 20])
    ref = push_image(img, own_registry.addr, "purge/app")
    other = build_image(str(tmp_path / "other"), [1 << 20])
    other_ref = push_image(other, own_registry.addr, "purge/other")
    assert five[0].pull(ref).returncode == 0
    wait_shared(five[-1], img.digests)
    for n in five[1:]:
        res = n.pull(ref)
        assert res.returncode == 0, res.stderr.decode()
    assert five[1].pull(other_ref).returncode == 0
    wait_shared(five[0], other.digests)
    assert all(serves(n, own_registry, "purge/app", img.layer_digests[0]) for n in five)
    down = five[4]
    down.cs.stop()  # away during the purge

    t0 = time.monotonic()
    res = purge(five[0], ref)
    assert res.returncode == 0, res.stderr
    for d in img.digests:
        assert d in res.stdout
    assert "stay with it" in res.stdout
    assert_purged_everywhere(five[:4], own_registry, "purge/app", img, t0)
    # containerd keeps what it references (the image still runs there), unshared
    assert set(img.digests) <= five[2].cs.blob_digests()

    down.cs.start()  # it announces what it holds at once, then learns the purge as it rejoins
    assert_purged_everywhere([down], own_registry, "purge/app", img, time.monotonic())
    assert_purged_everywhere(five, own_registry, "purge/app", img, time.monotonic())

    # The purged tag is not resolved from peers any more: during an outage it is simply unknown ...
    own_registry.stop()
    assert status_of(f"http://{five[3].mirror}/v2/purge/app/manifests/{img.tag}?ns={own_registry.addr}") == 404
    own_registry.start()
    # ... and with the registry back, a pull by the tag takes the registry's new image.
    fixed = build_image(str(tmp_path / "fixed"), [1 << 20])
    push_image(fixed, own_registry.addr, "purge/app")
    five[3].containerd.ctr("image", "rm", ref)
    res = five[3].pull(ref)
    assert res.returncode == 0, res.stderr.decode()
    assert five[3].image_digest(ref) == fixed.manifest_digest

    # By digest, from another node: the manifest and everything it names.
    assert serves(five[0], own_registry, "purge/other", other.layer_digests[0])
    t0 = time.monotonic()
    res = purge(five[1], other.manifest_digest)
    assert res.returncode == 0, res.stderr
    assert_purged_everywhere(five, own_registry, "purge/other", other, t0)


def test_a_purge_of_what_nobody_resolved_says_so(five):
    res = purge(five[0], "127.0.0.1:1/never/pulled:v1")
    assert res.returncode == 2 and "no node has resolved" in res.stderr
    res = purge(five[0], "not a reference")
    assert res.returncode == 2 and "expected REGISTRY/REPOSITORY" in res.stderr
