"""Placement (issue 11) with real containerd nodes pulling through their mirrors: a holder that
dies is replaced by the replication floor and the image still pulls with the registry down; a
holder whose copy went bad behind the DHT's back is caught by a proof of storage and pulls get
the right bytes; the cache stays within its budget and never touches what containerd uses.

These run once, on the default containerd: what they show happens between cs-p2p nodes, the
same whatever the containerd release (its content API is the same on all three)."""

from __future__ import annotations

import json
import os

from cs_p2p.devcluster.images import build_image, push_image
from cs_p2p.devcluster.processes import wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import MirrorNode, own_registry  # noqa: F401 (a fixture)
from tests.integration.test_p2p_pull import holders_of, providers_of

pytestmark = requires_containerd

FAST = ["--replica-check-interval", "1", "--dht-ttl", "10", "--challenge-interval", "1"]
NO_CACHE = ["--cache-max-bytes", "0"]


def log_records(node: MirrorNode, message: str) -> list[dict]:
    with open(node.cs.proc.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("msg") == message]


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if os.path.isdir(path) else 0


def test_a_dead_holder_is_replaced_and_the_image_still_pulls_with_the_registry_down(workdir, own_registry,
                                                                                    tmp_path):  # noqa: F811
    img = build_image(str(tmp_path / "oci"), [3 << 20, 2 << 20])
    ref = push_image(img, own_registry.addr, "placement/dead")
    n1 = MirrorNode(os.path.join(workdir, "n1"), own_registry, None, FAST + NO_CACHE)
    nodes = [n1] + [MirrorNode(os.path.join(workdir, f"n{i}"), own_registry, n1.dht, FAST) for i in (2, 3)]
    try:
        assert n1.pull(ref).returncode == 0
        for d in img.digests:  # containerd's copy on n1 and one copy for the floor
            wait_for(lambda: holders_of(d, nodes[2].dht) == 2, 60, f"two holders of {d}")
        n1.containerd.stop()
        n1.cs.kill()  # a node dies: its records expire after dht-ttl
        for d in img.digests:
            wait_for(lambda: holders_of(d, nodes[2].dht) == 2 and n1.peer not in providers_of(d, nodes[2].dht),
                     60, f"the floor restored for {d}")
        own_registry.stop()
        for n in nodes[1:]:
            res = n.pull(ref)
            assert res.returncode == 0, res.stderr.decode()
        assert_unpacked(nodes[2].containerd, img, ref, os.path.join(workdir, "mnt"))
    finally:
        for n in nodes:
            n.stop()


def test_a_holder_whose_copy_went_bad_is_caught_and_pulls_get_the_right_bytes(workdir, own_registry,
                                                                             tmp_path):  # noqa: F811
    img = build_image(str(tmp_path / "oci"), [3 << 20])
    ref = push_image(img, own_registry.addr, "placement/rot")
    layer = img.layer_digests[0]
    n1 = MirrorNode(os.path.join(workdir, "n1"), own_registry, None, FAST + NO_CACHE)
    nodes = [n1] + [MirrorNode(os.path.join(workdir, f"n{i}"), own_registry, n1.dht, FAST) for i in (2, 3)]
    try:
        assert n1.pull(ref).returncode == 0
        wait_for(lambda: holders_of(layer, n1.dht) == 2, 60, "the floor's copy")
        with open(n1.cs.blob_path(layer), "r+b") as f:  # overwritten behind the DHT's back
            f.write(os.urandom(len(img.blob_bytes(layer))))
        wait_for(lambda: [r for n in nodes[1:] for r in log_records(n, "proof of storage failed: record dropped")
                          if r["addr"] == n1.peer], 60, "a failed proof")
        own_registry.stop()
        for n in nodes[1:]:
            res = n.pull(ref)
            assert res.returncode == 0, res.stderr.decode()
            with open(n.cs.blob_path(layer), "rb") as f:
                assert f.read() == img.blob_bytes(layer)
    finally:
        for n in nodes:
            n.stop()


def test_the_cache_stays_within_its_budget_and_never_takes_what_containerd_uses(workdir, own_registry,
                                                                              tmp_path):  # noqa: F811
    budget = 7 << 20
    images = [build_image(str(tmp_path / f"oci{i}"), [3 << 20, 1 << 20]) for i in range(3)]
    refs = [push_image(img, own_registry.addr, f"placement/budget{i}") for i, img in enumerate(images)]
    n = MirrorNode(os.path.join(workdir, "n"), own_registry, None, ["--cache-max-bytes", str(budget)])
    cache = os.path.join(n.cs.root, "cache", "sha256")
    try:
        for ref in refs:
            assert n.pull(ref).returncode == 0
        for ref in refs[:2]:  # containerd's GC lets go of two images; the third stays in use
            n.containerd.ctr("image", "rm", "--sync", ref)
            assert du(cache) <= budget
        assert 0 < du(cache) <= budget
        kept = {"sha256:" + h for h in os.listdir(cache)}
        assert kept and not kept & set(images[2].digests)  # never what containerd references
        assert n.cs.blob_digests() >= set(images[2].digests)
        assert_unpacked(n.containerd, images[2], refs[2], os.path.join(workdir, "mnt"))
        # What was evicted is no longer announced; what is cached still is.
        gone = set(images[0].digests + images[1].digests) - kept
        assert gone and all("no provider" in providers_of(d, n.dht) for d in list(gone)[:2])
        assert all(n.peer in providers_of(d, n.dht) for d in list(kept)[:2])
    finally:
        n.stop()
