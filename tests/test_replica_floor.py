"""The replication floor with real daemons in one DHT: a blob announced in the cluster keeps
`replicas` holders when its last copies are deleted or their node dies, the copies going into
the cache of the nodes closest to the blob's key (never listed to containerd); a blob in demand
gets more, up to `replicas-max`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p_dev.processes import wait_for
from cs_p2p.dht.node import DhtNode
from cs_p2p.dht.providers import provider_key
from tests.conftest import commit_via_socket, content_stub
from tests.integration.test_p2p_pull import holders_of
from tests.test_dht_daemon import daemon, locate

# Short record lifetime and checks, so that a dead holder is noticed within the test.
FLOOR = ["--replicas", "2", "--replica-check-interval", "1", "--dht-ttl", "10"]
CACHE = ["--cache-max-bytes", str(64 << 20)]
NO_CACHE = ["--cache-max-bytes", "0"]


def listed(cs) -> set[str]:
    ch, stub = content_stub(cs)
    try:
        return {i.digest for resp in stub.List(pb.ListContentRequest()) for i in resp.info}
    finally:
        ch.close()


def closest_id_to(digest: str) -> bytes:
    """The node id nearest the blob's DHT key there can be (one bit away)."""
    key = provider_key(digest)
    return key[:-1] + bytes([key[-1] ^ 1])


def test_holders_fall_below_the_floor_and_the_closest_nodes_with_room_copy_the_blob(workdir):
    data = os.urandom(5 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    a, a_peer, a_dht = daemon(workdir, "a", extra=FLOOR + NO_CACHE)  # it never holds copies
    # The node closest to the key has no room either: the next ones must take over.
    full, _, _ = daemon(workdir, "full", a_dht, FLOOR + NO_CACHE)
    os.makedirs(os.path.join(full.root, "dht"))
    with open(os.path.join(full.root, "dht", "node_id"), "w") as f:
        f.write(closest_id_to(digest).hex())
    others = [daemon(workdir, name, a_dht, FLOOR + CACHE)[0] for name in ("b", "c", "d")]
    with contextlib.ExitStack() as stack:
        for cs in (a, full, *others):
            stack.callback(cs.start().stop)
        assert commit_via_socket(a, data) == digest

        # One copy more than containerd's makes two.
        first = wait_for(lambda: [n for n in others if digest in n.cached_digests()], 60, "a first copy")
        assert holders_of(digest, a_dht) == 2
        assert len(first) == 1
        copy = first[0]
        states = {line.split()[1]: line.split()[3] for line in locate(digest, a_dht).splitlines()[1:-1]}
        assert sorted(states.values()) == ["cached", "held"] and states[a_peer] == "held"  # the copy: cached
        assert open(os.path.join(copy.root, "cache", "sha256", digest.split(":")[1]), "rb").read() == data
        assert digest not in listed(copy)  # containerd's GC must not see it

        # containerd on a deletes it (GC): a withdraws, and another node copies it.
        ch, stub = content_stub(a)
        stub.Delete(pb.DeleteContentRequest(digest=digest))
        ch.close()
        second = wait_for(lambda: [n for n in others if n is not copy and digest in n.cached_digests()], 60,
                          "a second copy after the GC")
        assert len(second) == 1
        wait_for(lambda: holders_of(digest, a_dht) == 2, 30, "two holders")

        # The node with the first copy dies: once its record expires, the last node copies it.
        copy.kill()
        last = next(n for n in others if n is not copy and n is not second[0])
        wait_for(lambda: digest in last.cached_digests(), 60, "a copy on the last node")
        assert open(os.path.join(last.root, "cache", "sha256", digest.split(":")[1]), "rb").read() == data
        wait_for(lambda: holders_of(digest, a_dht) == 2, 30, "two live holders")
        assert digest not in full.cached_digests() | full.blob_digests()


def test_a_blob_asked_for_often_gets_more_holders_up_to_the_cap(workdir):
    a, _, a_dht = daemon(workdir, "a", extra=FLOOR + NO_CACHE + ["--replicas-max", "3"])
    others = [daemon(workdir, name, a_dht, FLOOR + CACHE + ["--replicas-max", "3"])[0] for name in "bcde"]
    with contextlib.ExitStack() as stack:
        for cs in (a, *others):
            stack.callback(cs.start().stop)
        digest = commit_via_socket(a, os.urandom(1 << 20))
        wait_for(lambda: holders_of(digest, a_dht) == 2, 60, "the floor's copy")
        assert demand(digest, a_dht) < 6  # the lookups of this test so far: not in demand

        asyncio.run(look_up(digest, a_dht, times=150))  # a rollout's worth of lookups
        assert demand(digest, a_dht) >= 6
        wait_for(lambda: holders_of(digest, a_dht) == 3, 60, "a holder more for a blob in demand")
        asyncio.run(look_up(digest, a_dht, times=600))  # far more: still no more than the cap
        with pytest.raises(TimeoutError):
            wait_for(lambda: holders_of(digest, a_dht) > 3, 8, "a holder over the cap")


def demand(digest: str, via: str) -> float:
    """The lookups a minute `cs-p2p locate` reports for `digest`."""
    return float(locate(digest, via).rsplit("demand ", 1)[1].split()[0])


async def look_up(digest: str, via: str, times: int) -> None:
    """`times` lookups of `digest`, as the nodes of a rollout make them."""
    node = DhtNode(os.urandom(20), "0.0.0.0:0", client=True)
    await node.listen("127.0.0.1", 0)
    try:
        assert await node.bootstrap([via])
        for _ in range(times):
            assert await node.find_providers(digest)
    finally:
        node.stop()
