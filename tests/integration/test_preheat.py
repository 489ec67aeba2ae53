"""Preheat (issue 11, point 4) with real containerd nodes: `cs-p2p preheat REF` brings every
blob of the image into `replicas` nodes' caches before a rollout, with progress and a summary;
the rollout on every node then takes no layer byte from the registry, first pod included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from cs_p2p_dev.images import ARCH, build_multiarch_image, push_image
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_mirror import MirrorNode
from tests.integration.test_p2p_pull import holders_of

pytestmark = requires_containerd

FLOOR = ["--replica-check-interval", "1"]


def preheat(node: MirrorNode, ref: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "preheat", ref, "--mirror", node.mirror, *flags],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cluster(workdir, own_registry):  # noqa: F811
    nodes: list[MirrorNode] = []
    try:
        for i in range(3):
            nodes.append(MirrorNode(os.path.join(workdir, f"n{i}"), own_registry, nodes[0].dht if nodes else None,
                                    FLOOR))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_preheat_then_a_rollout_takes_no_layer_byte_from_the_registry(cluster, own_registry, tmp_path,
                                                                     workdir):  # noqa: F811
    img, index = build_multiarch_image(str(tmp_path / "oci"), [4 << 20, 3 << 20])
    ref = push_image(img, own_registry.addr, "preheat/app")
    n1 = cluster[0]

    res = preheat(n1, ref, "--platform", f"linux/{ARCH}")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{ref} is {index}"
    assert sum(" layer " in line and "registry" in line for line in lines) == 2  # progress, blob by blob
    assert lines[-1].startswith("preheated: 5 blobs") and "every blob has 2 holders" in lines[-1]
    for d in [index, *img.digests]:
        assert holders_of(d, cluster[2].dht) >= 2, d
    # The other platform's manifest and layers were not asked for.
    other = [json.loads(ln) for ln in preheat(n1, ref, "--json").stdout.splitlines()]
    assert [e["from"] for e in other if e["event"] == "blob" and e["digest"] in img.digests] == ["held"] * 4
    assert [e for e in other if e["event"] == "blob" and e["from"] == "registry" and e["kind"] == "layer"]

    before = own_registry.blob_bytes_served()
    for n in cluster:
        res = n.pull(ref)
        assert res.returncode == 0, res.stderr.decode()
    after = own_registry.blob_bytes_served()
    assert {d: after.get(d, 0) for d in img.layer_digests} == {d: before.get(d, 0) for d in img.layer_digests}
    assert_unpacked(cluster[1].containerd, img, ref, os.path.join(workdir, "mnt"))


def test_preheat_says_clearly_what_it_cannot_do(cluster, own_registry):  # noqa: F811
    n1 = cluster[0]
    res = preheat(n1, f"{own_registry.addr}/preheat/missing:v1")
    assert res.returncode == 1 and "error:" in res.stdout and "does not exist" in res.stdout
    res = preheat(n1, "no-registry-part")
    assert res.returncode == 2 and "REGISTRY/REPOSITORY" in res.stderr
    res = preheat(n1, "other.example:5000/app:v1")
    assert res.returncode == 1 and "not mirrored here" in res.stdout
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"http://{n1.mirror}/_cs-p2p/v1/preheat", data=b"{",
                                                      method="POST"), timeout=30)
    assert err.value.code == 400
