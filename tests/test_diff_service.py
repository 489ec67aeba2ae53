"""The Diff service on the daemon's socket: what it applies, and the status codes containerd
sees for what it leaves to containerd (UNIMPLEMENTED: the next differ) or refuses."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile

import grpc
import pytest

from cs_p2p.api import diff_pb2 as pb
from cs_p2p.api import diff_pb2_grpc, types_pb2
from cs_p2p_dev import proctree
from cs_p2p_dev.processes import CsP2P, wait_for
from tests.conftest import GRPC_OPTS, commit_via_socket

MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.uid, ti.gid = len(data), os.getuid(), os.getgid()
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def differ(daemon):
    ch = grpc.insecure_channel("unix:" + daemon.socket, options=GRPC_OPTS)
    yield diff_pb2_grpc.DiffStub(ch)
    ch.close()


def apply(differ, digest: str, target: str, media_type: str = MT_GZIP, size: int = 0, **kw) -> pb.ApplyResponse:
    return differ.Apply(pb.ApplyRequest(
        diff=types_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
        mounts=[types_pb2.Mount(type="bind", source=target, options=["rbind", "rw"])], **kw), timeout=60)


def test_apply_extracts_a_stored_layer_into_a_bind_mount_and_returns_its_diff_id(daemon, differ, tmp_path):
    tar = layer_tar({"a/b": b"hello", "c": b"world"})
    digest = commit_via_socket(daemon, gzip.compress(tar))
    resp = apply(differ, digest, str(tmp_path))
    assert resp.applied.digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert resp.applied.size == len(tar)
    assert resp.applied.media_type == "application/vnd.oci.image.layer.v1.tar"
    assert (tmp_path / "a" / "b").read_bytes() == b"hello" and (tmp_path / "c").read_bytes() == b"world"


def test_what_cs_p2p_leaves_to_containerd_is_unimplemented(daemon, differ, tmp_path):
    digest = commit_via_socket(daemon, gzip.compress(layer_tar({"x": b"1"})))
    for kw in ({"media_type": MT_GZIP + "+encrypted"}, {"media_type": "application/octet-stream"}):
        with pytest.raises(grpc.RpcError) as err:
            apply(differ, digest, str(tmp_path), **kw)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    from google.protobuf import any_pb2

    with pytest.raises(grpc.RpcError) as err:
        apply(differ, digest, str(tmp_path), payloads={"io.containerd.ocicrypt.decoder.v1": any_pb2.Any()})
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as err:
        differ.Diff(pb.DiffRequest(media_type=MT_GZIP), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert os.listdir(tmp_path) == []


def test_bad_requests_get_clear_codes_and_write_nothing(daemon, differ, tmp_path):
    missing = "sha256:" + "a" * 64
    for digest, code in ((missing, grpc.StatusCode.NOT_FOUND), ("sha256:XYZ", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            apply(differ, digest, str(tmp_path))
        assert err.value.code() == code
    with pytest.raises(grpc.RpcError) as err:
        differ.Apply(pb.ApplyRequest(diff=types_pb2.Descriptor(media_type=MT_GZIP, digest=missing)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # no mounts
    assert os.listdir(tmp_path) == []


def test_a_broken_layer_is_refused_as_failed_precondition(daemon, differ, tmp_path):
    good = gzip.compress(layer_tar({"f": os.urandom(100_000)}))
    for blob in (good[: len(good) // 2], b"\x1f\x8b\x08" + os.urandom(5000), b"not a tar" * 100):
        digest = commit_via_socket(daemon, blob, ref=hashlib.sha256(blob).hexdigest())
        with pytest.raises(grpc.RpcError) as err:
            apply(differ, digest, str(tmp_path))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, blob[:10]
        assert "invalid layer" in err.value.details()


def test_an_empty_layer_applies_to_nothing(daemon, differ, tmp_path):
    for blob in (b"", gzip.compress(b""), gzip.compress(layer_tar({}))):
        digest = commit_via_socket(daemon, blob, ref=hashlib.sha256(blob).hexdigest())
        resp = apply(differ, digest, str(tmp_path))
        assert resp.applied.size == len(gzip.decompress(blob)) if blob else resp.applied.size == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_mounts_other_than_one_overlay_or_bind_are_mounted_for_the_apply(daemon, differ, tmp_path):
    """Two stacked bind mounts, as containerd's WithTempMount would stack them: the layer
    lands in the top one, and nothing stays mounted."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    tar = layer_tar({"etc/hello": b"hi"})
    digest = commit_via_socket(daemon, gzip.compress(tar))
    resp = differ.Apply(pb.ApplyRequest(
        diff=types_pb2.Descriptor(media_type=MT_GZIP, digest=digest),
        mounts=[types_pb2.Mount(type="bind", source=str(lower), options=["rbind"]),
                types_pb2.Mount(type="bind", source=str(upper), options=["rbind"])]), timeout=60)
    assert resp.applied.digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert (upper / "etc" / "hello").read_bytes() == b"hi" and os.listdir(lower) == []
    with open("/proc/self/mountinfo") as f:
        assert "cs-p2p-apply-" not in f.read()


def apply_workers(cs: CsP2P) -> int:
    """The daemon's apply worker processes (spawned interpreters), running now."""
    assert cs.proc.popen is not None
    count = 0
    for pid in proctree.tree(cs.proc.popen.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += b"spawn_main" in f.read()
        except OSError:
            pass
    return count


def test_apply_workers_start_with_the_daemon_not_at_the_first_layer(workdir):
    """A worker takes ~0.1 s to start (an interpreter and the package's imports): not on the
    first pull's path."""
    cs = CsP2P(os.path.join(workdir, "cs"), ["--apply-workers", "2"]).start()
    try:
        wait_for(lambda: apply_workers(cs) >= 2, 30, "2 apply workers started with the daemon")
    finally:
        cs.stop()


def test_without_prestart_the_first_layer_starts_the_worker_it_needs(workdir, tmp_path):
    """Where containerd applies layers itself (1.6, 1.7) the installer turns prestart off: no
    idle interpreters on those nodes."""
    cs = CsP2P(os.path.join(workdir, "cs"), ["--apply-workers", "2", "--no-apply-prestart"]).start()
    try:
        ch = grpc.insecure_channel("unix:" + cs.socket, options=GRPC_OPTS)
        try:
            tar = layer_tar({"f": b"x"})
            resp = apply(diff_pb2_grpc.DiffStub(ch), commit_via_socket(cs, gzip.compress(tar)), str(tmp_path))
            assert resp.applied.digest == "sha256:" + hashlib.sha256(tar).hexdigest()
        finally:
            ch.close()
        assert apply_workers(cs) == 1  # the one the layer needed, not both
    finally:
        cs.stop()
