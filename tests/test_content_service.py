"""containerd's content API semantics, spoken to a real cs-p2p daemon over its unix socket.

Each case is what containerd (or ctr) would notice: the status code it gets for bad input,
and that the store is left intact afterwards.
"""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest
from google.protobuf import field_mask_pb2

from cs_p2p.api import content_pb2 as pb
from tests.conftest import WriteSession, content_stub


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def code_of(fn, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        res = fn(*args, **kw)
        if hasattr(res, "__iter__") and not isinstance(res, (bytes, str)):
            list(res)
    return exc.value.code()


def commit_blob(writes, data: bytes, ref: str = "r", labels: dict[str, str] | None = None) -> str:
    w = writes()
    w.send(action=pb.STAT, ref=ref, total=len(data))
    w.send(action=pb.WRITE, offset=0, data=data)
    resp = w.send(action=pb.COMMIT, offset=len(data), total=len(data), expected=sha(data), labels=labels or {})
    assert resp.digest == sha(data)
    return resp.digest


def read_all(stub, digest: str, offset: int = 0, size: int = 0) -> bytes:
    return b"".join(r.data for r in stub.Read(pb.ReadContentRequest(digest=digest, offset=offset, size=size)))


# --- Write -----------------------------------------------------------------------------------------


def test_first_write_message_without_ref_is_invalid(writes):
    w = writes()
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.STAT, total=3)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_stat_reports_offset_total_times_and_digest_so_far(writes):
    w = writes()
    first = w.send(action=pb.STAT, ref="default/1/layer-x", total=10)
    assert first.offset == 0 and first.total == 10 and first.started_at.seconds > 0
    w.send(action=pb.WRITE, offset=0, data=b"hello")
    st = w.send(action=pb.STAT)
    assert st.offset == 5 and st.total == 10
    assert st.digest == sha(b"hello")
    assert st.updated_at.ToNanoseconds() >= st.started_at.ToNanoseconds()


def test_second_writer_on_a_ref_is_unavailable_until_the_first_ends(stub, writes):
    w1 = writes()
    w1.send(action=pb.STAT, ref="locked")
    w2 = writes()
    with pytest.raises(grpc.RpcError) as exc:
        w2.send(action=pb.STAT, ref="locked")
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    w1.close()
    # The lock goes with the stream: a new writer resumes.
    for _ in range(100):
        try:
            assert writes().send(action=pb.STAT, ref="locked").offset == 0
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
    else:
        pytest.fail("lock never released")


def test_write_away_from_current_offset_is_out_of_range_and_keeps_data(stub, writes):
    w = writes()
    w.send(action=pb.STAT, ref="oor")
    w.send(action=pb.WRITE, offset=0, data=b"abc")
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.WRITE, offset=7, data=b"zzz")
    assert exc.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert stub.Status(pb.StatusRequest(ref="oor")).status.offset == 3


def test_commit_at_wrong_offset_is_out_of_range(writes):
    w = writes()
    w.send(action=pb.STAT, ref="c-oor")
    w.send(action=pb.WRITE, offset=0, data=b"abc")
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.COMMIT, offset=2, expected=sha(b"abc"))
    assert exc.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_write_at_offset_zero_truncates_a_non_empty_ingest(writes):
    w = writes()
    w.send(action=pb.STAT, ref="trunc")
    w.send(action=pb.WRITE, offset=0, data=b"garbage-garbage")
    resp = w.send(action=pb.WRITE, offset=0, data=b"good")
    assert resp.offset == 4 and resp.digest == sha(b"good")
    resp = w.send(action=pb.COMMIT, offset=4, expected=sha(b"good"))
    assert resp.digest == sha(b"good") and resp.offset == 4


def test_commit_size_mismatch_fails_precondition_and_keeps_the_ingest(stub, writes):
    w = writes()
    w.send(action=pb.STAT, ref="size")
    w.send(action=pb.WRITE, offset=0, data=b"12345")
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.COMMIT, offset=5, total=6, expected=sha(b"12345"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert stub.Status(pb.StatusRequest(ref="size")).status.offset == 5
    assert code_of(stub.Info, pb.InfoRequest(digest=sha(b"12345"))) == grpc.StatusCode.NOT_FOUND


def test_commit_digest_mismatch_fails_precondition_and_commits_nothing(stub, writes, daemon):
    w = writes()
    w.send(action=pb.STAT, ref="bad-digest")
    w.send(action=pb.WRITE, offset=0, data=b"corrupt")
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.COMMIT, offset=7, expected=sha(b"correct"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert daemon.blob_digests() == set()


def test_expected_digest_that_exists_is_already_exists(stub, writes, daemon):
    digest = commit_blob(writes, b"present")
    w = writes()
    with pytest.raises(grpc.RpcError) as exc:
        w.send(action=pb.STAT, ref="again", expected=digest)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    w2 = writes()
    w2.send(action=pb.STAT, ref="again2")
    w2.send(action=pb.WRITE, offset=0, data=b"present")
    with pytest.raises(grpc.RpcError) as exc:
        w2.send(action=pb.COMMIT, offset=7, expected=digest)
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert read_all(stub, digest) == b"present"


def test_commit_without_expected_digest_uses_the_computed_one(stub, writes):
    w = writes()
    w.send(action=pb.STAT, ref="push")
    w.send(action=pb.WRITE, offset=0, data=b"pushed")
    resp = w.send(action=pb.COMMIT, offset=6)
    assert resp.digest == sha(b"pushed")
    assert stub.Info(pb.InfoRequest(digest=sha(b"pushed"))).info.size == 6


def test_commit_labels_are_kept(stub, writes):
    digest = commit_blob(writes, b"labelled", labels={"a": "1"})
    assert dict(stub.Info(pb.InfoRequest(digest=digest)).info.labels) == {"a": "1"}


def test_messages_up_to_16_mib_are_accepted(stub, writes):
    data = os.urandom(12 << 20)
    digest = commit_blob(writes, data, ref="big")
    got = list(stub.Read(pb.ReadContentRequest(digest=digest)))
    assert b"".join(r.data for r in got) == data
    assert max(len(r.data) for r in got) == 1 << 20  # streamed in 1 MiB messages


# --- Read ------------------------------------------------------------------------------------------


def test_read_offsets_and_sizes_follow_containerd(stub, writes):
    data = bytes(range(256)) * 20
    digest = commit_blob(writes, data)
    assert read_all(stub, digest, offset=-5) == data
    assert read_all(stub, digest, offset=100, size=10) == data[100:110]
    assert read_all(stub, digest, offset=100, size=0) == data[100:]
    assert read_all(stub, digest, offset=len(data) - 3, size=100) == data[-3:]
    assert read_all(stub, digest, offset=len(data)) == b""
    assert code_of(stub.Read, pb.ReadContentRequest(digest=digest, offset=len(data) + 1)) == grpc.StatusCode.OUT_OF_RANGE


def test_read_reports_offsets_of_each_message(stub, writes):
    data = os.urandom((2 << 20) + 5)
    digest = commit_blob(writes, data)
    offsets = [r.offset for r in stub.Read(pb.ReadContentRequest(digest=digest, offset=3))]
    assert offsets == [3, 3 + (1 << 20), 3 + (2 << 20)]


# --- Info / Update / Delete / errors ---------------------------------------------------------------


def test_unknown_and_malformed_digests(stub):
    unknown = sha(b"nobody has this")
    for call, req in [
        (stub.Info, pb.InfoRequest(digest=unknown)),
        (stub.Delete, pb.DeleteContentRequest(digest=unknown)),
        (stub.Read, pb.ReadContentRequest(digest=unknown)),
    ]:
        assert code_of(call, req) == grpc.StatusCode.NOT_FOUND
    for bad in ["", "sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "sha256:../../etc/passwd", "sha512:" + "0" * 128]:
        assert code_of(stub.Info, pb.InfoRequest(digest=bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert code_of(stub.Read, pb.ReadContentRequest(digest=bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert code_of(stub.Delete, pb.DeleteContentRequest(digest=bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_unknown_refs_are_not_found_and_escaping_refs_invalid(stub, writes, daemon):
    assert code_of(stub.Status, pb.StatusRequest(ref="nope")) == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.Abort, pb.AbortRequest(ref="nope")) == grpc.StatusCode.NOT_FOUND
    for bad in ["../../../etc", "/abs/path", "a/../../b", "a\x00b", "x" * 5000]:
        assert code_of(stub.Status, pb.StatusRequest(ref=bad)) == grpc.StatusCode.INVALID_ARGUMENT
        w = writes()
        with pytest.raises(grpc.RpcError) as exc:
            w.send(action=pb.STAT, ref=bad)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.ingest_dirs() == []


def test_update_merges_one_label_replaces_all_or_refuses(stub, writes):
    digest = commit_blob(writes, b"upd", labels={"keep": "1", "drop": "2"})

    def update(labels, *paths):
        return stub.Update(pb.UpdateRequest(info=pb.Info(digest=digest, labels=labels),
                                            update_mask=field_mask_pb2.FieldMask(paths=list(paths)))).info

    info = update({"new": "3"}, "labels.new")
    assert dict(info.labels) == {"keep": "1", "drop": "2", "new": "3"}
    info = update({}, "labels.drop")  # an empty value removes the label
    assert dict(info.labels) == {"keep": "1", "new": "3"}
    assert info.updated_at.ToNanoseconds() >= info.created_at.ToNanoseconds()
    info = update({"only": "x"}, "labels")
    assert dict(info.labels) == {"only": "x"}
    with pytest.raises(grpc.RpcError) as exc:
        update({}, "size")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(stub.Info(pb.InfoRequest(digest=digest)).info.labels) == {"only": "x"}
    assert code_of(stub.Update, pb.UpdateRequest(info=pb.Info(digest=sha(b"none")))) == grpc.StatusCode.NOT_FOUND


def test_delete_removes_the_blob_from_containerds_view(stub, writes, daemon):
    digest = commit_blob(writes, b"to delete")
    stub.Delete(pb.DeleteContentRequest(digest=digest))
    assert daemon.blob_digests() == set()
    assert not [i for resp in stub.List(pb.ListContentRequest()) for i in resp.info]
    assert code_of(stub.Delete, pb.DeleteContentRequest(digest=digest)) == grpc.StatusCode.NOT_FOUND
    # The default cache keeps it for the cluster; asked for again, it is handed back.
    assert daemon.cached_digests() == {digest}
    assert stub.Info(pb.InfoRequest(digest=digest)).info.size == len(b"to delete")


# --- List / ListStatuses filters --------------------------------------------------------------------


def test_list_honours_containerd_filters(stub, writes):
    a = commit_blob(writes, b"a", ref="ra", labels={"containerd.io/gc.root": "x", "team": "blue"})
    b = commit_blob(writes, b"b", ref="rb", labels={"team": "red"})
    c = commit_blob(writes, b"c", ref="rc")

    def ls(*filters):
        return {i.digest for r in stub.List(pb.ListContentRequest(filters=list(filters))) for i in r.info}

    assert ls() == {a, b, c}
    assert ls(f"digest=={b}") == {b}
    assert ls('labels."containerd.io/gc.root"==x') == {a}
    assert ls("labels.team~=^(r|b)") == {a, b}
    assert ls("labels.team~=/^bl/") == {a}
    assert ls("labels.team") == {a, b}
    assert ls("labels.team!=red") == {a, c}
    assert ls(f"labels.team==blue,digest=={a}") == {a}
    assert ls(f"labels.team==blue,digest=={b}") == set()
    assert ls(f"digest=={b}", f"digest=={c}") == {b, c}  # repeated filters are OR
    assert code_of(stub.List, pb.ListContentRequest(filters=["labels.team=="])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(stub.List, pb.ListContentRequest(filters=["labels.x~=("])) == grpc.StatusCode.INVALID_ARGUMENT


def test_list_returns_only_committed_blobs(stub, writes):
    digest = commit_blob(writes, b"done")
    w = writes()
    w.send(action=pb.STAT, ref="in-flight")
    w.send(action=pb.WRITE, offset=0, data=b"partial")
    listed = [i.digest for r in stub.List(pb.ListContentRequest()) for i in r.info]
    assert listed == [digest]


def test_list_statuses_by_ref_and_abort(stub, writes, daemon):
    for ref in ("default/1/layer-sha256:aa", "default/2/config-sha256:bb", "other/3/layer-sha256:cc"):
        w = writes()
        w.send(action=pb.STAT, ref=ref, total=10)
        w.send(action=pb.WRITE, offset=0, data=b"12")
        w.close()

    def refs(*filters):
        return {s.ref for s in stub.ListStatuses(pb.ListStatusesRequest(filters=list(filters))).statuses}

    assert refs() == {"default/1/layer-sha256:aa", "default/2/config-sha256:bb", "other/3/layer-sha256:cc"}
    assert refs('ref~="^default/"') == {"default/1/layer-sha256:aa", "default/2/config-sha256:bb"}
    assert refs("ref==other/3/layer-sha256:cc") == {"other/3/layer-sha256:cc"}
    st = stub.Status(pb.StatusRequest(ref="default/1/layer-sha256:aa")).status
    assert (st.offset, st.total) == (2, 10)
    stub.Abort(pb.AbortRequest(ref="default/1/layer-sha256:aa"))
    assert refs() == {"default/2/config-sha256:bb", "other/3/layer-sha256:cc"}
    assert len(daemon.ingest_dirs()) == 2


# --- Restart -----------------------------------------------------------------------------------------


def test_sigterm_keeps_ingests_resumable_and_metadata_persisted(daemon, writes):
    ch, stub = content_stub(daemon)
    digest = commit_blob(writes, b"persisted", labels={"k": "v"})
    before = stub.Info(pb.InfoRequest(digest=digest)).info
    w = writes()
    w.send(action=pb.STAT, ref="resume-me", total=8)
    w.send(action=pb.WRITE, offset=0, data=b"half")
    assert daemon.stop() == 0  # SIGTERM with the writer still open: a clean exit
    ch.close()
    daemon.start()
    ch, stub = content_stub(daemon)
    try:
        after = stub.Info(pb.InfoRequest(digest=digest)).info
        assert after == before
        w = WriteSession(stub)
        st = w.send(action=pb.STAT, ref="resume-me", total=8)
        assert st.offset == 4 and st.digest == sha(b"half") and st.total == 8
        w.send(action=pb.WRITE, offset=4, data=b"done")
        assert w.send(action=pb.COMMIT, offset=8, total=8, expected=sha(b"halfdone")).digest == sha(b"halfdone")
        w.close()
    finally:
        ch.close()



def test_undecodable_messages_are_invalid_argument(daemon, stub):
    ch = grpc.insecure_channel("unix:" + daemon.socket)
    try:
        info = ch.unary_unary("/containerd.services.content.v1.Content/Info")
        with pytest.raises(grpc.RpcError) as exc:
            info(b"\x0a\xff\xff")  # a string field longer than the message
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        write = ch.stream_stream("/containerd.services.content.v1.Content/Write")
        first = pb.WriteContentRequest(action=pb.STAT, ref="ok").SerializeToString()
        with pytest.raises(grpc.RpcError) as exc:
            list(write(iter([first, b"\x32\x09short"])))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ch.close()
    assert stub.Status(pb.StatusRequest(ref="ok")).status.offset == 0  # the daemon carries on


def test_logs_are_json_lines_with_event_fields(daemon, writes):
    import json

    digest = commit_blob(writes, b"logged", ref="log-ref")
    records = [json.loads(line) for line in open(daemon.proc.log_path) if line.strip()]
    assert records[0]["msg"] == "serving" and records[0]["socket"] == daemon.socket
    committed = [r for r in records if r["msg"] == "blob committed"]
    assert committed and committed[-1]["digest"] == digest and committed[-1]["ref"] == "log-ref"
    assert all({"time", "level", "logger", "msg"} <= r.keys() for r in records)
