"""Blobs shared while they are being written (cold, concurrent pulls), with two daemons.

A Write stream whose ref names a digest (`…/layer-sha256:<hex>`, as containerd's downloads
do) is announced at once as an in-flight provider and served to peers as it grows; a node
that starts the same download later follows the earlier one instead of the registry.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import urllib.request

import grpc
import pytest

from cs_p2p.api import content_pb2 as pb
from tests.conftest import WriteSession, commit_via_socket, content_stub, info_size
from tests.test_dht_daemon import locate, pair  # noqa: F401  (fixture)
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import free_port, wait_for

DATA = os.urandom(6 << 20)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
REF = f"default/1/layer-{DIGEST}"
HALF = len(DATA) // 2


@pytest.fixture
def sessions(pair):  # noqa: F811
    """Open Write streams on daemon a or b; all closed at the end."""
    a, _, _, b, _ = pair
    opened = []

    def open_on(cs) -> WriteSession:
        ch, stub = content_stub(cs)
        w = WriteSession(stub)
        opened.append((ch, w))
        return w

    yield open_on
    for ch, w in opened:
        w.close()
        ch.close()


def start_download(w: WriteSession, *, second_stat: bool = True) -> None:
    """What containerd's fetch sends first: STAT with ref and total, then Status()."""
    w.send(action=pb.STAT, ref=REF, total=len(DATA))
    if second_stat:
        assert w.send(action=pb.STAT).offset == 0  # nobody earlier: this node downloads


def half_written(sessions, node, peer_addr: str, dht: str):
    """`node`'s containerd has written half the blob, and a lookup through `dht` sees it in flight."""
    w = sessions(node)
    start_download(w)
    w.send(action=pb.WRITE, offset=0, data=DATA[:HALF])
    wait_for(lambda: peer_addr in locate(DIGEST, dht), 30, "in-flight record")
    return w


def follows(sessions, node, pool, earlier_peer: str, dht: str):
    """`node`'s containerd starts the same download and follows the earlier node (its second
    STAT, answered once the blob is there, runs in `pool`): (that STAT's future, `node`'s peer
    address from its in-flight record)."""
    w = sessions(node)
    w.send(action=pb.STAT, ref=REF, total=len(DATA))
    status = pool.submit(w.send, action=pb.STAT)
    peer = wait_for(lambda: [ln.split()[1] for ln in locate(DIGEST, dht).splitlines()
                             if "in-flight" in ln and earlier_peer not in ln], 30, "the follower's in-flight record")[0]
    return status, peer


def test_ingest_is_announced_and_its_prefix_served_while_written(pair, sessions):  # noqa: F811
    a, a_peer, _, _, b_dht = pair
    w = half_written(sessions, a, a_peer, b_dht)
    out = locate(DIGEST, b_dht)
    assert "in-flight" in out and str(len(DATA)) in out
    with urllib.request.urlopen(f"http://{a_peer}/blobs/{DIGEST}", timeout=30) as r:
        assert r.headers["Content-Length"] == str(len(DATA))
        assert r.read(HALF) == DATA[:HALF]  # served before the rest exists
        w.send(action=pb.WRITE, offset=HALF, data=DATA[HALF:])
        w.send(action=pb.COMMIT, offset=len(DATA), total=len(DATA), expected=DIGEST)
        assert r.read() == DATA[HALF:]
    wait_for(lambda: "held" in locate(DIGEST, b_dht), 30, "the commit to replace the in-flight record")


def test_an_abandoned_ingest_cuts_its_readers_short_and_is_withdrawn(pair, sessions):  # noqa: F811
    a, a_peer, _, _, b_dht = pair
    w = half_written(sessions, a, a_peer, b_dht)
    req = urllib.request.Request(f"http://{a_peer}/blobs/{DIGEST}", headers={"Range": f"bytes=1000-{HALF + 10}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 206
        assert r.read(HALF - 1000) == DATA[1000:HALF]
        w.close()  # containerd went away: the ingest ends without a commit
        with pytest.raises(http.client.IncompleteRead):
            r.read()
    wait_for(lambda: "no provider" in locate(DIGEST, b_dht), 30, "the in-flight record to be withdrawn")


def test_a_later_download_follows_the_earlier_one_instead_of_the_registry(pair, sessions):  # noqa: F811
    a, a_peer, _, b, b_dht = pair
    first = half_written(sessions, a, a_peer, b_dht)
    later = sessions(b)
    later.send(action=pb.STAT, ref=REF, total=len(DATA))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        status = pool.submit(later.send, action=pb.STAT)  # containerd's Status(): waits for the peer
        with pytest.raises(concurrent.futures.TimeoutError):
            status.result(timeout=1.0)  # half the blob exists anywhere: it cannot be complete yet
        first.send(action=pb.WRITE, offset=HALF, data=DATA[HALF:])
        first.send(action=pb.COMMIT, offset=len(DATA), total=len(DATA), expected=DIGEST)
        st = status.result(timeout=60)
    assert (st.offset, st.total, st.digest) == (len(DATA), len(DATA), DIGEST)
    # containerd then commits (rw.offset is still the first STAT's 0) and accepts ALREADY_EXISTS.
    with pytest.raises(grpc.RpcError) as err:
        later.send(action=pb.COMMIT, offset=0, total=len(DATA), expected=DIGEST)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    ch, stub = content_stub(b)
    try:
        assert stub.Info(pb.InfoRequest(digest=DIGEST)).info.size == len(DATA)
        got = b"".join(r.data for r in stub.Read(pb.ReadContentRequest(digest=DIGEST)))
        assert got == DATA
        assert not stub.ListStatuses(pb.ListStatusesRequest()).statuses  # the follower's ingest is gone
    finally:
        ch.close()


def test_a_follower_downloads_itself_when_the_source_fails(pair, sessions):  # noqa: F811
    a, a_peer, _, b, b_dht = pair
    first = half_written(sessions, a, a_peer, b_dht)
    later = sessions(b)
    later.send(action=pb.STAT, ref=REF, total=len(DATA))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        status = pool.submit(later.send, action=pb.STAT)
        with pytest.raises(concurrent.futures.TimeoutError):
            status.result(timeout=1.0)
        first.close()  # the source's containerd gave up
        assert status.result(timeout=60).offset == 0  # so this containerd downloads it itself
    # Nodes that found b's in-flight record while it followed a stream b's own download now.
    b_peer = wait_for(lambda: [ln.split()[1] for ln in locate(DIGEST, b_dht).splitlines()
                               if "in-flight" in ln and a_peer not in ln], 30, "b's in-flight record")[0]
    later.send(action=pb.WRITE, offset=0, data=DATA[:HALF])
    req = urllib.request.Request(f"http://{b_peer}/blobs/{DIGEST}", headers={"Range": f"bytes=0-{HALF - 1}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.read() == DATA[:HALF]
    later.send(action=pb.WRITE, offset=HALF, data=DATA[HALF:])
    assert later.send(action=pb.COMMIT, offset=len(DATA), total=len(DATA), expected=DIGEST).digest == DIGEST


@pytest.fixture
def third(pair, workdir):  # noqa: F811
    from tests.test_dht_daemon import daemon

    c, c_peer, _ = daemon(workdir, "c", bootstrap=pair[2])
    c.start()
    yield c, c_peer
    c.stop()


def test_a_follower_relays_what_it_has_to_nodes_that_started_after_it(pair, third, sessions):  # noqa: F811
    a, a_peer, _, b, b_dht = pair
    c, _ = third
    first = half_written(sessions, a, a_peer, b_dht)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        b_status, b_peer = follows(sessions, b, pool, a_peer, b_dht)
        third_ = sessions(c)
        third_.send(action=pb.STAT, ref=REF, total=len(DATA))
        c_status = pool.submit(third_.send, action=pb.STAT)  # c follows a and b
        first.send(action=pb.WRITE, offset=HALF, data=DATA[HALF:])
        first.send(action=pb.COMMIT, offset=len(DATA), total=len(DATA), expected=DIGEST)
        assert b_status.result(timeout=60).offset == len(DATA)
        assert c_status.result(timeout=60).offset == len(DATA)
    fetched = [ln for ln in open(c.proc.log_path) if "fetched from peers" in ln]
    assert len(fetched) == 1 and b_peer in fetched[0]  # some of c's pieces came through b
    ch, stub = content_stub(c)
    try:
        assert b"".join(r.data for r in stub.Read(pb.ReadContentRequest(digest=DIGEST))) == DATA
    finally:
        ch.close()


def test_a_node_whose_info_finds_only_downloads_in_flight_follows_the_last_to_start(pair, third,
                                                                                    sessions):  # noqa: F811
    """a's containerd downloads the blob, b follows a; c's Info finds both still in flight and
    fetches from b alone (a chain), not from a, whose uplink would then carry it twice."""
    a, a_peer, _, b, b_dht = pair
    c, _ = third
    first = half_written(sessions, a, a_peer, b_dht)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        b_status, b_peer = follows(sessions, b, pool, a_peer, b_dht)
        ch, stub = content_stub(c)
        try:
            assert info_size(stub, DIGEST) == len(DATA)  # claimed: c fetches it
        finally:
            ch.close()
        first.send(action=pb.WRITE, offset=HALF, data=DATA[HALF:])
        first.send(action=pb.COMMIT, offset=len(DATA), total=len(DATA), expected=DIGEST)
        assert b_status.result(timeout=60).offset == len(DATA)

    def fetched() -> list[dict]:
        return [json.loads(line) for line in open(c.proc.log_path) if "fetched from peers" in line]

    wait_for(lambda: DIGEST in c.blob_digests() and fetched(), 60, "c's fetch to commit and be logged")
    assert list(fetched()[-1]["sources"]) == [b_peer]
    assert open(c.blob_path(DIGEST), "rb").read() == DATA


def test_a_fetch_that_info_started_is_relayed_to_nodes_asking_later(p2p_node):
    """Node b's Info starts a fetch from a (slowed by a rate limit); b is announced in flight,
    and node c, asking after it, fetches from a and b instead of from a alone."""
    a, _, a_dht = p2p_node("a", ["--peer-rate-limit", str(2 << 20)])
    b, b_peer, _ = p2p_node("b", [], a_dht)
    c, _, _ = p2p_node("c", [], a_dht)
    data = os.urandom(15 << 20)  # four pieces, eight seconds from a alone
    digest = commit_via_socket(a, data)
    wait_for(lambda: "held" in locate(digest, a_dht), 30, "a's record")
    for node in (b, c):
        ch, stub = content_stub(node)
        try:
            wait_for(lambda: info_size(stub, digest) == len(data), 30, "Info from peers")
        finally:
            ch.close()
        if node is b:
            out = wait_for(lambda: b_peer in locate(digest, a_dht) and locate(digest, a_dht), 30, "b in flight")
            assert "in-flight" in out
    def fetched() -> list[dict]:
        return [json.loads(line) for line in open(c.proc.log_path) if "fetched from peers" in line]

    wait_for(lambda: digest in c.blob_digests() and fetched(), 60, "c's fetch to commit and be logged")
    assert b_peer in fetched()[-1]["sources"]  # part of the blob came from b, which was fetching it too
    assert open(c.blob_path(digest), "rb").read() == data
    wait_for(lambda: (out := locate(digest, a_dht)) and "in-flight" not in out, 30, "b's holder record to replace it")


def test_the_mirror_feeding_a_download_never_follows_a_node_that_started_later(workdir, registry, tmp_path):
    """Node a's containerd downloads a layer through a's mirror; node b started the same download
    later and follows a.  a's mirror must take the layer from the registry, not from b (which
    waits on a): four nodes pulling at once used to wait on each other in a ring."""
    from tests.test_dht_daemon import daemon

    img = build_image(str(tmp_path / "oci"), [3 << 20])
    push_image(img, registry.addr, "inflight/ring")
    layer = img.layer_digests[0]
    data, ref = img.blob_bytes(layer), f"default/1/layer-{layer}"
    mirror = f"127.0.0.1:{free_port()}"
    a, a_peer, a_dht = daemon(workdir, "a", extra=["--mirror-listen", mirror,
                                                   "--mirror-registry", f"http://{registry.addr}"])
    b, _, b_dht = daemon(workdir, "b", bootstrap=a_dht)
    with contextlib.ExitStack() as stack:
        for cs in (a, b):
            stack.callback(cs.start().stop)
        sessions = []
        for cs in (a, b):
            ch, stub = content_stub(cs)
            stack.callback(ch.close)
            sessions.append(WriteSession(stub))
            stack.callback(sessions[-1].close)
        first, later = sessions
        first.send(action=pb.STAT, ref=ref, total=len(data))
        assert first.send(action=pb.STAT).offset == 0  # nobody earlier: a downloads
        wait_for(lambda: a_peer in locate(layer, b_dht), 30, "a's in-flight record")
        later.send(action=pb.STAT, ref=ref, total=len(data))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            b_status = pool.submit(later.send, action=pb.STAT)  # b follows a
            wait_for(lambda: sum("in-flight" in ln for ln in locate(layer, a_dht).splitlines()) == 2, 30,
                     "b's in-flight record")
            # a's containerd now fetches the layer through a's mirror and writes it.
            with urllib.request.urlopen(f"http://{mirror}/v2/inflight/ring/blobs/{layer}?ns={registry.addr}",
                                        timeout=120) as r:
                got = r.read()
            assert got == data
            first.send(action=pb.WRITE, offset=0, data=got)
            first.send(action=pb.COMMIT, offset=len(data), total=len(data), expected=layer)
            assert b_status.result(timeout=60).offset == len(data)
        served = [json.loads(ln) for ln in open(a.proc.log_path) if '"blob served"' in ln]
        assert [r["from"] for r in served] == ["registry"], served
        assert not [ln for ln in open(a.proc.log_path) if "fetched from peers" in ln]
