"""Pulls in the deployed configuration (the node's mirror in containerd's hosts.toml): cs-p2p
fetches the config and layers of what the mirror resolved itself, from the registry when no
peer has them, and containerd's `Write` path carries none of their bytes.  With a private
registry it uses the credentials the registry accepted (the mirror's own, or containerd's);
where it cannot fetch, containerd downloads as before; a registry failing mid-blob is resumed,
and one that keeps failing fails the pull with its own reason."""

from __future__ import annotations

import json
import os
import tarfile
import uuid

import pytest

from cs_p2p_dev.images import build_image_from_tars, push_image
from cs_p2p_dev.processes import Registry, free_port
from tests.conftest import requires_containerd
from tests.integration.faults import FlakyRegistry
from tests.integration.layers import TarBuilder
from tests.integration.test_mirror import MirrorNode
from tests.integration.test_private_registry import PASSWORD, USER, PrivateMirrorNode
from tests.integration.test_private_registry import private_registry  # noqa: F401  (fixture)

pytestmark = requires_containerd

def runnable_image(workdir: str, extra_mib: int = 3):
    """busybox and a layer of random bytes (several pieces), gzip: an image that runs."""
    base = TarBuilder(os.path.join(workdir, "busybox.tar"))
    base.dir("bin")
    with open("/bin/busybox", "rb") as f:
        base.add("bin/busybox", data=f.read(), mode=0o755)
    base.add("bin/sh", tarfile.SYMTYPE, linkname="busybox")
    data = TarBuilder(os.path.join(workdir, "data.tar"))
    data.add("data.bin", data=os.urandom(extra_mib << 20))
    return build_image_from_tars(os.path.join(workdir, "oci-" + uuid.uuid4().hex[:6]),
                                 [(base.close(), "gzip"), (data.close(), "gzip")], cmd=["/bin/sh"])


def records(node) -> list[dict]:
    with open(node.cs.proc.log_path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def written(node) -> set[str]:
    """Blobs containerd brought in through `Write` (downloaded by containerd itself)."""
    return {r["digest"] for r in records(node) if r.get("msg") == "blob committed"}


def claimed(node) -> set[str]:
    return {r["digest"] for r in records(node) if r.get("msg") == "claimed: fetching it here"}


def run(node, ref: str) -> str:
    name = "c" + uuid.uuid4().hex[:8]
    return node.containerd.ctr("run", "--rm", ref, name, "/bin/busybox", "echo", "ran",
                               timeout=120).stdout.decode().strip()


def test_a_cold_pull_through_the_mirror_leaves_write_unused_for_config_and_layers(workdir, own_registry):
    img = runnable_image(workdir)
    ref = push_image(img, own_registry.addr, "claim/app")
    node = MirrorNode(os.path.join(workdir, "n1"), own_registry, None)
    try:
        out = node.pull(ref)
        assert out.returncode == 0, out.stderr.decode()
        blobs = {img.config_digest, *img.layer_digests}
        assert claimed(node) == blobs  # Info answered from what the mirror resolved
        assert not written(node) & blobs  # no byte of them through containerd's Write
        assert node.cs.blob_digests() >= blobs
        served = own_registry.blob_bytes_served()
        sizes = {d: os.path.getsize(node.cs.blob_path(d)) for d in blobs}
        assert {d: served.get(d) for d in blobs} == sizes  # the registry sent each blob once
        assert run(node, ref) == "ran"
    finally:
        node.stop()


def deployed_private_node(workdir: str, registry: Registry, credentials: str | None, extra: list[str] | None = None,
                          upstream: str | None = None) -> PrivateMirrorNode:
    """A deployed node (DHT, peer server, mirror) in front of a registry that wants Basic auth;
    the mirror has credentials of its own only if `credentials` is set."""
    return PrivateMirrorNode(workdir, registry, credentials, upstream=upstream, extra=[
        "--peer-listen", f"127.0.0.1:{free_port()}", "--dht-listen", f"127.0.0.1:{free_port()}", *(extra or [])])


@pytest.fixture
def make_node(workdir):
    made: list[PrivateMirrorNode] = []

    def make(name: str, *args, **kw) -> PrivateMirrorNode:
        made.append(deployed_private_node(os.path.join(workdir, name), *args, **kw))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def test_a_private_registry_claims_with_the_credentials_the_registry_accepted(workdir, private_registry, make_node):
    img = runnable_image(workdir)
    ref = push_image(img, private_registry.addr, "private/app", creds=f"{USER}:{PASSWORD}")
    blobs = {img.config_digest, *img.layer_digests}

    own = make_node("own", private_registry, f"{USER}:{PASSWORD}")  # the mirror's own credentials-file
    out = own.pull(ref)
    assert out.returncode == 0, out.stderr.decode()
    assert claimed(own) == blobs and not written(own) & blobs

    theirs = make_node("theirs", private_registry, None)  # only containerd has credentials (`ctr --user`)
    out = theirs.pull(ref, "--user", f"{USER}:{PASSWORD}")
    assert out.returncode == 0, out.stderr.decode()
    assert claimed(theirs) == blobs and not written(theirs) & blobs
    assert run(theirs, ref) == "ran"
    with open(theirs.cs.proc.log_path) as f:
        assert PASSWORD not in f.read()  # used for the fetches, never logged

    nobody = make_node("nobody", private_registry, None)  # no credentials anywhere: nothing claimed, nothing served
    assert nobody.pull(ref).returncode != 0
    assert not claimed(nobody) and not nobody.cs.blob_digests() & blobs


def test_where_cs_p2p_cannot_fetch_containerd_downloads_as_before(workdir, own_registry, make_node):
    """Credentials accepted for a repository are kept for mirror-confirm-ttl: with 0 nothing is
    claimed, and containerd downloads every blob through the mirror and `Write`."""
    img = runnable_image(workdir)
    ref = push_image(img, own_registry.addr, "claim/old-path")
    node = make_node("old", own_registry, None, ["--mirror-confirm-ttl", "0"])
    out = node.pull(ref)
    assert out.returncode == 0, out.stderr.decode()
    blobs = {img.config_digest, *img.layer_digests}
    assert not claimed(node) and written(node) >= blobs
    assert run(node, ref) == "ran"


def test_a_registry_breaking_off_mid_blob_after_the_claim_is_resumed(workdir, own_registry, make_node):
    img = runnable_image(workdir, extra_mib=8)
    push_image(img, own_registry.addr, "claim/flaky")
    flaky = FlakyRegistry(own_registry.addr, "cut", cut_after=1 << 20)
    try:
        node = make_node("cut", own_registry, None, upstream=flaky.addr)
        ref = f"{flaky.addr}/claim/flaky:{img.tag}"
        out = node.pull(ref)
        assert out.returncode == 0, out.stderr.decode()
        data_layer = img.layer_digests[-1]
        assert data_layer in flaky.cut and data_layer in claimed(node)
        assert any(r.get("msg") == "registry response broke off: resuming" for r in records(node))
        assert run(node, ref) == "ran"
    finally:
        flaky.stop()


def test_a_registry_failing_after_the_claim_fails_the_pull_with_its_reason(workdir, own_registry, make_node):
    img = runnable_image(workdir)
    push_image(img, own_registry.addr, "claim/failing")
    flaky = FlakyRegistry(own_registry.addr, "fail")
    try:
        node = make_node("fail", own_registry, None, upstream=flaky.addr)
        out = node.pull(f"{flaky.addr}/claim/failing:{img.tag}")
        assert out.returncode != 0
        err = out.stderr.decode()
        assert "answered 500" in err, err  # the registry's reason, not a bare "not found"
    finally:
        flaky.stop()
