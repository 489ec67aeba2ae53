"""A peer problem never fails a pull (one `ctr image pull` attempt each, nodes configured as
the README recommends: token membership, so peer transfers run over TLS, and the mirror in
front of the registry).  Providers that fail TLS, refuse connections, reset mid-blob, stall
or send corrupt bytes, every provider killed mid-transfer, nodes pulling a new image at the
same moment: the pull succeeds with the right bytes while the registry is up, and each
node's log says where every blob came from.  With the registry down as well, the pull fails
with a clear error in bounded time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import wait_for
from tests.conftest import requires_containerd
from tests.integration.faults import MODES, FaultyPeer
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import MirrorNode

pytestmark = requires_containerd


@pytest.fixture
def token_file(workdir) -> str:
    path = os.path.join(workdir, "cluster-token")
    with open(path, "w") as f:
        f.write(os.urandom(24).hex() + "\n")
    return path


@pytest.fixture
def make_node(workdir, own_registry, token_file):
    made: list[MirrorNode] = []

    def make(name: str, bootstrap: str | None = None, extra: list[str] | None = None) -> MirrorNode:
        node = MirrorNode(os.path.join(workdir, name), own_registry, bootstrap,
                          ["--cluster-token-file", token_file, *(extra or [])])
        made.append(node)
        return node

    yield make
    for n in made:
        n.stop()


def locate(digest: str, via: str, token_file: str) -> str:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", via,
                           "--cluster-token-file", token_file], capture_output=True, text=True, timeout=60).stdout


def log_records(node: MirrorNode, message: str) -> list[dict]:
    with open(node.cs.proc.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("msg") == message]


def assert_pulled(node: MirrorNode, img, ref: str, workdir: str) -> None:
    assert node.cs.blob_digests() >= set(img.digests)
    for d in img.digests:
        with open(node.cs.blob_path(d), "rb") as f:
            assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == d
    assert_unpacked(node.containerd, img, ref, os.path.join(workdir, f"mnt-{os.urandom(4).hex()}"))


# Two ways a blob is claimed: by what the mirror resolved (cs-p2p fetches it, from peers if
# there are any, `test_claim.py`), and by a provider found in the DHT, where the mirror cannot
# claim (mirror-confirm-ttl 0 keeps no credentials to fetch with).
CLAIMS = {"origin": [], "peers": ["--mirror-confirm-ttl", "0"]}


@pytest.mark.parametrize("claim", CLAIMS)
@pytest.mark.parametrize("mode", MODES)
def test_a_provider_that_fails_does_not_fail_the_pull(mode, claim, make_node, own_registry, token_file, tmp_path,
                                                      workdir):
    img = build_image(str(tmp_path / "oci"), [6 << 20, 5 << 20])
    ref = push_image(img, own_registry.addr, f"faults/{mode}")
    node = make_node("n", extra=CLAIMS[claim])
    blobs = {d: img.blob_bytes(d) for d in [img.config_digest, *img.layer_digests]}
    peer = FaultyPeer(mode, node.dht, token_file, blobs, os.path.join(workdir, "faulty"))
    try:
        for d in blobs:
            wait_for(lambda: peer.addr in locate(d, node.dht, token_file), 30, f"the {mode} peer's record")
        t0 = time.monotonic()
        res = node.pull(ref, timeout=180)
        assert res.returncode == 0, res.stderr.decode()
        seconds = time.monotonic() - t0
    finally:
        peer.stop()
    assert_pulled(node, img, ref, workdir)
    fetched = {r["digest"]: r["sources"] for r in log_records(node, "fetched from peers and the registry")}
    if claim == "origin":
        # Claimed at once; the fetch checked the peer (unreachable, or failing once used) and
        # the registry sent the rest, each blob once.
        assert {r["digest"] for r in log_records(node, "claimed: fetching it here")} == set(blobs)
        assert set(fetched) == set(blobs) and all(src.get("registry", 0) > 0 for src in fetched.values()), fetched
        if mode in ("tls", "refuse"):
            assert all(src == {"registry": len(blobs[d])} for d, src in fetched.items()), fetched
        assert all(own_registry.blob_bytes_served().get(d, 0) <= len(b) for d, b in blobs.items())
    elif mode in ("tls", "refuse"):
        # Never claimed: Info answered NOT_FOUND and containerd downloaded through the mirror.
        unreachable = {r["digest"] for r in log_records(node, "no provider reachable")}
        assert set(blobs) <= unreachable and not fetched
        assert all(own_registry.blob_bytes_served().get(d) == len(b) for d, b in blobs.items())
        assert set(blobs) <= {r["digest"] for r in log_records(node, "blob served") if r["from"] == "registry"}
    else:
        # Claimed from the peer, which then failed: cs-p2p finished the blob from the registry.
        # The failures ban the peer (three in a row), so a blob whose `Info` came after the ban
        # is not claimed from it at all, and containerd downloads it (which of the blobs that
        # is depends on how containerd orders its calls).
        assert fetched and set(fetched) <= set(blobs), f"sources: {fetched}"
        assert all(src.get("registry", 0) > 0 for src in fetched.values())
        unclaimed = set(blobs) - set(fetched)
        assert unclaimed <= {r["digest"] for r in log_records(node, "no provider reachable")}, unclaimed
    print(f"{mode}: pulled in {seconds:.1f} s")


def held_by(nodes: list[MirrorNode], img, ref: str, token_file: str, via: str) -> None:
    for n in nodes:
        assert n.pull(ref).returncode == 0
    for d in img.digests:
        wait_for(lambda: all(n.peer in locate(d, via, token_file) for n in nodes), 30, "every holder's record")


def pull_while(node: MirrorNode, ref: str, img, action) -> subprocess.CompletedProcess:
    """Pull `ref` on `node`; once its config is in and a layer's fetch from peers is under way,
    run `action` (so that what `action` breaks is a layer in transfer)."""
    pull = subprocess.Popen(node.containerd.ctr_argv(*node.containerd.pull_args(ref)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partials = {d.split(":")[1] + ".partial" for d in img.layer_digests}
    try:
        fetch_dir = os.path.join(node.cs.root, "fetch")
        wait_for(lambda: img.config_digest in node.cs.blob_digests() and partials & set(os.listdir(fetch_dir)), 60,
                 "the config, and a layer's fetch from peers")
        action()
        out, err = pull.communicate(timeout=180)
        return subprocess.CompletedProcess(pull.args, pull.returncode, out, err)
    finally:
        if pull.poll() is None:
            pull.kill()


def test_every_provider_killed_mid_transfer_and_the_registry_finishes(make_node, own_registry, token_file,
                                                                     tmp_path, workdir):
    img = build_image(str(tmp_path / "oci"), [24 << 20, 24 << 20])
    ref = push_image(img, own_registry.addr, "faults/killed")
    slow = ["--peer-rate-limit", str(4 << 20)]
    h1 = make_node("h1", None, slow)
    h2 = make_node("h2", h1.dht, slow)
    puller = make_node("p", h1.dht)
    held_by([h1, h2], img, ref, token_file, puller.dht)

    def kill_all() -> None:
        h1.cs.kill()
        h2.cs.kill()

    res = pull_while(puller, ref, img, kill_all)
    assert res.returncode == 0, res.stderr.decode()
    assert_pulled(puller, img, ref, workdir)
    finished = {r["digest"] for r in log_records(puller, "fetched from peers and the registry")}
    assert finished & set(img.layer_digests)  # the layer cut short was finished from the registry


def test_providers_killed_with_the_registry_down_fail_clearly_in_bounded_time(make_node, own_registry, token_file,
                                                                             tmp_path):
    img = build_image(str(tmp_path / "oci"), [24 << 20])
    ref = push_image(img, own_registry.addr, "faults/down")
    holder = make_node("h", None, ["--peer-rate-limit", str(4 << 20)])
    puller = make_node("p", holder.dht)
    held_by([holder], img, ref, token_file, puller.dht)
    own_registry.stop()
    t0 = time.monotonic()
    res = pull_while(puller, ref, img, holder.cs.kill)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 120
    err = res.stderr.decode()
    assert "from peers failed" in err and "registry" in err, err


def test_nodes_pulling_a_new_image_at_once_all_succeed(make_node, own_registry, tmp_path, workdir):
    img = build_image(str(tmp_path / "oci"), [16 << 20, 12 << 20, 8 << 20])
    ref = push_image(img, own_registry.addr, "faults/rollout")
    first = make_node("n1")
    nodes = [first] + [make_node(f"n{i}", first.dht) for i in (2, 3, 4)]
    pulls = [subprocess.Popen(n.containerd.ctr_argv(*n.containerd.pull_args(ref)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in nodes]
    try:
        for p in pulls:
            assert p.wait(180) == 0, p.stderr.read().decode()
    finally:
        for p in pulls:
            if p.poll() is None:
                p.kill()
    for n in nodes:
        assert_pulled(n, img, ref, workdir)
