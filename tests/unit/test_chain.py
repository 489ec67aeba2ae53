"""Whom a node that starts a blob's fetch follows: holders, and of the nodes still fetching it
only the one that started last before it, so that nodes starting together form a chain."""

from __future__ import annotations

import os
import time

from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.fetch.source import may_follow, nearest


def rec(addr: str, started: float = 0.0) -> ProviderRecord:
    return ProviderRecord(os.urandom(20), addr, 100, time.time() + 600, started)


def test_followers_of_nodes_that_start_together_form_a_chain():
    t = 1000.0
    nodes = [rec(f"10.0.0.{i}:7001", t + i) for i in range(8)]  # eight nodes, each a moment later
    holder = rec("10.0.0.99:7001")
    me = os.urandom(20)
    for i in range(1, 8):
        earlier = [r for r in [holder, *nodes] if may_follow(r, 100, t + i - 0.5, me)]
        # a holder, and only the node that started just before: never the first node from all
        assert nearest(earlier) == [holder, nodes[i - 1]]
    assert nearest([holder]) == [holder] and nearest([]) == []
