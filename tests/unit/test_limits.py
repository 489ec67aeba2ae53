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
