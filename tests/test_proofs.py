"""Proofs of storage with real daemons in one DHT: a holder whose copy went bad or went away
behind the DHT's back is caught by a challenge, its record is dropped, and the replication
floor puts a good copy elsewhere.  A node with a copy judges an answer against it; one without
sets two holders against each other, and when they disagree it fetches a verified copy (the
liar's pieces are caught by the digest) and judges from then on."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from cs_p2p_dev.processes import wait_for
from cs_p2p.status_client import fetch_status
from tests.conftest import commit_via_socket
from tests.test_dht_daemon import daemon

FAST = ["--replicas", "2", "--replica-check-interval", "1", "--challenge-interval", "1"]
NO_CACHE = ["--cache-max-bytes", "0"]


def status_of(cs) -> dict:
    return fetch_status(os.path.join(cs.root, "admin.sock"))


def failed_proofs(cs) -> list[dict]:
    with open(cs.proc.log_path) as f:
        return [r for r in map(json.loads, f) if r.get("msg") == "proof of storage failed: record dropped"]


def key_pair(workdir: str, name: str) -> list[str]:
    """Key-pair membership flags for node `name` (a CA made once per test): answers are signed."""
    ca = os.path.join(workdir, "ca")
    cli = [sys.executable, "-m", "cs_p2p.cli", "ca"]
    if not os.path.exists(ca):
        subprocess.run([*cli, "init", ca], check=True, capture_output=True, timeout=60)
    key, cert = os.path.join(workdir, f"{name}.key"), os.path.join(workdir, f"{name}.crt")
    subprocess.run([*cli, "issue", ca, "--key", key, "--cert", cert], check=True, capture_output=True, timeout=60)
    return ["--node-key-file", key, "--node-cert-file", cert, "--cluster-ca-file", os.path.join(ca, "ca.crt")]


@pytest.mark.parametrize("damage, reason, membership", [
    ("delete", "does not hold the blob", "open"),
    ("corrupt", "wrong answer", "open"),
    ("corrupt", "wrong answer", "key-pair"),
])
def test_a_holder_that_lost_its_copy_is_caught_and_the_floor_copies_the_blob_elsewhere(damage, reason, membership,
                                                                                    workdir):
    def member(name: str) -> list[str]:
        return key_pair(workdir, name) if membership == "key-pair" else []

    a, a_peer, a_dht = daemon(workdir, "a", extra=FAST + NO_CACHE + member("a"))
    b, _, _ = daemon(workdir, "b", a_dht, FAST + member("b"))
    c, _, _ = daemon(workdir, "c", a_dht, FAST + member("c"))
    with contextlib.ExitStack() as stack:
        for cs in (a, b, c):
            stack.callback(cs.start().stop)
        data = os.urandom(3 << 20)
        digest = commit_via_socket(a, data)
        copy = wait_for(lambda: [n for n in (b, c) if digest in n.cached_digests()], 60, "the floor's copy")[0]
        other = c if copy is b else b

        # a's copy goes bad behind the DHT's back: a still announces it.
        if damage == "delete":
            os.unlink(a.blob_path(digest))
        else:
            with open(a.blob_path(digest), "r+b") as f:
                f.write(os.urandom(len(data)))
        judges = (copy, other)
        caught = wait_for(lambda: [r for n in judges for r in failed_proofs(n) if r["addr"] == a_peer], 60,
                          "a failed proof")
        assert {r["reason"] for r in caught} == {reason}
        # only a wrong answer is evidence of cheating: a node that lost a blob is not banned
        bans = [b for n in judges for b in status_of(n)["recent_bans"] if b["addr"] == a_peer]
        assert bool(bans) == (damage == "corrupt"), bans
        assert not [r for n in (b, c) for r in failed_proofs(n) if r["addr"] != a_peer]  # honest nodes pass
        # With a's record dropped the floor sees one holder, and the other node copies the blob.
        wait_for(lambda: digest in other.cached_digests(), 60, "a second good copy")
        with open(os.path.join(other.root, "cache", "sha256", digest.split(":")[1]), "rb") as f:
            assert f.read() == data
