"""Demand: how often the cluster asks for a blob, decaying, and what it earns it."""

from __future__ import annotations

import pytest

from cs_p2p.dht.demand import HALF_LIFE, Demand, extra_replicas


def test_a_steady_rate_reads_as_itself_and_fades_once_it_stops():
    d = Demand()
    t = 0.0
    for _ in range(int(3 * HALF_LIFE)):  # one hit a second, long enough to settle
        d.hit("k", now=t)
        t += 1.0
    assert d.per_minute("k", now=t) == pytest.approx(60, rel=0.15)
    assert d.per_minute("k", now=t + HALF_LIFE) == pytest.approx(30, rel=0.15)
    assert d.per_minute("never asked", now=t) == 0


def test_memory_is_bounded_and_the_coldest_is_forgotten():
    d = Demand(max_keys=2)
    d.hit("warm", 5, now=0)
    d.hit("cold", 1, now=0)
    d.hit("new", 1, now=1)
    assert d.per_minute("cold", now=1) == 0 and d.per_minute("warm", now=1) > 0


def test_blobs_in_demand_earn_holders_beyond_the_floor():
    assert [extra_replicas(r) for r in (0, 5.9, 6, 11.9, 12, 24, 100)] == [0, 0, 1, 1, 2, 3, 5]
