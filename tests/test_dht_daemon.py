"""Two cs-p2p daemons in one DHT: announce on commit, locate, fetch, withdraw, restart."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import urllib.request

import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p_dev.processes import CsP2P, free_port, wait_for
from tests.conftest import commit_via_socket, content_stub


def daemon(workdir: str, name: str, bootstrap: str | None = None, extra: list[str] | None = None
           ) -> tuple[CsP2P, str, str]:
    peer, dht = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    args = ["--peer-listen", peer, "--dht-listen", dht, *(extra or [])]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    return CsP2P(os.path.join(workdir, name), args), peer, dht


def locate(digest: str, via: str) -> str:
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", via],
                         capture_output=True, text=True, timeout=60)
    return res.stdout


@pytest.fixture
def pair(workdir):
    a, a_peer, a_dht = daemon(workdir, "a")
    b, _, b_dht = daemon(workdir, "b", bootstrap=a_dht)
    started = [a.start(), b.start()]
    yield a, a_peer, a_dht, b, b_dht
    for cs in started:
        cs.stop()


def test_commit_is_announced_located_fetched_and_withdrawn_on_delete(workdir):
    # Node a keeps no cache: with one, a deleted blob stays announced (tests/test_replica_floor.py).
    a, a_peer, a_dht = daemon(workdir, "a", extra=["--cache-max-bytes", "0"])
    b, _, b_dht = daemon(workdir, "b", bootstrap=a_dht)
    with contextlib.ExitStack() as stack:
        for cs in (a, b):
            stack.callback(cs.start().stop)
        data = os.urandom(300_000)
        digest = commit_via_socket(a, data)
        out = wait_for(lambda: a_peer in locate(digest, b_dht) and locate(digest, b_dht), 30, "provider record")
        assert str(len(data)) in out
        with urllib.request.urlopen(f"http://{a_peer}/blobs/{digest}", timeout=10) as r:
            assert r.read() == data
        ch, stub = content_stub(a)
        stub.Delete(pb.DeleteContentRequest(digest=digest))
        ch.close()
        # (b may hold a copy by now: the replication floor)
        wait_for(lambda: (out := locate(digest, b_dht)) and a_peer not in out, 30, "the record to be withdrawn")


def test_restart_keeps_node_id_and_reannounces_held_blobs(pair, workdir):
    a, a_peer, a_dht, b, b_dht = pair
    digest = commit_via_socket(a, os.urandom(1000))
    wait_for(lambda: a_peer in locate(digest, b_dht), 30, "first announce")
    node_id = open(os.path.join(a.root, "dht", "node_id")).read()
    # Both restart with nothing in memory: only a start-up announce can bring the record back.
    a.stop()
    b.stop()
    b.start()
    a.start()
    assert open(os.path.join(a.root, "dht", "node_id")).read() == node_id
    out = wait_for(lambda: a_peer in locate(digest, b_dht) and locate(digest, b_dht), 30, "re-announce")
    assert node_id in out


def test_peers_lists_the_nodes_of_the_network(pair):
    a, _, a_dht, b, b_dht = pair
    ids = {open(os.path.join(cs.root, "dht", "node_id")).read() for cs in (a, b)}

    def listed() -> str:
        res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "peers", "--bootstrap", a_dht],
                             capture_output=True, text=True, timeout=60)
        return res.stdout if res.returncode == 0 and all(i in res.stdout for i in ids) else ""

    out = wait_for(listed, 30, "both daemons to be listed")
    assert b_dht in out and a_dht in out
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "peers", "--bootstrap", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no DHT node answered" in res.stderr
