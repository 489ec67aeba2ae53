"""cs-p2p as the content store of a real containerd, pulling from a real registry.

Every test runs containerd 1.6 with the builtin content plugin disabled and cs-p2p as its
`[proxy_plugins]` content store, exactly as packaging/containerd/config.toml wires a node.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import time

import grpc
import pytest

from cs_p2p.api import cri_pb2, cri_pb2_grpc
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import wait_for
from cs_p2p.api import content_pb2 as pb
from tests.conftest import WriteSession, content_stub, requires_containerd

pytestmark = requires_containerd


@pytest.fixture(scope="module")
def image(registry, tmp_path_factory):
    """A 4-layer gzip image of random bytes, pushed to the registry once for the module."""
    img = build_image(str(tmp_path_factory.mktemp("oci")), [3 << 20, 1 << 20, 5 << 20, 64 << 10])
    ref = push_image(img, registry.addr, "cs-p2p/test")
    return img, ref


def layer_file(img, index: int) -> bytes:
    path = os.path.join(img.layout, "blobs", "sha256", img.layer_digests[index].split(":")[1])
    with tarfile.open(path, "r:*") as tar:
        return tar.extractfile(f"layer{index}/data.bin").read()


def assert_unpacked(node, img, ref: str, target: str) -> None:
    """The image was unpacked by the overlayfs snapshotter: every layer's file is really there."""
    os.makedirs(target)
    node.ctr("image", "mount", ref, target)
    try:
        for i in range(len(img.layer_digests)):
            with open(os.path.join(target, f"layer{i}", "data.bin"), "rb") as f:
                assert f.read() == layer_file(img, i)
    finally:
        node.ctr("image", "unmount", "--rm", target)


def registry_bytes(registry, img, digest: str, name: str = "cs-p2p/test") -> bytes:
    """What the registry serves for `digest`: manifests from /manifests/, the rest from /blobs/."""
    import urllib.request

    kind = "manifests" if digest == img.manifest_digest else "blobs"
    req = urllib.request.Request(f"http://{registry.addr}/v2/{name}/{kind}/{digest}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req) as r:
        return r.read()


def test_pull_unpacks_and_blobs_live_in_cs_p2p(node, image, registry, workdir):
    img, ref = image
    node.ctr("image", "pull", "--plain-http", ref)
    # Every blob of the image is in cs-p2p's root, and containerd lists exactly those.
    assert node.cs.blob_digests() == set(img.digests)
    listed = node.ctr("content", "ls", "-q").stdout.decode().split()
    assert set(listed) == set(img.digests)
    # `ctr content get` returns the registry's bytes exactly.
    for digest in img.digests:
        got = node.ctr("content", "get", digest).stdout
        assert hashlib.sha256(got).hexdigest() == digest.split(":")[1]
        assert got == registry_bytes(registry, img, digest)
    assert_unpacked(node, img, ref, os.path.join(workdir, "mnt"))


def test_image_rm_and_gc_remove_blobs_and_unknown_ingests(node, image):
    img, ref = image
    node.ctr("image", "pull", "--plain-http", ref)
    # A stale ingest containerd has no record of (e.g. left over from before containerd's
    # state was reset): containerd's GC lists ingests and aborts the ones it does not know.
    ch, stub = content_stub(node.cs)
    w = WriteSession(stub)
    w.send(action=pb.STAT, ref="default/99/layer-sha256:stale", total=10)
    w.send(action=pb.WRITE, offset=0, data=b"12345")
    w.close()
    ch.close()
    assert len(node.cs.ingest_dirs()) == 1
    node.ctr("image", "rm", "--sync", ref)
    wait_for(lambda: node.cs.blob_digests() == set(), 30, "GC to delete every blob of the image")
    wait_for(lambda: node.cs.ingest_dirs() == [], 30, "GC to abort the unknown ingest")
    assert node.ctr("content", "ls", "-q").stdout.decode().split() == []
    # The store still works after GC: the image pulls again.
    node.ctr("image", "pull", "--plain-http", ref)
    assert node.cs.blob_digests() == set(img.digests)


def test_cri_pull_image_like_kubelet(node, image):
    img, ref = image
    with grpc.insecure_channel("unix:" + node.containerd.socket) as ch:
        cri = cri_pb2_grpc.ImageServiceStub(ch)
        md = [("containerd-namespace", "k8s.io")]
        resp = cri.PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=ref)), timeout=120, metadata=md)
        assert resp.image_ref == img.config_digest  # CRI names an image by its config digest
        status = cri.ImageStatus(cri_pb2.ImageStatusRequest(image=cri_pb2.ImageSpec(image=ref)), timeout=30)
        assert ref in status.image.repo_tags
    assert node.cs.blob_digests() == set(img.digests)
    listed = node.ctr("content", "ls", "-q", namespace="k8s.io").stdout.decode().split()
    assert set(listed) == set(img.digests)


def test_sigkill_mid_ingest_resumes_and_never_commits_corrupt_data(node):
    size = 96 << 20
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    argv = node.containerd.ctr_argv("content", "ingest", "--expected-size", str(size), "--expected-digest", digest,
                                    "big-ingest")
    ctr = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ctr.stdin.write(data[: size // 2])  # half the blob, then the writer waits for more
        ctr.stdin.flush()

        def ingest_offset() -> int:
            dirs = node.cs.ingest_dirs()
            if not dirs:
                return 0
            return os.path.getsize(os.path.join(node.cs.root, "ingest", dirs[0], "data"))

        wait_for(lambda: ingest_offset() >= size // 4, 60, "a quarter of the blob to reach cs-p2p")
        node.cs.kill()  # crash in the middle of the ingest
        ctr.stdin.close()
        assert ctr.wait(60) != 0  # the client sees the failure
    finally:
        if ctr.poll() is None:
            ctr.kill()
    partial = ingest_offset()
    assert 0 < partial < size
    assert node.cs.blob_digests() == set()

    node.cs.start()
    # containerd reconnects to the restarted daemon by itself; ctr resumes the same ref at the
    # offset cs-p2p reports, seeking its (now seekable) input past what is already stored.
    src = os.path.join(node.cs.dir, "blob.bin")
    with open(src, "wb") as f:
        f.write(data)

    def retry():
        with open(src, "rb") as f:
            res = subprocess.run(argv, stdin=f, capture_output=True, timeout=120)
        return res.returncode == 0 or (time.sleep(0.2) and False)

    wait_for(retry, 60, "the retried ingest to succeed")
    assert "ingest resumed" in open(node.cs.proc.log_path).read()
    assert node.cs.blob_digests() == {digest}
    with open(node.cs.blob_path(digest), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest.split(":")[1]
    assert node.cs.ingest_dirs() == []
