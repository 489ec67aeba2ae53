"""Purges through a real Kademlia network of in-process nodes (`purges`, `DhtNode.purge`): every
node learns one at once, a node that was away learns it when it joins, records of purged
digests are refused and not announced again, and in key-pair mode only a member's signed purge
counts."""

from __future__ import annotations

import time

import pytest

from cs_p2p.dht.node import DhtNode
from cs_p2p.dht.providers import provider_key
from cs_p2p.dht.tags import tag_key
from cs_p2p.identity import KeySealer
from cs_p2p.purges import PurgeList, PurgeRecord
from tests.test_identity import MANIFEST, member
from tests.test_peer_server import wait_until

D1, D2 = "sha256:" + "11" * 32, "sha256:" + "22" * 32
REF = "r.example/app:v1"


@pytest.fixture
async def purging(dht_nodes, tmp_path):
    """`make(sealer, bootstrap, node_id)` -> a DHT node that keeps purges in a list of its own."""
    async def make(sealer=None, bootstrap=None, node_id=None) -> DhtNode:
        node = await dht_nodes(sealer, bootstrap, node_id)
        node.keep_purges(PurgeList(str(tmp_path / f"purges-{node.port}.jsonl")))
        return node

    return make


async def test_a_purge_reaches_every_node_and_its_records_are_gone_for_good(purging):
    first = await purging()
    nodes = [first] + [await purging(bootstrap=first) for _ in range(4)]
    for n in nodes[1:]:
        await n.bootstrap([f"127.0.0.1:{nodes[-1].port}"])
    for n in nodes[1:4]:
        await n.announce(D1, 10)
        await n.announce(D2, 10)
    await nodes[1].publish_tag(REF, D1, MANIFEST, 10)
    assert len(await nodes[4].find_providers(D1)) == 3

    _, told = await nodes[0].purge(REF, [D1])
    assert told == len(nodes[0].contacts()) == 4
    await wait_until(lambda: all(n.purges.purged(D1) for n in nodes), 5, "every node to learn the purge")
    for n in nodes:
        assert n.protocol.providers.get(provider_key(D1)) == []
        assert await n.find_providers(D1) == []  # no node keeps or returns a record of it
        assert await n.find_tag(REF) is None  # the tag resolves from the registry only
        assert D1 not in n.held
    assert len(await nodes[4].find_providers(D2)) == 3  # what was not purged stays
    # A republish (a holder that missed nothing, or an old node) stores nothing anywhere.
    assert await nodes[2].announce(D1, 10) == 0
    ok, reply = await nodes[2].protocol.add_provider(("127.0.0.1", nodes[3].port), nodes[2].node_id,
                                                     provider_key(D1), [])
    assert ok and reply == {"error": "purged"}
    # A tag resolved afterwards (the registry's new digest) is recorded and found again.
    await nodes[1].publish_tag(REF, D2, MANIFEST, 10)
    assert (await nodes[3].find_tag(REF)).digest == D2


async def test_a_node_that_was_away_learns_a_purge_when_it_joins(purging):
    first = await purging()
    nodes = [first] + [await purging(bootstrap=first) for _ in range(2)]
    await nodes[1].purge("", [D1])
    late = await purging(bootstrap=first)  # joins after the purge
    assert not late.purges.purged(D1)
    assert await late.sync_purges() == 1  # what a join (and every PURGE_SYNC_INTERVAL) does
    assert late.purges.purged(D1)
    assert await late.announce(D1, 10) == 0


async def test_in_key_pair_mode_only_a_purge_signed_by_its_issuer_counts(dht_nodes, tmp_path):
    async def make(identity, bootstrap=None) -> DhtNode:
        node = await dht_nodes(KeySealer(identity, "dht"), bootstrap, identity.node_id)
        node.keep_purges(PurgeList(str(tmp_path / f"purges-{node.port}.jsonl")))
        return node

    first = await make(member())
    honest, rogue = await make(member(), first), await make(member(), first)
    await honest.announce(D1, 7)
    # In another member's name, or unsigned: refused.
    victim_purge = PurgeRecord(honest.node_id, time.time(), "", (D1,))
    for rec in (victim_purge, PurgeRecord(rogue.node_id, time.time(), "", (D1,)),
                rogue.protocol.sign("purge", tag_key("elsewhere"), PurgeRecord(rogue.node_id, time.time(), "", (D1,)))):
        ok, reply = await rogue.protocol.purge(("127.0.0.1", first.port), rogue.node_id, rogue.protocol.purge_wire(rec))
        assert ok and "error" in reply
    assert not first.purges.purged(D1)
    await rogue.purge("", [D1])  # a member's own, signed: counts everywhere
    await wait_until(lambda: first.purges.purged(D1) and honest.purges.purged(D1), 5, "the signed purge")
    assert await first.find_providers(D1) == []
