"""A holder of thousands of blobs dies: the watchers' floor must not start a fetch for each
at once (eight connections and a full-size file apiece), past the cache's budget and the
node's file descriptors.  Copies are bounded in number, and in bytes by the budget, checked
before a fetch starts; the rest follow in later rounds (issue: hardening, item 5)."""

from __future__ import annotations

import asyncio
import os
import time

from cs_p2p.dht.node import DhtNode
from cs_p2p.dht.providers import ProviderRecord, provider_key
from cs_p2p.placement.floor import MAX_CONCURRENT_COPIES, ReplicaFloor
from cs_p2p.store import LocalStore


class Stalled:
    """A replicator whose fetches never end (the burst's fetches, all under way)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def replicate(self, digest: str, size: int = 0):
        self.started.append(digest)
        await self.release.wait()
        return None


def short_blobs(node: DhtNode, count: int, size: int) -> None:
    """`count` blobs this node watches, each down to one holder (the other died)."""
    for i in range(count):
        digest = "sha256:" + f"{i:064x}"
        key = provider_key(digest)
        node.protocol.digests[key] = digest
        node.protocol.providers.add(key, ProviderRecord(os.urandom(20), "127.0.0.1:1", size, time.time() + 600))


async def test_a_burst_of_short_blobs_starts_a_bounded_number_of_copies_within_the_budget(tmp_path):
    node = DhtNode(os.urandom(20), "127.0.0.1:1")
    await node.listen("127.0.0.1", 0)
    replicator = Stalled()
    try:
        store = LocalStore(str(tmp_path), cache_max_bytes=10 << 20)
        floor = ReplicaFloor(node, store, replicator, replicas=2, interval=1)
        short_blobs(node, 2000, 3 << 20)
        started = floor.check()
        await asyncio.sleep(0)
        # bounded in number, and three 3 MiB copies fill the 10 MiB budget before the fourth
        assert len(started) == len(replicator.started) == min(MAX_CONCURRENT_COPIES, 3)
        assert floor.check() == []  # nothing more while those are under way
        replicator.release.set()
        for _ in range(100):
            if not floor._replicating:
                break
            await asyncio.sleep(0.01)
        assert len(floor.check()) == 3  # the next ones, in the next round
    finally:
        replicator.release.set()
        node.stop()
