"""What an operator sees of two real containerd + cs-p2p nodes during a peer-to-peer pull:
Prometheus metrics scraped from `--metrics-listen`, checked against the bytes that really
moved, and `cs-p2p status` from the admin socket."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request

import grpc
import pytest

from cs_p2p.api import content_pb2 as cpb
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import free_port, wait_for
from tests.conftest import content_stub, requires_containerd
from tests.integration.test_p2p_pull import P2PNode, located

pytestmark = requires_containerd

_SAMPLE = re.compile(r'^(\w+)(?:\{([^}]*)\})? (\S+)$')


def scrape(addr: str) -> dict[tuple[str, frozenset], float]:
    """`/metrics` as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            samples[(m.group(1), labels)] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum over every series of `name` that has `labels` (and any others)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def status(node: P2PNode, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", node.cs.root, *flags],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def pair(workdir, registry):
    nodes: list[P2PNode] = []
    try:
        metrics = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        first = P2PNode(workdir, "m1", registry, None, ["--metrics-listen", metrics[0], "--replicas", "0"])
        first.metrics = metrics[0]
        nodes.append(first)
        second = P2PNode(workdir, "m2", registry, first.dht, ["--metrics-listen", metrics[1], "--replicas", "0"])
        second.metrics = metrics[1]
        nodes.append(second)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_metrics_account_a_peer_to_peer_pull_byte_for_byte(pair, registry, tmp_path):
    n1, n2 = pair
    img = build_image(str(tmp_path / "oci"), [5 << 20, 3 << 20])
    ref = push_image(img, registry.addr, "ops/metrics")
    sizes = {d: len(img.blob_bytes(d)) for d in img.digests}
    before = scrape(n2.metrics)

    n1.ctr("image", "pull", "--plain-http", ref)
    for d in [img.config_digest, *img.layer_digests]:
        wait_for(lambda: located(d, n2.dht), 30, f"{d} to be announced")
    served_before = registry.blob_bytes_served()
    n2.ctr("image", "pull", "--plain-http", ref)
    assert registry.blob_bytes_served() == served_before  # node 2's blobs came from node 1

    m1, m2 = scrape(n1.metrics), scrape(n2.metrics)
    fetched = {s: value(m2, "cs_p2p_fetched_bytes_total", source=s) - value(before, "cs_p2p_fetched_bytes_total", source=s)
               for s in ("peer", "inflight_peer", "registry")}
    from_peers = fetched["peer"] + fetched["inflight_peer"]
    # Every blob node 2 holds came either from node 1 (fetched) or through containerd's own
    # download (the manifest, resolved at the registry): byte for byte.
    held = {d: os.path.getsize(n2.cs.blob_path(d)) for d in n2.cs.blob_digests()}
    assert set(held) == set(img.digests)
    assert from_peers + value(m2, "cs_p2p_written_bytes_total") == sum(held.values())
    assert from_peers >= sizes[img.config_digest] + sum(sizes[d] for d in img.layer_digests)
    assert fetched["registry"] == 0
    # ... and node 1 uploaded exactly what node 2 fetched; node 1 got everything from the registry.
    assert value(m1, "cs_p2p_uploaded_bytes_total") == from_peers
    assert value(m1, "cs_p2p_written_bytes_total") == sum(sizes.values())
    assert value(m1, "cs_p2p_fetched_bytes_total", source="peer") == 0

    started = value(m2, "cs_p2p_fetches_started_total")
    assert started >= 1 + len(img.layer_digests)
    assert value(m2, "cs_p2p_fetches_total", result="completed") == started
    assert value(m2, "cs_p2p_fetches_total", result="failed") == 0
    assert value(m2, "cs_p2p_info_seconds_count", result="peers") >= 1 + len(img.layer_digests)
    assert total(m2, "cs_p2p_dht_lookup_seconds_count", result="found") >= 1
    assert value(m2, "cs_p2p_grpc_calls_total", method="Info", code="OK") >= len(img.digests)
    # A call that fails is counted under the status containerd got.
    ch, stub = content_stub(n2.cs)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(cpb.InfoRequest(digest="sha256:" + "0" * 64), timeout=30)
    finally:
        ch.close()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert value(scrape(n2.metrics), "cs_p2p_grpc_calls_total", method="Info", code="NOT_FOUND") == \
        value(m2, "cs_p2p_grpc_calls_total", method="Info", code="NOT_FOUND") + 1
    assert value(m2, "cs_p2p_disk_bytes", kind="blobs") == sum(held.values())
    assert value(m2, "cs_p2p_blobs", where="containerd") == len(held)
    assert value(m2, "cs_p2p_peers_known") == 1
    assert value(m2, "cs_p2p_ingests_open") == 0
    assert value(m2, "cs_p2p_fetches_inflight") == 0


def test_status_shows_the_node_its_peers_blobs_and_where_a_pull_came_from(pair, registry, tmp_path):
    n1, n2 = pair
    img = build_image(str(tmp_path / "oci"), [2 << 20])
    ref = push_image(img, registry.addr, "ops/status")
    n1.ctr("image", "pull", "--plain-http", ref)
    for d in [img.config_digest, *img.layer_digests]:
        wait_for(lambda: located(d, n2.dht), 30, f"{d} to be announced")
    n2.ctr("image", "pull", "--plain-http", ref)

    out = status(n2, "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["membership"] == "open" and len(st["node_id"]) == 40
    assert st["peers"] == [n1.dht]
    assert st["blobs"] == {"count": len(img.digests),
                           "bytes": sum(os.path.getsize(n2.cs.blob_path(d)) for d in img.digests)}
    layer = img.layer_digests[0]
    pulled = [f for f in st["recent_fetches"] if f["digest"] == layer]
    assert pulled and pulled[0]["result"] == "completed"
    assert pulled[0]["sources"] == {n1.peer: os.path.getsize(n2.cs.blob_path(layer))}
    assert st["fetches"] == [] and st["recent_bans"] == []

    table = status(n2)
    assert table.returncode == 0, table.stderr
    assert f"peers      1: {n1.dht}" in table.stdout
    assert f"blobs      {len(img.digests)} held for containerd" in table.stdout
    assert re.search(rf"{layer[:19]}\s+2\.0 MiB\s+completed\s+.*{re.escape(n1.peer)} 2\.0 MiB", table.stdout)

    n2.cs.stop()
    gone = status(n2)
    assert gone.returncode == 2 and "no daemon answered" in gone.stderr
