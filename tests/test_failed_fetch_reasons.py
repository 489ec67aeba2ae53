"""A fetch from peers that failed before containerd asked again: whichever call containerd
makes next (`Info`, or on 2.x `Apply`), NOT_FOUND says why, so that its error names the cause
and not only "not found"."""

from __future__ import annotations

import gzip
import hashlib
import os

import grpc
import pytest

from cs_p2p.api import content_pb2 as cpb
from cs_p2p.api import content_pb2_grpc, diff_pb2_grpc
from cs_p2p_dev.processes import CsP2P, free_port, wait_for
from tests.conftest import GRPC_OPTS
from tests.integration.faults import FaultyPeer
from tests.integration.test_peer_faults import token_file  # noqa: F401 (a fixture)
from tests.test_diff_service import apply, layer_tar


def test_apply_after_the_fetch_failed_says_why(workdir, token_file, tmp_path):
    dht = f"127.0.0.1:{free_port()}"
    cs = CsP2P(os.path.join(workdir, "d"), ["--peer-listen", f"127.0.0.1:{free_port()}", "--dht-listen", dht,
                                          "--cluster-token-file", token_file, "--replicas", "0"]).start()
    blob = gzip.compress(layer_tar({"f": os.urandom(3 << 20)}))
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    peer = FaultyPeer("reset", dht, token_file, {digest: blob}, str(tmp_path / "peer"))
    ch = grpc.insecure_channel("unix:" + cs.socket, options=GRPC_OPTS)
    try:
        content = content_pb2_grpc.ContentStub(ch)

        def info_code():
            try:
                content.Info(cpb.InfoRequest(digest=digest), timeout=10)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                return err.code(), err.details()

        # Info claims the blob (the peer answers HEAD), the fetch starts and fails (every range reset).
        wait_for(lambda: "fetching it from peers failed" in info_code()[1], 60, "the fetch to fail")
        with pytest.raises(grpc.RpcError) as err:
            target = tmp_path / "target"
            target.mkdir()
            apply(diff_pb2_grpc.DiffStub(ch), digest, str(target), size=len(blob))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "fetching it from peers failed" in err.value.details() and peer.addr in err.value.details()
    finally:
        ch.close()
        peer.stop()
        cs.stop()
