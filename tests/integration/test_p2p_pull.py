"""Three real containerd + cs-p2p nodes: after one pull from the registry, the others pull
the same image from peers and the registry serves them no blob bytes at all."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from cs_p2p.addresses import join_host_port
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import free_port, wait_for
from cs_p2p_dev.releases import release
from tests.conftest import Node, requires_containerd
from tests.integration.test_containerd import assert_unpacked

pytestmark = requires_containerd


class P2PNode(Node):
    """A node with its peer transfer server and DHT node on free loopback ports."""

    def __init__(self, workdir: str, name: str, registry, bootstrap: str | None, extra: list[str] | None = None,
                 ip: str = "127.0.0.1") -> None:
        self.peer = join_host_port(ip, free_port())
        self.dht = join_host_port(ip, free_port())
        args = ["--peer-listen", self.peer, "--dht-listen", self.dht] + (["--bootstrap", bootstrap] if bootstrap else [])
        super().__init__(os.path.join(workdir, name), registry, args + (extra or []))


@pytest.fixture
def cluster(workdir, registry, loopback):
    """Three nodes; node 1 uploads at 8 MiB/s, so a transfer from it lasts long enough to cut,
    and keeps no cache, so that containerd's GC there withdraws what it deletes.  Node 3, the
    puller the tests watch, keeps no cache either: with one, the replication floor may pick it
    to copy a blob held once, and its pull would then find the blob already there."""
    nodes: list[P2PNode] = []
    no_cache = ["--cache-max-bytes", "0"]
    try:
        first = P2PNode(workdir, "n1", registry, None, ["--peer-rate-limit", str(8 << 20), *no_cache], loopback)
        nodes.append(first)
        nodes.append(P2PNode(workdir, "n2", registry, first.dht, ip=loopback))
        nodes.append(P2PNode(workdir, "n3", registry, first.dht, no_cache, loopback))
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _locate(digest: str, via: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", via],
                          capture_output=True, text=True, timeout=60)


def providers_of(digest: str, via: str) -> str:
    """What `cs-p2p locate` prints for `digest`, asking through the DHT node at `via`."""
    return _locate(digest, via).stdout


def holders_of(digest: str, via: str) -> int:
    """Holders `cs-p2p locate` lists: containerd's copies and cached ones (not in-flight)."""
    return sum(" held " in line or " cached " in line for line in providers_of(digest, via).splitlines())


def located(digest: str, via: str) -> bool:
    return _locate(digest, via).returncode == 0


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
        assert_unpacked(node, img, ref, os.path.join(workdir, f"mnt-{node.dht.rsplit(':', 1)[1]}"))
    # Not one more blob byte left the registry: config and layers came from peers.
    assert registry.blob_bytes_served() == from_registry
    logs = open(n2.cs.proc.log_path).read() + open(n3.cs.proc.log_path).read()
    assert logs.count("fetched from peers") >= 2 * (1 + len(img.layer_digests))
    if release().applies_layers:
        # containerd 2.x: cs-p2p applied node 2's layers from its own files, at least one as its
        # pieces came in from peers (node 1 uploads at 8 MiB/s); which one depends on when
        # containerd asks (2.0 applies one layer after another, 2.2+ several at once), as a
        # layer fetched from containerd's Info on may be complete by its Apply
        records = {r["digest"]: r["from"] for r in n2.cs.applied_layers()}
        assert sorted(records) == sorted(img.layer_digests)
        assert set(records.values()) <= {"peers", "local"} and "peers" in records.values(), records
    # Node 3's timeline says where its pull's time went: each layer claimed through Info, fetched
    # from node 1 or 2 (first and last byte of each), and the waits by reason.
    events = json.loads(subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", n3.cs.root,
                                        "--timeline", "600", "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    claimed = {e["digest"] for e in events if e["kind"] == "info_claimed"}
    fetched = {e["digest"]: e["sources"] for e in events if e["kind"] == "fetch_done"}
    assert set(img.layer_digests) <= claimed and set(img.layer_digests) <= set(fetched)
    for sources in fetched.values():
        assert set(sources) <= {n1.peer, n2.peer} and all(first <= last for first, last, _ in sources.values())
    text = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", n3.cs.root, "--timeline", "600"],
                          capture_output=True, text=True, check=True).stdout
    assert "fetch_done" in text and "waits by reason:" in text


def held_by_two_nodes(cluster, registry, tmp_path, name: str, sizes: list[int]):
    """An image pulled by node 1 (from the registry), then by node 2: both provide it to node 3."""
    img = build_image(str(tmp_path / "oci"), sizes)
    ref = push_image(img, registry.addr, name)
    n1, n2, n3 = cluster
    n1.ctr("image", "pull", "--plain-http", ref)
    for d in img.digests:
        wait_for(lambda: located(d, n3.dht), 30, f"{d} to be announced by node 1")
    n2.ctr("image", "pull", "--plain-http", ref)
    for d in img.layer_digests:
        wait_for(lambda: n1.peer in providers_of(d, n3.dht) and n2.peer in providers_of(d, n3.dht), 30,
                 "both providers")
    return img, ref


def test_a_provider_killed_mid_transfer_does_not_fail_the_pull(cluster, registry, tmp_path):
    img, ref = held_by_two_nodes(cluster, registry, tmp_path, "p2p/fault", [24 << 20, 24 << 20])
    n1, n2, n3 = cluster
    served_before = registry.blob_bytes_served()

    pull = subprocess.Popen(n3.containerd.ctr_argv("image", "pull", "--plain-http", ref),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        fetch_dir = os.path.join(n3.cs.root, "fetch")
        wait_for(lambda: any(n.endswith(".partial") for n in os.listdir(fetch_dir)), 60, "node 3 to start fetching")
        n1.cs.kill()  # a provider dies in the middle of serving pieces
        assert pull.wait(120) == 0, pull.stderr.read()
    finally:
        if pull.poll() is None:
            pull.kill()
    assert n3.cs.blob_digests() == set(img.digests)
    assert registry.blob_bytes_served() == served_before  # completed from node 2, not the registry


class LyingPeer:
    """A DHT node announcing blobs it serves corrupted (one flipped byte per range), run on
    its own event loop in a thread beside the real nodes."""

    def __init__(self, bootstrap: str, blobs: dict[str, bytes]) -> None:
        import asyncio
        import threading

        self.blobs = blobs
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(bootstrap,), daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "lying peer did not start"

    def _run(self, bootstrap: str) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start(bootstrap))
        self.ready.set()
        self.loop.run_forever()

    async def _start(self, bootstrap: str) -> None:
        from aiohttp import web

        from cs_p2p.dht.node import DhtNode

        async def handler(request):
            data = self.blobs[request.match_info["digest"]]
            rng = request.http_range
            start, stop = rng.start or 0, len(data) if rng.stop is None else rng.stop
            body = bytearray(data[start:stop])
            body[0] ^= 0xFF
            return web.Response(body=bytes(body), status=206)

        app = web.Application()
        app.router.add_get("/blobs/{digest}", handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.addr = f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        self.dht = DhtNode(os.urandom(20), self.addr)
        await self.dht.listen("127.0.0.1", 0)
        await self.dht.bootstrap([bootstrap])
        for digest, data in self.blobs.items():
            await self.dht.announce(digest, len(data))

    def stop(self) -> None:
        import asyncio

        async def shutdown():
            self.dht.stop()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_peer_serving_corrupt_bytes_is_detected_and_the_pull_completes(cluster, registry, tmp_path):
    img = build_image(str(tmp_path / "oci"), [5 << 20, 3 << 20])
    ref = push_image(img, registry.addr, "p2p/liar")
    n1, _, n3 = cluster
    n1.ctr("image", "pull", "--plain-http", ref)
    blobs = {d: img.blob_bytes(d) for d in [img.config_digest, *img.layer_digests]}
    liar = LyingPeer(n1.dht, blobs)
    try:
        for d in blobs:
            wait_for(lambda: liar.addr in providers_of(d, n3.dht), 30, "the liar's announcement")
        served_before = registry.blob_bytes_served()
        n3.ctr("image", "pull", "--plain-http", ref)
    finally:
        liar.stop()
    assert n3.cs.blob_digests() == set(img.digests)
    for d in img.digests:  # what was committed is the real blob
        with open(n3.cs.blob_path(d), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == d.split(":")[1]
    assert registry.blob_bytes_served() == served_before
    log = open(n3.cs.proc.log_path).read()
    assert "provider sent corrupt data: banned" in log and liar.addr in log


def test_gc_on_a_node_withdraws_its_records_and_others_stop_asking_it(cluster, registry, tmp_path):
    img, ref = held_by_two_nodes(cluster, registry, tmp_path, "p2p/gc", [2 << 20, 1 << 20])
    n1, n2, n3 = cluster

    def providers(digest: str) -> str:
        return providers_of(digest, n3.dht)

    n1.ctr("image", "rm", "--sync", ref)  # containerd GC deletes the blobs through cs-p2p
    wait_for(lambda: n1.cs.blob_digests() == set(), 30, "GC on node 1")
    for d in img.digests:
        wait_for(lambda: (out := providers(d)) and n1.peer not in out, 30, "node 1's records to be withdrawn")
    served_before = registry.blob_bytes_served()
    n3.ctr("image", "pull", "--plain-http", ref)
    assert registry.blob_bytes_served() == served_before
    log = open(n3.cs.proc.log_path).read()
    assert n2.peer in log and n1.peer not in log  # every piece came from node 2


def test_nodes_pulling_at_once_get_each_blob_from_the_registry_about_once(cluster, registry, tmp_path, workdir):
    """A rollout: every node pulls the same new image at the same moment and nobody holds it.
    Each blob is downloaded by one node; the others follow its in-flight download."""
    img = build_image(str(tmp_path / "oci"), [16 << 20, 12 << 20, 8 << 20])
    ref = push_image(img, registry.addr, "p2p/rollout")
    blobs = [img.config_digest, *img.layer_digests]
    sizes = {d: len(img.blob_bytes(d)) for d in blobs}
    before = registry.blob_bytes_served()
    pulls = [subprocess.Popen(n.containerd.ctr_argv("image", "pull", "--plain-http", ref),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in cluster]
    try:
        for p in pulls:
            assert p.wait(180) == 0, p.stderr.read()
    finally:
        for p in pulls:
            if p.poll() is None:
                p.kill()
    served = registry.blob_bytes_served()
    sent = {d: served.get(d, 0) - before.get(d, 0) for d in blobs}
    assert sent == sizes, "the registry sent a blob to more than one of the 3 nodes"
    for node in cluster:
        assert node.cs.blob_digests() == set(img.digests)
        assert_unpacked(node, img, ref, os.path.join(workdir, f"mnt-at-once-{node.dht.rsplit(':', 1)[1]}"))
    logs = "".join(open(n.cs.proc.log_path).read() for n in cluster)
    assert logs.count("fetched from peers") == 2 * len(img.digests)  # the other two nodes, every blob
