"""cs-p2p as containerd 2.x's layer applier, against containerd's own applier.

The same images are pulled by a stock containerd (builtin content store, its own walking
differ) and by a containerd whose content store and applier are cs-p2p — the same
containerd binary — and the snapshots they leave are compared entry by entry.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import uuid

import grpc
import pytest

from cs_p2p.api import cri_pb2, cri_pb2_grpc
from cs_p2p_dev.images import build_image, build_image_from_tars, push_image
from cs_p2p_dev import proctree
from cs_p2p_dev.processes import Containerd, CsP2P, wait_for
from cs_p2p_dev.releases import release
from tests.conftest import HAVE_CONTAINERD, requires_containerd
from tests.integration.layers import TarBuilder, describe_tree, snapshot_dirs, tricky_layers

pytestmark = [
    requires_containerd,
    pytest.mark.skipif(not HAVE_CONTAINERD or not release().applies_layers,
                       reason="proxy diff plugins need containerd 2.x"),
]


class Pair:
    """Two containerd of one release: stock (builtin store and applier) and cs-p2p's."""

    def __init__(self, workdir: str, registry, unpacks: int | None = None) -> None:
        self.stock = Containerd(os.path.join(workdir, "stock"), None, [registry.addr],
                                max_concurrent_unpacks=unpacks).start()
        self.cs = CsP2P(os.path.join(workdir, "cs")).start()
        self.node = Containerd(os.path.join(workdir, "node"), self.cs.socket, [registry.addr],
                               max_concurrent_unpacks=unpacks).start()

    def stop(self) -> None:
        self.node.stop()
        self.cs.stop()
        self.stock.stop()


@pytest.fixture
def pair(workdir, registry, request):
    p = Pair(workdir, registry, getattr(request, "param", None))
    yield p
    p.stop()


@pytest.fixture(scope="module")
def tricky(registry, tmp_path_factory):
    d = tmp_path_factory.mktemp("tricky")
    img = build_image_from_tars(str(d / "oci"), tricky_layers(str(d / "tars")),
                                cmd=["/bin/busybox", "cat", "/etc/conf"])
    return img, push_image(img, registry.addr, "applier/tricky")


def assert_same_snapshots(stock: Containerd, node: Containerd, layers: int) -> None:
    theirs, ours = snapshot_dirs(stock.root), snapshot_dirs(node.root)
    assert len(theirs) == len(ours) == layers
    for i, (a, b) in enumerate(zip(theirs, ours)):
        want, got = describe_tree(a), describe_tree(b)
        assert sorted(got) == sorted(want), f"layer {i}: different paths"
        for path in want:
            assert got[path] == want[path], f"layer {i}: {path}"


@pytest.mark.parametrize("pair", [1, 2], indirect=True, ids=["sequential", "parallel"])
def test_layers_applied_by_cs_p2p_are_the_trees_containerd_makes(pair, tricky):
    img, ref = tricky
    pair.stock.ctr(*pair.stock.pull_args(ref))
    pair.node.ctr(*pair.node.pull_args(ref))
    records = pair.cs.applied_layers()
    assert sorted(r["digest"] for r in records) == sorted(img.layer_digests)  # each layer by cs-p2p, once
    assert_same_snapshots(pair.stock, pair.node, len(img.layer_digests))
    # overlay whiteouts and the opaque marker are really there (not only equal on both sides)
    top = snapshot_dirs(pair.node.root)[1]
    assert os.stat(os.path.join(top, "gone-file")).st_rdev == 0
    assert os.getxattr(os.path.join(top, "opaque"), "trusted.overlay.opaque") == b"y"


def test_a_container_runs_from_an_image_cs_p2p_applied(pair, tricky):
    img, ref = tricky
    pair.node.ctr(*pair.node.pull_args(ref))
    name = "c" + uuid.uuid4().hex[:8]
    out = pair.node.ctr("run", "--rm", ref, name, "/bin/busybox", "sh", "-c",
                        "cat /etc/conf; ls /opaque; test -e /gone-file || echo no-gone; cat /lowerattr/new; echo; "
                        "stat -c %a /usr/bin/suid", timeout=120).stdout.decode()
    assert out.split() == ["upper", "config", "new", "no-gone", "9", "4755"]


def test_ctr_local_pull_and_cri_pull_use_the_applier_too(pair, tricky, registry):
    img, ref = tricky
    pair.node.ctr("image", "pull", "--local", "--plain-http", ref)
    assert len(pair.cs.applied_layers()) == len(img.layer_digests)
    other = build_image(os.path.join(pair.cs.dir, "oci"), [1 << 20, 2 << 20])
    other_ref = push_image(other, registry.addr, "applier/cri")
    with grpc.insecure_channel("unix:" + pair.node.socket) as ch:
        cri = cri_pb2_grpc.ImageServiceStub(ch)
        cri.PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=other_ref)), timeout=120,
                      metadata=[("containerd-namespace", "k8s.io")])
    assert {r["digest"] for r in pair.cs.applied_layers()} >= set(other.layer_digests)


def test_a_layer_that_tries_to_escape_writes_nothing_outside_the_snapshot(pair, registry, workdir):
    tag = uuid.uuid4().hex[:8]
    names = [f"csp-escape-{kind}-{tag}" for kind in ("dotdot", "abs", "sym", "symrel", "hard")]
    t = TarBuilder(os.path.join(workdir, "escape.tar"))
    t.add(f"../../../../../../tmp/{names[0]}", data=b"x")
    t.add(f"/tmp/{names[1]}", data=b"x")
    t.add("lnk", tarfile.SYMTYPE, linkname="/tmp")
    t.add(f"lnk/{names[2]}", data=b"x")
    t.add("up", tarfile.SYMTYPE, linkname="../../../../../../../../tmp")
    t.add(f"up/{names[3]}", data=b"x")
    t.add(f"tmp/{names[4]}", tarfile.LNKTYPE, linkname="../../../../../../etc/hostname")
    img = build_image_from_tars(os.path.join(workdir, "oci"), [(t.close(), "gzip")])
    ref = push_image(img, registry.addr, "applier/escape")
    res = pair.node.ctr(*pair.node.pull_args(ref), check=False)
    stock = pair.stock.ctr(*pair.stock.pull_args(ref), check=False)
    for name in names:
        assert not os.path.exists(f"/tmp/{name}"), name
    # containerd's own applier refuses the hard link to a file that is not in the layer; so does ours
    assert (res.returncode != 0) == (stock.returncode != 0)
    assert res.returncode != 0 and b"failed to extract layer" in res.stderr


def test_escapes_without_a_hard_link_land_inside_the_snapshot(pair, registry, workdir):
    tag = uuid.uuid4().hex[:8]
    t = TarBuilder(os.path.join(workdir, "escape.tar"))
    t.dir("tmp")
    t.add(f"../../../../../../tmp/dotdot-{tag}", data=b"x")
    t.add(f"/tmp/abs-{tag}", data=b"x")
    t.add("lnk", tarfile.SYMTYPE, linkname="/tmp")
    t.add(f"lnk/sym-{tag}", data=b"x")
    img = build_image_from_tars(os.path.join(workdir, "oci"), [(t.close(), "gzip")])
    ref = push_image(img, registry.addr, "applier/escape2")
    pair.node.ctr(*pair.node.pull_args(ref))
    pair.stock.ctr(*pair.stock.pull_args(ref))
    for kind in ("dotdot", "abs", "sym"):
        assert not os.path.exists(f"/tmp/{kind}-{tag}")
    (fs,) = snapshot_dirs(pair.node.root)
    assert sorted(os.listdir(os.path.join(fs, "tmp"))) == sorted(f"{k}-{tag}" for k in ("abs", "dotdot", "sym"))
    assert_same_snapshots(pair.stock, pair.node, 1)


def test_a_layer_whose_diff_id_does_not_match_fails_the_pull_and_commits_no_snapshot(pair, registry, workdir):
    t = TarBuilder(os.path.join(workdir, "l.tar"))
    t.add("file", data=b"content")
    img = build_image_from_tars(os.path.join(workdir, "oci"), [(t.close(), "gzip")], diff_ids=["sha256:" + "0" * 64])
    ref = push_image(img, registry.addr, "applier/liar")
    res = pair.node.ctr(*pair.node.pull_args(ref), check=False)
    assert res.returncode != 0 and b"wrong diff id" in res.stderr
    kinds = [line.split()[-1] for line in pair.node.ctr("snapshot", "ls").stdout.decode().splitlines()[1:]]
    assert "Committed" not in kinds


def test_cs_p2p_killed_mid_apply_fails_that_pull_and_the_next_pull_succeeds(pair, registry, workdir):
    t = TarBuilder(os.path.join(workdir, "many.tar"))
    for i in range(30000):
        t.add(f"d{i % 50}/f{i}", data=b"%d" % i)
    img = build_image_from_tars(os.path.join(workdir, "oci"), [(t.close(), "gzip")])
    ref = push_image(img, registry.addr, "applier/kill")
    pull = subprocess.Popen(pair.node.ctr_argv(*pair.node.pull_args(ref)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(os.path.isdir(os.path.join(fs, "d0")) for fs in snapshot_dirs(pair.node.root)), 120,
                 "the layer to be half applied")
        processes = proctree.tree(pair.cs.proc.popen.pid)
        assert len(processes) > 1  # the daemon and its apply worker(s)
        pair.cs.kill()
        assert pull.wait(120) != 0
        # no worker goes on writing into a snapshot nobody waits for
        wait_for(lambda: not any(proctree.alive(p) for p in processes), 30, "the apply workers to die with the daemon")
    finally:
        if pull.poll() is None:
            pull.kill()
    pair.cs.start()
    wait_for(lambda: pair.node.ctr(*pair.node.pull_args(ref), check=False).returncode == 0, 120,
             "the next pull to succeed")
    pair.stock.ctr(*pair.stock.pull_args(ref))
    kinds = [line.split()[-1] for line in pair.node.ctr("snapshot", "ls").stdout.decode().splitlines()[1:]]
    assert kinds == ["Committed"]  # the half-applied snapshot was discarded
    fs = [d for d in snapshot_dirs(pair.node.root) if os.path.isdir(d)][-1]
    assert describe_tree(fs) == describe_tree(snapshot_dirs(pair.stock.root)[0])
