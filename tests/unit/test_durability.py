"""A blob containerd was told exists survives a power cut: every rename that makes a blob
(a commit, a blob back from the cache, its metadata) is followed by a sync of the directory
that holds the new name — a rename is durable only then."""

from __future__ import annotations

import os

import pytest

from cs_p2p.store import LocalStore
from tests.unit.test_cache import commit


@pytest.fixture
def synced(monkeypatch):
    """The paths of every file and directory fsync'ed, in order, with the renames between."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, **kw):
        real_rename(src, dst, **kw)
        events.append(("rename", os.path.realpath(dst)))

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        events.append(("rename", os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return events


def renames_made_durable(events: list[tuple[str, str]]) -> bool:
    """Each rename is followed, before the next rename, by an fsync of its directory."""
    pending = None
    for kind, path in events:
        if kind == "rename":
            if pending:
                return False
            pending = os.path.dirname(path)
        elif pending and path == pending:
            pending = None
    return pending is None


def test_a_commit_and_its_metadata_are_on_disk_when_it_returns(tmp_path, synced):
    store = LocalStore(str(tmp_path))
    digest = commit(store, b"layer bytes")
    renamed = [p for kind, p in synced if kind == "rename"]
    assert os.path.realpath(store.blobs.blob_path(digest[7:])) in renamed
    assert renames_made_durable(synced), synced


def test_a_blob_back_from_the_cache_is_on_disk_when_containerd_is_told(tmp_path, synced):
    store = LocalStore(str(tmp_path), cache_max_bytes=1000)
    digest = commit(store, b"x" * 100)
    assert store.delete(digest) == (True, [])
    synced.clear()
    assert store.restore(digest)
    assert any(kind == "rename" and p == os.path.realpath(store.blobs.blob_path(digest[7:])) for kind, p in synced)
    assert renames_made_durable(synced), synced
