"""Provider records in a real Kademlia network of in-process nodes on loopback (UDP)."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

from cs_p2p.dht.node import DhtNode, load_or_create_node_id, provider_key
from cs_p2p.dht.protocol import MAX_RECORDS_PER_REPLY
from cs_p2p.dht.providers import ProviderRecord

D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32


def addr_of(node: DhtNode) -> tuple[str, int]:
    host, port = node.dht_addr.rsplit(":", 1)
    return host, int(port)


@pytest.fixture
async def network():
    gc.collect()  # earlier tests' nodes (their loops closed) are collected now, not mid-test
    nodes: list[DhtNode] = []

    async def make(n: int, ttl: float = 3600) -> list[DhtNode]:
        for i in range(n):
            node = DhtNode(os.urandom(20), f"127.0.0.1:{20000 + len(nodes)}", ttl=ttl)
            port = await node.listen("127.0.0.1", 0)
            node.dht_addr = f"127.0.0.1:{port}"
            if nodes:
                await node.bootstrap([nodes[0].dht_addr])
            nodes.append(node)
        # a second pass lets early nodes learn of later ones, as refreshes would
        for node in nodes[1:]:
            await node.bootstrap([nodes[-1].dht_addr])
        return nodes

    yield make
    for node in nodes:
        node.stop()


async def test_many_providers_per_digest_are_found_from_any_node(network):
    nodes = await network(10)
    await nodes[1].announce(D1, 1234)
    await nodes[2].announce(D1, 1234)
    for asker in (nodes[0], nodes[5], nodes[9]):
        found = await asker.find_providers(D1)
        assert {r.node_id for r in found} == {nodes[1].node_id, nodes[2].node_id}
        assert {r.addr for r in found} == {nodes[1].peer_addr, nodes[2].peer_addr}
        assert all(r.size == 1234 for r in found)
    assert await nodes[3].find_providers(D2) == []


async def test_withdraw_removes_only_the_withdrawing_node(network):
    nodes = await network(8)
    await nodes[1].announce(D1, 10)
    await nodes[2].announce(D1, 10)
    assert await nodes[1].withdraw(D1) > 0
    found = await nodes[6].find_providers(D1)
    assert [r.node_id for r in found] == [nodes[2].node_id]
    assert D1 not in nodes[1].held


async def test_records_expire_and_are_reannounced(network):
    nodes = await network(5, ttl=1.0)
    await nodes[1].announce(D1, 5)
    # The republisher runs every ttl/2, so the record stays findable past its first expiry.
    first = (await nodes[3].find_providers(D1))[0]
    deadline = time.monotonic() + 10
    while True:
        found = await nodes[3].find_providers(D1)
        if found and found[0].expires > first.expires:
            break
        assert time.monotonic() < deadline, "record was never re-announced"
        await asyncio.sleep(0.1)
    nodes[1].stop()  # a node that is gone stops re-announcing: its record expires
    deadline = time.monotonic() + 10
    while await nodes[3].find_providers(D1):
        assert time.monotonic() < deadline, "expired record still returned"
        await asyncio.sleep(0.1)


async def test_a_node_cannot_announce_or_withdraw_for_another(network):
    nodes = await network(3)
    await nodes[1].announce(D1, 7)
    key = provider_key(D1)
    target = addr_of(nodes[2])
    forged = ProviderRecord(nodes[1].node_id, "10.9.9.9:1", 7, time.time() + 60)
    ok, reply = await nodes[0].protocol.add_provider(target, nodes[0].node_id, key, forged.to_wire())
    assert ok and "error" in reply
    # remove_provider only ever removes the sender's own record
    ok, _ = await nodes[0].protocol.remove_provider(target, nodes[0].node_id, key)
    assert [r.node_id for r in await nodes[0].find_providers(D1)] == [nodes[1].node_id]


async def test_bad_rpc_arguments_get_an_error_reply_not_a_timeout(network):
    nodes = await network(2)
    target = addr_of(nodes[1])
    for args in [(b"short", b"k" * 20), (nodes[0].node_id, "not-bytes"), (nodes[0].node_id, b"k" * 20, ["x"])]:
        method = nodes[0].protocol.add_provider if len(args) == 3 else nodes[0].protocol.get_providers
        ok, reply = await method(target, *args)
        assert ok and isinstance(reply, dict) and "error" in reply, args


async def test_replies_stay_under_the_datagram_cap_with_many_providers(network):
    nodes = await network(4)
    key = provider_key(D1)
    for _ in range(60):  # more providers than one reply carries
        rec = ProviderRecord(os.urandom(20), "127.0.0.1:65535", 2**40, time.time() + 600)
        for n in nodes:
            n.protocol.providers.add(key, rec)
    found = await nodes[0].find_providers(D1)
    assert len(found) >= MAX_RECORDS_PER_REPLY


async def test_bootstrap_resolves_names_and_node_id_persists(tmp_path, network):
    nodes = await network(2)
    node_id = load_or_create_node_id(str(tmp_path))
    assert load_or_create_node_id(str(tmp_path)) == node_id  # kept across restarts
    joiner = DhtNode(node_id, "127.0.0.1:1")
    await joiner.listen("127.0.0.1", 0)
    try:
        port = nodes[0].dht_addr.split(":")[1]
        assert await joiner.bootstrap([f"localhost:{port}"]) >= 1
        await nodes[1].announce(D2, 3)
        assert [r.node_id for r in await joiner.find_providers(D2)] == [nodes[1].node_id]
        assert await joiner.bootstrap(["no-such-host.invalid:1"]) == 0
    finally:
        joiner.stop()


REF = "registry.example:5000/team/app:v1"


async def test_the_newest_tag_record_wins_across_publishers(network):
    nodes = await network(4)
    await nodes[1].publish_tag(REF, D1, "application/vnd.oci.image.manifest.v1+json", 100)
    assert (await nodes[3].find_tag(REF)).digest == D1
    await nodes[2].publish_tag(REF, D2, "application/vnd.oci.image.index.v1+json", 200)  # the tag moved
    rec = await nodes[3].find_tag(REF)
    assert (rec.digest, rec.media_type, rec.size, rec.node_id) == (
        D2, "application/vnd.oci.image.index.v1+json", 200, nodes[2].node_id)
    assert await nodes[3].find_tag("registry.example:5000/team/app:other") is None


async def test_tag_records_cannot_be_forged_or_dated_in_the_future(network):
    from cs_p2p.dht.tags import TagRecord, tag_key

    nodes = await network(3)
    await nodes[1].publish_tag(REF, D1, "application/vnd.oci.image.manifest.v1+json", 100)
    target, key = addr_of(nodes[2]), tag_key(REF)
    forged = TagRecord(nodes[1].node_id, D2, "application/vnd.oci.image.manifest.v1+json", 100, time.time())
    ok, reply = await nodes[0].protocol.add_tag(target, nodes[0].node_id, key, forged.to_wire())
    assert ok and "error" in reply  # a node publishes only its own records
    future = TagRecord(nodes[0].node_id, D2, "application/vnd.oci.image.manifest.v1+json", 100, time.time() + 3600)
    ok, reply = await nodes[0].protocol.add_tag(target, nodes[0].node_id, key, future.to_wire())
    for bad in (["x"], [nodes[0].node_id, "sha256:zz", "t", 1, 0.0], [nodes[0].node_id, D2, "", 1, 0.0]):
        ok, reply = await nodes[0].protocol.add_tag(target, nodes[0].node_id, key, bad)
        assert ok and "error" in reply, bad
    assert (await nodes[2].find_tag(REF)).digest == D1


async def test_hundreds_of_operator_lookups_leave_no_dead_contact_behind(network, capsys):
    """`cs-p2p locate` run over and over (an operator polling): each run is a short-lived
    client, and none of them may stay in a node's routing table, where every later lookup
    would wait on it."""
    from cs_p2p.dht import operator

    nodes = await network(4)
    await nodes[1].announce(D1, 42)
    await nodes[2].announce(D1, 42)
    via = [nodes[0].dht_addr]
    for _ in range(300):
        assert await operator.locate(D1, via) == 0
    out = capsys.readouterr().out
    assert out.count("127.0.0.1:20001") == 300 and out.count("127.0.0.1:20002") == 300
    members = {n.node_id for n in nodes}
    for node in nodes:  # once the nodes' checks of the passing clients are over
        deadline = time.monotonic() + 10
        while node.protocol._verifying:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        contacts = {c.id for c in node.protocol.router.find_neighbors(node.server.node, k=1000)}
        assert contacts <= members, f"{len(contacts - members)} operator clients in a routing table"
    # A lookup after them asks nobody who does not answer, and finds both providers.
    client = await operator._joined_client(via, None)
    asked: list[bool] = []
    real = client.protocol.call_get_providers

    async def counting(node, key):
        reply = await real(node, key)
        asked.append(reply is not None)
        return reply

    client.protocol.call_get_providers = counting
    try:
        found = await client.find_providers(D1)
    finally:
        client.stop()
    assert {r.addr for r in found} == {"127.0.0.1:20001", "127.0.0.1:20002"}
    assert asked and all(asked), "the lookup waited on contacts that never answer"


def _next_to(key: bytes) -> bytes:
    """A node id as close to `key` as ids get: only the last bit differs."""
    return key[:-1] + bytes([key[-1] ^ 1])


async def test_a_node_that_joins_next_to_a_key_is_handed_its_records(network):
    """Kademlia's join: records reach the nodes closest to a key when announced; a node that
    joins closer later gets them from those nodes, or lookups and the replication floor meet an
    empty node where the records should be."""
    nodes = await network(8)
    await nodes[1].announce(D1, 11)
    await nodes[2].announce(D1, 11)
    key = provider_key(D1)
    joiner = DhtNode(_next_to(key), "127.0.0.1:29999")
    await joiner.listen("127.0.0.1", 0)
    try:
        await joiner.bootstrap([nodes[0].dht_addr])
        await joiner.refresh_buckets()
        deadline = time.monotonic() + 10
        while {r.node_id for r in joiner.protocol.providers.get(key)} != {nodes[1].node_id, nodes[2].node_id}:
            assert time.monotonic() < deadline, "the records were never handed over"
            await asyncio.sleep(0.05)
        assert joiner.protocol.digests[key] == D1  # it watches the blob for the floor too
        assert joiner.held == {}  # it keeps the records, it does not claim to hold the blob
    finally:
        joiner.stop()


async def test_a_lookup_gives_providers_as_it_meets_them_and_goes_on_when_asked(network):
    nodes = await network(8)
    await nodes[1].announce(D1, 5)
    await nodes[2].announce(D1, 5)
    batches = []
    async for batch in nodes[6].providers_as_found(D1):
        batches.append(batch)
    found = [r.node_id for batch in batches for r in batch]
    assert sorted(found) == sorted([nodes[1].node_id, nodes[2].node_id])  # each publisher once
    # A caller that is content with the first batch stops the walk there.
    async for batch in nodes[6].providers_as_found(D1):
        assert batch
        break


async def test_a_node_that_knows_fewer_than_k_others_asks_them_all_at_once(network):
    nodes = await network(12)  # fewer than k (20): every node is among the k closest to any key
    await nodes[1].announce(D1, 5)
    asker = nodes[7]
    known = len(asker.protocol.router.find_neighbors(asker.protocol.source_node, 60))
    assert known == 11
    in_flight, most = 0, 0
    ask = asker.protocol.call_get_providers

    async def counted(node, key):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await ask(node, key)
        finally:
            in_flight -= 1

    asker.protocol.call_get_providers = counted
    found = await asker.find_providers(D1)
    assert [r.node_id for r in found] == [nodes[1].node_id]
    assert most == known  # one round trip, not `alpha` (3) at a time


async def test_an_in_flight_record_counts_as_stored_once_most_nodes_have_it(network):
    nodes = await network(10)
    for dead in nodes[7:]:  # 3 of the 9 others are gone: their stores wait out the RPC timeout
        dead.stop()
    task, stored = nodes[1].fetching(D1, 5, time.time())
    await asyncio.wait_for(stored, 0.8)  # the 6 live nodes acknowledge at once (the timeout is 1 s)
    assert not task.done()  # still waiting on the dead ones
    found = await nodes[4].find_providers(D1, round_timeout=0.2)
    assert [r.node_id for r in found] == [nodes[1].node_id] and found[0].inflight
    assert await task == 6


async def test_a_lookup_for_an_in_flight_download_waits_for_most_nodes_however_late(network):
    """Of the 5 others, 3 answer after the walk's patience: an ordinary lookup gives them up,
    the lookup that decides whether to follow an earlier node waits for a majority."""
    nodes = await network(6)
    await nodes[1].announce(D1, 5)
    asker = nodes[0]
    assert len(asker.protocol.router.find_neighbors(asker.protocol.source_node, 60)) == 5
    slow = {n.node_id for n in nodes[3:]}
    real = asker.protocol.call_get_providers
    answered: list[bytes] = []

    async def late(node, key):
        bucket = answered  # this lookup's, even for a reply that comes after it ended
        if node.id in slow:
            await asyncio.sleep(0.5)
        reply = await real(node, key)
        bucket.append(node.id)
        return reply

    asker.protocol.call_get_providers = late
    await asker.find_providers(D1, round_timeout=0.2, within=3)
    assert len(answered) == 2  # the two quick ones
    answered = []
    await asker.find_providers(D1, round_timeout=0.2, within=3, majority=True)
    assert len(answered) >= 3


async def test_with_k_or_more_nodes_known_an_in_flight_record_counts_as_stored_when_the_announce_ends(network):
    """Only the walk finds the key's k closest in a larger cluster: a follower decides after
    it, as before the small-cluster shortcut."""
    nodes = await network(6)
    announcer = nodes[1]
    announcer.server.ksize = 3  # knows 5 others: k or more
    key = int.from_bytes(provider_key(D1), "big")
    others = sorted((n for n in nodes if n is not announcer), key=lambda n: int.from_bytes(n.node_id, "big") ^ key)
    for dead in others[:2]:  # the key's closest: the walk meets them and waits out their RPC timeout (1 s)
        dead.stop()
    task, stored = announcer.fetching(D1, 5, time.time())
    done, _ = await asyncio.wait([stored], timeout=0.5)
    assert not done  # not at once: the walk to the k closest is still under way
    await asyncio.wait_for(stored, 5)
    assert await task >= 1
