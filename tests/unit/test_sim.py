"""The simulated cluster (`hack/bench-sim`) at a size a test can afford: it runs the real
protocol on simulated time, finds blobs while nodes come and go, and the floor repairs what
churn takes."""

from __future__ import annotations

import time

from cs_p2p_dev.sim import simulate


def test_a_small_cluster_with_churn_finds_its_blobs_and_repairs_the_floor():
    real_time, real_monotonic = time.time, time.monotonic
    r = simulate(nodes=40, blobs=10, minutes=2, churn=0.1, replicas=3, floor=2, seed=7)
    # real time is back once the simulation ends (the clocks it replaced are restored)
    assert time.time is real_time and time.monotonic is real_monotonic
    assert 110 < r.minutes * 60 < 130  # two simulated minutes, in seconds of CPU
    assert round(r.churn_per_minute * r.minutes) >= 7  # 10 % of 40 nodes a minute: one every 15 s
    assert r.lookup_success >= 0.99 and r.lookup_p99_ms < 50
    assert r.copies > 0  # holders that died were replaced
    assert r.blob_available == 1.0 and r.floor_held >= 0.95
    assert 0 < r.challenge_bytes_per_node_minute <= 16 << 20  # within the proof budget


def test_a_dead_holder_found_by_a_proof_is_replaced_before_the_next_floor_check():
    """The proof that finds a holder gone hands the key to the floor at once: a copy is made
    within a proof round, not a floor interval (here ten minutes)."""
    import asyncio

    from cs_p2p_dev.sim import Simulation, in_simulated_time

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


def test_lookups_do_not_wait_out_the_dead_contacts_churn_leaves_in_routing_tables():
    """Three nodes in five die at once and nobody has noticed yet: every routing table is
    full of dead contacts.  A walk that waited its whole round timeout (0.3 s) for each took
    hundreds of ms; one that waits as long as replies take moves on in tens."""
    import asyncio
    import random

    from cs_p2p_dev.sim import Simulation, in_simulated_time

    async def scenario() -> list[float | None]:
        sim = Simulation(nodes=60, blobs=10, replicas=3, loss=0.0, floor_interval=3600, challenge_interval=3600,
                         seed=5)
        await sim.start()
        rng = random.Random(5)
        for node in rng.sample(sim.live(), 36):
            sim._kill(node)
        results = []
        for _ in range(200):
            digest = rng.choice([d for d in sim.digests if sim.holders(d)])
            asker = rng.choice([n for n in sim.live() if digest not in n.held])
            results.append(await sim.lookup(asker, digest))
            await asyncio.sleep(0.5)
        return results

    results = in_simulated_time(scenario)
    found = sorted(t for t in results if t is not None)
    assert len(found) >= 0.99 * len(results)
    p99 = found[int(0.99 * len(found)) - 1]
    # Three dead contacts in a row cost a wait each (60 ms at 20 ms); a walk waiting 0.3 s for
    # each dead contact had a p99 of 600 ms here.
    assert p99 < 0.15, f"lookup p99 {p99 * 1000:.0f} ms with dead contacts about"


def test_the_floor_holds_under_churn_without_copying_more_than_churn_took():
    """10 % of the nodes replaced a minute, a spare copy kept (replicas 3, floor 2): the nodes
    ranked first to copy a blob learn of a dead holder from the watcher that found it, and
    nodes that joined next to a key are handed its records, so a blob is short for seconds, not
    tens of seconds a place down the ranking, and stale watchers do not copy it again."""
    r = simulate(nodes=60, blobs=20, minutes=4, churn=0.1, replicas=3, floor=2, seed=11, challenge_interval=10)
    assert r.floor_held >= 0.999, f"floor held {r.floor_held:.4%}"
    lost = r.churn_per_minute * r.minutes * 20 * 3 / 60  # holders churn took, on average
    assert r.copies <= 2 * lost, f"{r.copies} copies for about {lost:.0f} holders lost"
