"""The cache beside containerd's content (issue 11, point 1) with real containerd nodes: after
containerd's GC on every node, the blobs stay in each node's cache, still announced and never
listed to containerd, and the image is pulled again with the registry stopped, from the
node's own cache, without a byte of network."""

from __future__ import annotations

import json
import os

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import MirrorNode, wait_shared
from tests.integration.test_p2p_pull import providers_of

pytestmark = requires_containerd


def records(node: MirrorNode, message: str) -> list[dict]:
    with open(node.cs.proc.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("msg") == message]


def test_gc_on_every_node_and_the_image_still_pulls_with_the_registry_down(workdir, own_registry, tmp_path):
    img = build_image(str(tmp_path / "oci"), [3 << 20, 2 << 20])
    ref = push_image(img, own_registry.addr, "cache/app")
    budget = ["--cache-max-bytes", str(64 << 20)]
    n1 = MirrorNode(os.path.join(workdir, "n1"), own_registry, None, budget)
    n2 = MirrorNode(os.path.join(workdir, "n2"), own_registry, n1.dht, budget)
    try:
        for n in (n1, n2):
            assert n.pull(ref).returncode == 0
        wait_shared(n2, img.digests)
        for n in (n1, n2):
            n.containerd.ctr("image", "rm", "--sync", ref)  # containerd's GC deletes every blob
            wait_for(lambda: n.cs.blob_digests() == set(), 30, "GC")
            assert n.cs.cached_digests() == set(img.digests)
            listed = n.containerd.ctr("content", "ls", "-q").stdout.decode().split()
            assert not set(listed) & set(img.digests)  # containerd never sees the cache
        assert n1.peer in providers_of(img.layer_digests[0], n2.dht)  # cached blobs stay announced
        fetched = {n.dht: len(records(n, "fetched from peers")) for n in (n1, n2)}
        own_registry.stop()
        for n in (n1, n2):
            res = n.pull(ref)
            assert res.returncode == 0, res.stderr.decode()
            assert n.cs.blob_digests() == set(img.digests)
            assert len(records(n, "fetched from peers")) == fetched[n.dht]  # nothing from the network
            assert {r["digest"] for r in records(n, "blob restored from the cache")} >= set(img.layer_digests)
        assert_unpacked(n2.containerd, img, ref, os.path.join(workdir, "mnt"))
    finally:
        n1.stop()
        n2.stop()
