"""Bounds that keep one client or one peer from filling a node."""

from __future__ import annotations

import os
import time

import pytest

from cs_p2p.dht.providers import ProviderRecord, ProviderStore
from cs_p2p.errors import ResourceExhausted
from cs_p2p.store import LocalStore


def test_one_publisher_cannot_fill_the_provider_store():
    store = ProviderStore(max_per_publisher=3)
    flooder, honest = os.urandom(20), os.urandom(20)
    keys = [os.urandom(20) for _ in range(5)]
    results = [store.add(k, ProviderRecord(flooder, "10.0.0.1:1", 1, time.time() + 60)) for k in keys]
    assert results == [True, True, True, False, False]
    assert store.add(keys[0], ProviderRecord(flooder, "10.0.0.1:1", 1, time.time() + 90))  # a re-announce
    assert store.add(keys[4], ProviderRecord(honest, "10.0.0.2:1", 1, time.time() + 60))
    assert [r.node_id for r in store.get(keys[4])] == [honest]
    store.remove(keys[0], flooder)
    assert store.add(keys[4], ProviderRecord(flooder, "10.0.0.1:1", 1, time.time() + 60))  # room again


def test_expired_records_make_room_for_their_publisher():
    store = ProviderStore(max_per_publisher=2)
    node = os.urandom(20)
    for _ in range(2):
        assert store.add(os.urandom(20), ProviderRecord(node, "10.0.0.1:1", 1, time.time() - 1))
    assert store.add(os.urandom(20), ProviderRecord(node, "10.0.0.1:1", 1, time.time() + 60))


def test_open_ingests_are_bounded(tmp_path):
    store = LocalStore(str(tmp_path))
    store.ingests.max_ingests = 2
    writers = [store.ingests.open_writer(f"ref-{i}", 0, "") for i in range(2)]
    with pytest.raises(ResourceExhausted):
        store.ingests.open_writer("ref-2", 0, "")
    writers[0].close()
    store.ingests.abort("ref-0")
    store.ingests.open_writer("ref-2", 0, "").close()
    writers[1].close()


async def test_ingest_disk_use_is_bounded_and_freed_by_commit_and_abort(tmp_path):
    store = LocalStore(str(tmp_path), max_ingest_bytes=100)
    a = store.ingests.open_writer("ref-a", 0, "")
    b = store.ingests.open_writer("ref-b", 0, "")
    await a.write(b"a" * 60)
    with pytest.raises(ResourceExhausted):
        await b.write(b"b" * 60)
    assert b.offset == 0  # nothing of the refused write counted or kept
    await b.write(b"b" * 40)
    with pytest.raises(ResourceExhausted):
        store.ingests.open_writer("ref-c", 101, "")  # declared larger than the whole limit
    a.commit_sync(60, "", {})  # committed data is no longer ingest data
    await b.write(b"b" * 60)
    b.close()
    store.ingests.abort("ref-b")
    c = store.ingests.open_writer("ref-c", 0, "")
    await c.write(b"c" * 100)
    c.close()
    # A new process measures what is on disk.
    again = LocalStore(str(tmp_path), max_ingest_bytes=100)
    assert again.ingests.used == 100
