"""The cache of blobs containerd's GC let go of: within its budget, least recently used out
first, never listed to containerd, handed back at once."""

from __future__ import annotations

import hashlib
import os

import pytest

from cs_p2p.errors import NotFound
from cs_p2p.store import LocalStore


def commit(store: LocalStore, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = store.blobs.blob_path(digest[7:]) + ".tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data)
    store.blobs.commit_file(fd, path, digest, {"containerd.io/gc.root": "x"})
    os.close(fd)
    return digest


def test_deleted_blobs_stay_within_the_budget_and_come_back_at_once(tmp_path):
    store = LocalStore(str(tmp_path), cache_max_bytes=250)
    a, b, c = (commit(store, bytes([i]) * 100) for i in range(3))
    assert store.delete(a) == (True, [])
    os.utime(store.cache.path(a[7:]), (1, 1))  # a: used longest ago
    assert store.delete(b) == (True, [])
    assert store.delete(c) == (True, [a])  # room for c: the least recently used goes
    assert store.cache.used_bytes == 200 <= store.cache.max_bytes
    assert [i.digest for i in store.blobs.walk()] == []  # never listed to containerd
    assert store.served_path(b[7:]) == store.cache.path(b[7:])  # peers are still served
    assert store.restore(b) and not store.restore(a)
    assert store.blobs.info(b).size == 100 and store.blobs.info(b).labels == {}  # containerd's labels went with it
    with pytest.raises(NotFound):
        store.delete(a)


def test_a_blob_over_the_budget_is_deleted_and_nothing_else_is_evicted(tmp_path):
    store = LocalStore(str(tmp_path), cache_max_bytes=150)
    small, big = commit(store, b"s" * 100), commit(store, b"b" * 200)
    assert store.delete(small) == (True, [])
    assert store.delete(big) == (False, [])
    assert store.served_path(big[7:]) is None and store.cache.holds(small[7:])
    again = LocalStore(str(tmp_path), cache_max_bytes=150)  # a restart keeps the cache
    assert again.cache.digests() == [(small, 100)]


def test_without_a_budget_nothing_is_kept_not_even_an_empty_blob(tmp_path):
    store = LocalStore(str(tmp_path))
    empty = commit(store, b"")
    assert store.delete(empty) == (False, []) and store.cache.digests() == []


def test_the_blob_the_cluster_asks_for_most_is_evicted_last(tmp_path):
    store = LocalStore(str(tmp_path), cache_max_bytes=250)
    hot, cold, new = (commit(store, bytes([i]) * 100) for i in range(3))
    store.delete(hot)
    os.utime(store.cache.path(hot[7:]), (1, 1))  # used longest ago, but asked for often
    store.delete(cold)
    store.cache.value = lambda hex_: 30.0 if hex_ == hot[7:] else 0.0
    assert store.delete(new) == (True, [cold])
    assert store.cache.holds(hot[7:])
