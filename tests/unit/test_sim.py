"""The simulated cluster (`hack/bench-sim`) at a size a test can afford: it runs the real
protocol on simulated time, finds blobs while nodes come and go, and the floor repairs what
churn takes."""

from __future__ import annotations

import time

from cs_p2p.devcluster.sim import simulate


def test_a_small_cluster_with_churn_finds_its_blobs_and_repairs_the_floor():
    t0 = time.time()
    r = simulate(nodes=40, blobs=10, minutes=2, churn=0.1, replicas=3, floor=2, seed=7)
    assert time.time() >= t0  # real time is back once the simulation ends
    assert 110 < r.minutes * 60 < 130  # two simulated minutes, in seconds of CPU
    assert r.churn_per_minute >= 3.5  # 10 % of 40 nodes a minute were replaced
    assert r.lookup_success >= 0.99 and r.lookup_p99_ms < 50
    assert r.copies > 0  # holders that died were replaced
    assert r.blob_available == 1.0 and r.floor_held >= 0.95
    assert 0 < r.challenge_bytes_per_node_minute <= 16 << 20  # within the proof budget


def test_a_dead_holder_found_by_a_proof_is_replaced_before_the_next_floor_check():
    """The proof that finds a holder gone hands the key to the floor at once: a copy is made
    within a proof round, not a floor interval (here ten minutes)."""
    import asyncio

    from cs_p2p.devcluster.sim import Simulation, in_simulated_time

    async def scenario() -> float:
        sim = Simulation(nodes=30, blobs=4, replicas=2, loss=0.0, floor_interval=600, challenge_interval=10, seed=3)
        await sim.start()
        loop = asyncio.get_running_loop()
        digest = sim.digests[0]
        sim._kill(next(n for n in sim.live() if digest in n.held))
        t0 = loop.time()
        while sim.holders(digest) < 2 and loop.time() - t0 < 300:
            await asyncio.sleep(1)
        return loop.time() - t0

    took = in_simulated_time(scenario)
    assert took < 60, f"the floor held again after {took:.0f} simulated seconds"
