"""Placement (issue 11) with real containerd nodes pulling through their mirrors: a holder that
dies is replaced by the replication floor and the image still pulls with the registry down; a
holder whose copy went bad behind the DHT's back is caught by a proof of storage and pulls get
the right bytes; the cache stays within its budget and never touches what containerd uses; a
contended holder serves the node that gave it bytes before a free rider.

These run once, on the default containerd: what they show happens between cs-p2p nodes, the
same whatever the containerd release (its content API is the same on all three)."""

from __future__ import annotations

import json
import os
import threading
import time

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import MirrorNode, wait_shared
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


def test_a_contended_holder_serves_the_node_that_gave_before_the_free_rider(workdir, own_registry,
                                                                            tmp_path):  # noqa: F811
    """Fair sharing with containerd pulls: the only holder of an image has one upload slot at
    8 MiB/s.  The free rider (it takes, and the address it announces serves nothing) starts its
    pull first; the node that once gave the holder a blob starts its own a moment later, and its
    pull ends first; the rider's pull still succeeds."""
    gift = build_image(str(tmp_path / "gift"), [4 << 20])
    img = build_image(str(tmp_path / "app"), [24 << 20, 24 << 20])
    gift_ref = push_image(gift, own_registry.addr, "fair/gift")
    ref = push_image(img, own_registry.addr, "fair/app")
    keep_nothing = ["--replicas", "0", "--cache-max-bytes", "0"]
    holder = MirrorNode(os.path.join(workdir, "holder"), own_registry, None,
                        ["--peer-max-uploads", "1", "--peer-rate-limit", str(8 << 20), "--replicas", "0"],
                        ip="127.0.0.3")
    nodes = [holder]
    try:
        giver = MirrorNode(os.path.join(workdir, "giver"), own_registry, holder.dht, keep_nothing, ip="127.0.0.4")
        nodes.append(giver)
        rider = MirrorNode(os.path.join(workdir, "rider"), own_registry, holder.dht,
                           keep_nothing + ["--advertise-addr", "127.0.0.9"], ip="127.0.0.5")
        nodes.append(rider)
        # The giver gives: the holder pulls the gift's layer from it.
        assert giver.pull(gift_ref).returncode == 0
        wait_shared(giver, gift.digests)
        assert holder.pull(gift_ref).returncode == 0
        assert log_records(holder, "fetched from peers"), "the holder took the gift from a peer"
        assert holder.pull(ref).returncode == 0  # from the registry: the holder is the only peer with it
        wait_shared(holder, img.digests)

        def pull(node: MirrorNode, delay: float, ended: dict) -> None:
            time.sleep(delay)
            res = node.pull(ref)
            ended[node] = (time.monotonic(), res.returncode, res.stderr.decode())

        ended: dict = {}
        threads = [threading.Thread(target=pull, args=(rider, 0.0, ended)),
                   threading.Thread(target=pull, args=(giver, 0.3, ended))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert ended[rider][1] == 0 and ended[giver][1] == 0, (ended[rider][2], ended[giver][2])
        assert ended[giver][0] < ended[rider][0], "the free rider's pull ended first"
        for node in (giver, rider):  # each layer came from the holder, not the registry
            sources = [r["sources"] for r in log_records(node, "fetched from peers") if r["size"] >= 24 << 20]
            assert len(sources) == 2 and all(set(s) == {holder.peer} for s in sources), sources
    finally:
        for n in nodes:
            n.stop()
