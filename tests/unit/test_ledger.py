"""Fair sharing: who gets a contended upload slot, and what a peer's standing is made of."""

from __future__ import annotations

import asyncio

import pytest

from cs_p2p.peer.ledger import MAX_QUEUE_WAIT, QUEUE_WAIT, REFUSAL_COST, Ledger, UploadSlots, queue_wait


def test_standing_is_what_a_peer_gave_less_its_refusals_and_it_fades():
    ledger = Ledger(half_life=3600)
    ledger.received("giver", 10 << 20)
    ledger.sent("taker", 50 << 20)  # taking earns nothing
    ledger.received("liar", 9 << 20)
    ledger.refused("liar")
    ledger.refused("liar")
    assert ledger.priority("giver") > ledger.priority("liar") > ledger.priority("taker") == 0
    assert ledger.priority("liar") == pytest.approx((9 << 20) - 2 * REFUSAL_COST, rel=1e-3)
    assert ledger.priority("never seen") == 0
    now = [0.0]
    fading = Ledger(half_life=60, clock=lambda: now[0])
    fading.received("giver", 10 << 20)
    now[0] = 600.0  # ten half-lives later
    assert fading.priority("giver") == pytest.approx((10 << 20) / 1024)  # an old favour counts for little


def test_memory_is_bounded():
    ledger = Ledger(max_peers=3)
    for i in range(10):
        ledger.received(f"10.0.0.{i}", i + 1)
    assert len(ledger.snapshot()) == 3


async def test_a_freed_slot_goes_to_the_giver_though_the_taker_waited_longer():
    ledger = Ledger()
    ledger.received("giver", 16 << 20)
    slots = UploadSlots(1, ledger.priority, optimistic_every=3, wait=5)
    assert await slots.acquire("someone")  # the only slot
    order = []

    async def ask(host):
        assert await slots.acquire(host)
        order.append(host)

    taker = asyncio.ensure_future(ask("taker"))
    await asyncio.sleep(0.01)
    giver = asyncio.ensure_future(ask("giver"))
    await asyncio.sleep(0.01)
    slots.release()  # the 2nd grant: by standing
    await asyncio.sleep(0.01)
    assert order == ["giver"]
    slots.release()  # the 3rd: optimistic, the one waiting longest
    await asyncio.gather(taker, giver)
    assert order == ["giver", "taker"]


async def test_a_newcomer_is_still_served_by_the_optimistic_slot():
    ledger = Ledger()
    for h in ("g1", "g2", "g3"):
        ledger.received(h, 16 << 20)
    slots = UploadSlots(1, ledger.priority, optimistic_every=2, wait=5)
    assert await slots.acquire("someone")  # 1st grant
    order = []

    async def ask(host):
        assert await slots.acquire(host)
        order.append(host)
        await asyncio.sleep(0.01)
        slots.release()

    waiting = [asyncio.ensure_future(ask("newcomer"))]
    await asyncio.sleep(0.01)
    waiting += [asyncio.ensure_future(ask(h)) for h in ("g1", "g2", "g3")]
    await asyncio.sleep(0.01)
    slots.release()  # the 2nd grant is optimistic: the newcomer, waiting longest
    await asyncio.gather(*waiting)
    assert order[0] == "newcomer"


async def test_no_slot_in_time_is_a_refusal_and_leaves_nothing_behind():
    slots = UploadSlots(1, lambda h: 0.0, wait=0.05)
    assert await slots.acquire("a")
    assert not await slots.acquire("b")
    slots.release()
    assert slots.in_use == 0 and await slots.acquire("c")


def test_a_request_waits_for_a_slot_as_long_as_a_piece_takes_under_the_rate_limit():
    piece = 4 << 20
    assert queue_wait(0, 16, piece) == QUEUE_WAIT  # no rate limit: slots turn over fast
    # One slot at 4 MiB/s: a piece takes 1 s, a waiter gets two.
    assert queue_wait(4 << 20, 1, piece) == pytest.approx(2.0)
    # Four slots sharing 2 MiB/s: a piece takes 8 s; a waiter waits what a fetcher tolerates.
    assert queue_wait(2 << 20, 4, piece) == MAX_QUEUE_WAIT
    assert queue_wait(8 << 20, 3, piece) == pytest.approx(3.0)
