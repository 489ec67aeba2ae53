"""Install on a node that already has images, and uninstall, without losing one.

A stock containerd (builtin content store) pulls images and imports one from a tar; `cs-p2p
adopt` takes its blobs; the same containerd restarts with cs-p2p as its store, and with the
registry gone every image is still complete and a container runs.  `cs-p2p release` hands
everything back, and stock containerd again has every image, those pulled through cs-p2p (some
from peers) included.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p_dev.images import build_image, build_image_from_tars, push_image
from cs_p2p_dev.processes import Containerd, CsP2P, Registry, free_port, wait_for
from cs_p2p.store.handover import builtin_blob_dir
from tests.conftest import assert_read_from_peers, content_stub, requires_containerd
from tests.integration.layers import TarBuilder

pytestmark = requires_containerd

BUSYBOX = "/bin/busybox"


def busybox_archive(workdir: str, name: str) -> str:
    """An OCI archive (what `ctr image import` reads) of a runnable busybox image tagged `name`:v1."""
    layer = TarBuilder(os.path.join(workdir, "busybox-layer.tar"))
    layer.dir("bin")
    with open(BUSYBOX, "rb") as f:
        layer.add("bin/busybox", data=f.read(), mode=0o755)
    layer.add("bin/sh", tarfile.SYMTYPE, linkname="busybox")
    layout = os.path.join(workdir, "busybox-oci")
    build_image_from_tars(layout, [(layer.close(), "gzip")], tag=f"{name}:v1", cmd=["/bin/sh"])
    archive = os.path.join(workdir, "busybox.tar")
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(os.listdir(layout)):
            tar.add(os.path.join(layout, entry), arcname=entry)
    return archive


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", *args], capture_output=True, text=True, check=True,
                          timeout=300)


def image_check(node: Containerd) -> dict[str, str]:
    """`ctr image check`: image name -> its status word (complete, incomplete, error...)."""
    out = node.ctr("image", "check").stdout.decode().splitlines()[1:]
    return {line.split()[0]: line.split()[3] for line in out if line.strip()}


def run_busybox(node: Containerd, ref: str) -> str:
    name = "c" + uuid.uuid4().hex[:8]
    return node.ctr("run", "--rm", ref, name, "/bin/busybox", "echo", "ran", timeout=120).stdout.decode().strip()


class Host:
    """One node: its containerd keeps its root across restarts, stock or with cs-p2p."""

    def __init__(self, workdir: str, registry: Registry) -> None:
        self.dir, self.registry = workdir, registry
        self.ctd_dir = os.path.join(workdir, "ctd")
        self.containerd: Containerd | None = None
        self.cs: CsP2P | None = None

    def start_stock(self) -> Containerd:
        self.containerd = Containerd(self.ctd_dir, None, [self.registry.addr]).start()
        return self.containerd

    def start_with_cs_p2p(self, cs_args: list[str]) -> Containerd:
        self.cs = CsP2P(os.path.join(self.dir, "cs"), cs_args).start()
        self.containerd = Containerd(self.ctd_dir, self.cs.socket, [self.registry.addr]).start()
        return self.containerd

    def pull(self, ref: str) -> None:
        assert self.containerd is not None
        self.containerd.ctr(*self.containerd.pull_args(ref))

    def stop(self) -> None:
        if self.containerd:
            self.containerd.stop()
        if self.cs:
            self.cs.stop()


@pytest.fixture
def hosts(workdir, own_registry):
    made: list[Host] = []

    def make(name: str) -> Host:
        h = Host(os.path.join(workdir, name), own_registry)
        made.append(h)
        return h

    yield make
    for h in made:
        h.stop()


def peer_args() -> tuple[list[str], str]:
    dht = f"127.0.0.1:{free_port()}"
    return ["--peer-listen", f"127.0.0.1:{free_port()}", "--dht-listen", dht], dht


def test_install_adopts_every_image_the_node_had(hosts, own_registry, workdir):
    images = [build_image(os.path.join(workdir, f"oci{i}"), [1 << 20, 300_000]) for i in range(2)]
    refs = [push_image(img, own_registry.addr, f"lifecycle/app{i}") for i, img in enumerate(images)]
    host = hosts("a")
    stock = host.start_stock()
    for ref in refs:
        host.pull(ref)
    stock.ctr("image", "import", "--base-name", "localhost/lifecycle/busybox",
              busybox_archive(workdir, "localhost/lifecycle/busybox"))
    imported = "localhost/lifecycle/busybox:v1"
    before = image_check(stock)
    assert set(before) == {*refs, imported} and set(before.values()) == {"complete"}
    # a blob whose bytes do not match its name, as a disk error leaves it
    good = b"the bytes the digest names"
    bad_digest = "sha256:" + hashlib.sha256(good).hexdigest()
    with open(os.path.join(builtin_blob_dir(stock.root), bad_digest.split(":")[1]), "wb") as f:
        f.write(b"other bytes")
    stock.stop()

    cs_root = os.path.join(host.dir, "cs", "root")
    out = cli("adopt", "--containerd-root", stock.root, "--root", cs_root).stdout
    assert f"not adopted, its bytes do not match its digest: {bad_digest}" in out
    again = cli("adopt", "--containerd-root", stock.root, "--root", cs_root).stdout  # idempotent
    assert again.startswith("adopted 0 blobs") and bad_digest in again
    own_registry.stop()

    args, dht = peer_args()
    node = host.start_with_cs_p2p(args)
    assert image_check(node) == before  # every image complete, from cs-p2p's store
    assert run_busybox(node, imported) == "ran"
    ch, stub = content_stub(host.cs)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(pb.InfoRequest(digest=bad_digest))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()
    peer = args[1]
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(f"http://{peer}/blobs/{bad_digest}", timeout=10)
    assert http_err.value.code == 404

    # adopted blobs are announced: another node fetches one from this node
    other_args, _ = peer_args()
    other = CsP2P(os.path.join(workdir, "other"), other_args + ["--bootstrap", dht]).start()
    try:
        layer = images[0].layer_digests[0]
        assert_read_from_peers(other, layer, images[0].blob_bytes(layer))
    finally:
        other.stop()


def test_release_hands_every_image_back_to_stock_containerd(hosts, own_registry, workdir):
    first, from_peers, later = (build_image(os.path.join(workdir, f"oci{i}"), [1 << 20, 200_000]) for i in range(3))
    ref_first = push_image(first, own_registry.addr, "lifecycle/first")
    ref_peers = push_image(from_peers, own_registry.addr, "lifecycle/peers")
    ref_later = push_image(later, own_registry.addr, "lifecycle/later")
    host = hosts("a")
    stock = host.start_stock()
    host.pull(ref_first)
    stock.ctr("image", "import", "--base-name", "localhost/lifecycle/busybox",
              busybox_archive(workdir, "localhost/lifecycle/busybox"))
    stock.stop()
    cs_root = os.path.join(host.dir, "cs", "root")
    cli("adopt", "--containerd-root", stock.root, "--root", cs_root)

    args_b, dht_b = peer_args()
    b = hosts("b")
    b.start_with_cs_p2p(args_b)
    b.pull(ref_peers)
    args_a, _ = peer_args()
    node = host.start_with_cs_p2p(args_a + ["--bootstrap", dht_b])
    host.pull(ref_peers)  # from node b
    assert "fetched from peers" in open(host.cs.proc.log_path).read()
    host.pull(ref_later)  # from the registry, through cs-p2p
    before = image_check(node)
    assert set(before.values()) == {"complete"} and len(before) == 4

    node.stop()
    drop_in = os.path.join(host.dir, "cs-p2p.toml")
    with open(drop_in, "w") as f:
        f.write("# the drop-in the installer wrote\n")
    out = cli("release", "--root", cs_root, "--containerd-root", node.root, "--drop-in", drop_in).stdout
    assert out.startswith("released ") and not os.path.exists(drop_in)
    host.cs.stop()
    b.stop()
    own_registry.stop()

    stock = host.start_stock()  # containerd without cs-p2p: its builtin store again
    assert image_check(stock) == before
    assert run_busybox(stock, "localhost/lifecycle/busybox:v1") == "ran"
    for img in (from_peers, later):
        for digest in img.digests:
            got = stock.ctr("content", "get", digest).stdout
            assert hashlib.sha256(got).hexdigest() == digest.split(":")[1]


def test_the_fragment_works_as_a_drop_in_of_the_nodes_own_config(workdir, registry):
    """As installed: containerd's own config.toml (on 2.3+ migrated to `version = 4`) imports
    conf.d/, where containerd-config's fragment goes; cs-p2p is then the store (and applier)."""
    img = build_image(os.path.join(workdir, "oci"), [1 << 20, 100_000])
    ref = push_image(img, registry.addr, "lifecycle/drop-in")
    cs = CsP2P(os.path.join(workdir, "cs")).start()
    node = Containerd(os.path.join(workdir, "ctd"), cs.socket, [registry.addr], drop_in=True)
    try:
        with open(node.config) as f:
            main = f.read()
        if node.release.v2 and node.release.series not in ("2.0", "2.1", "2.2"):
            assert main.startswith("version = 4")
        node.start()
        node.ctr(*node.pull_args(ref))
        assert cs.blob_digests() == set(img.digests)
        if node.release.applies_layers:
            assert sorted(r["digest"] for r in cs.applied_layers()) == sorted(img.layer_digests)
    finally:
        node.stop()
        cs.stop()


def ingested(cs: CsP2P) -> int:
    """Bytes written to cs-p2p's open ingests."""
    total = 0
    for name in cs.ingest_dirs():
        try:
            total += os.path.getsize(os.path.join(cs.root, "ingest", name, "data"))
        except OSError:
            pass
    return total


def test_while_cs_p2p_is_down_containers_run_and_calls_fail_fast_naming_it(node, registry, workdir):
    """A crash or an upgrade: running containers are untouched, containerd's calls fail within
    seconds with an error naming cs-p2p's socket (never hang), an interrupted pull retried after
    the restart completes."""
    node.ctr("image", "import", "--base-name", "localhost/lifecycle/busybox",
             busybox_archive(workdir, "localhost/lifecycle/busybox"))
    task = "c" + uuid.uuid4().hex[:8]
    node.ctr("run", "-d", "localhost/lifecycle/busybox:v1", task, "/bin/busybox", "sleep", "600", timeout=120)
    waiting = None
    busybox_manifest = next(line.split()[2] for line in node.ctr("image", "ls").stdout.decode().splitlines()
                            if line.startswith("localhost/lifecycle/busybox:v1"))
    try:
        img = build_image(os.path.join(workdir, "oci"), [48 << 20, 48 << 20, 48 << 20], compress=False)
        ref = push_image(img, registry.addr, "lifecycle/interrupted")
        pull = subprocess.Popen(node.containerd.ctr_argv(*node.containerd.pull_args(ref)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: ingested(node.cs) > 4 << 20 or pull.poll() is not None, 60, "the pull to write")
            node.cs.kill()
            killed = time.monotonic()
            pull.communicate(timeout=60)
        finally:
            if pull.poll() is None:
                pull.kill()
        # the pull in flight fails at once (its streams end: containerd says EOF or names the socket)
        assert pull.returncode != 0 and time.monotonic() - killed < 15

        # A pull started while cs-p2p is down fails fast naming its socket, or, where it has to
        # write a blob, waits: containerd retries a writer the store answers UNAVAILABLE for, as
        # for a ref another pull holds (core/content/helpers.go OpenWriter); it goes on below.
        waiting = subprocess.Popen(node.containerd.ctr_argv(*node.containerd.pull_args(ref)),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            waiting.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if waiting.returncode is not None:  # (containerd 1.6's gRPC says "connection closed: unavailable")
            err = waiting.stderr.read().decode()
            assert waiting.returncode != 0 and (node.cs.socket in err or "code = Unavailable" in err), err
        # Calls made while cs-p2p is down fail fast and name its socket.  containerd 1.6's gRPC
        # may first report the connection it saw close ("connection closed: unavailable"); its
        # next dial names the socket.
        for _ in range(3):
            started = time.monotonic()
            res = node.ctr("content", "get", busybox_manifest, check=False, timeout=60)
            err = res.stderr.decode()
            assert res.returncode != 0 and time.monotonic() - started < 10
            if node.cs.socket in err:
                break
            assert "code = Unavailable" in err, err
        else:
            raise AssertionError(f"no error named {node.cs.socket}: {err}")
        started = time.monotonic()
        # images are listed from containerd's metadata; their sizes come with an error naming cs-p2p
        res = node.ctr("image", "ls", check=False, timeout=60)
        assert "localhost/lifecycle/busybox:v1" in res.stdout.decode() and time.monotonic() - started < 20
        assert node.cs.socket in res.stderr.decode()
        # the container did not notice
        assert node.ctr("task", "exec", "--exec-id", "e1", task, "/bin/busybox", "echo", "alive",
                        timeout=60).stdout.decode().strip() == "alive"

        node.cs.start()
        if waiting.returncode is None:  # the waiting pull completes now
            assert waiting.wait(timeout=120) == 0, waiting.stderr.read().decode()
        wait_for(lambda: node.ctr(*node.containerd.pull_args(ref), check=False).returncode == 0, 60,
                 "the retried pull to complete")
        assert node.cs.blob_digests() >= set(img.digests)
        assert "ingest resumed" in open(node.cs.proc.log_path).read()  # what was written was kept
    finally:
        if waiting is not None and waiting.poll() is None:
            waiting.kill()
            waiting.wait()
        node.ctr("task", "kill", "-s", "SIGKILL", task, check=False)
        wait_for(lambda: node.ctr("task", "delete", task, check=False).returncode == 0, 30, "the task to stop")
        node.ctr("container", "delete", task, check=False)
