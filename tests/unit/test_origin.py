"""Which registry repository a blob came from, as the mirror learns it from the manifests it
resolves: the key to finishing a failed peer fetch from the registry."""

from __future__ import annotations

import hashlib
import json

from cs_p2p.fetch.origin import Location, Origins


def blob(store: dict, doc: dict) -> str:
    data = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store[digest] = data
    return digest


def store_at(tmp_path, files: dict[str, bytes]):
    """The local store as Origins sees it: digest -> its file, written once `files` has it."""
    def path(digest: str) -> str:
        p = tmp_path / digest.replace(":", "_")
        if digest in files and not p.exists():
            p.write_bytes(files[digest])
        return str(p)
    return path


def test_layers_of_a_resolved_manifest_and_of_an_index_child_are_located(tmp_path):
    files: dict[str, bytes] = {}
    path = store_at(tmp_path, files)

    layer, config, other = "sha256:" + "a" * 64, "sha256:" + "c" * 64, "sha256:" + "f" * 64
    manifest = blob(files, {"config": {"digest": config}, "layers": [{"digest": layer}]})
    index = blob(files, {"manifests": [{"digest": manifest}, {"digest": "sha256:" + "e" * 64}]})
    origins = Origins(path, max_entries=3)
    assert origins.locate(layer) is None
    origins.manifest_seen("registry.example:5000", "team/app", index)
    assert origins.locate(layer) == Location("registry.example:5000", "team/app")
    assert str(origins.locate(config)) == "registry.example:5000/team/app"
    assert origins.is_manifest(index) and origins.is_manifest(manifest) and not origins.is_manifest(layer)
    assert origins.locate(other) is None  # referenced by nothing resolved here
    origins.blob_seen("r2", "x/y", other)  # asked of the mirror directly
    assert origins.locate(other) == Location("r2", "x/y")
    for i in range(5):  # bounded: the oldest are forgotten
        origins.blob_seen("r3", "z", "sha256:" + f"{i}" * 64)
    assert origins.locate(other) is None


def test_each_manifest_is_read_from_disk_once_however_often_it_is_asked(tmp_path, monkeypatch):
    """Every `Info` of a blob the node lacks asks where it lives; with thousands of manifests
    remembered, re-reading each from disk per question would stall the event loop."""
    files: dict[str, bytes] = {}
    path = store_at(tmp_path, files)

    origins = Origins(path)
    layers = []
    for i in range(50):
        layer = "sha256:" + f"{i:064x}"
        layers.append(layer)
        manifest = blob(files, {"config": {"digest": "sha256:" + "c" * 64}, "layers": [{"digest": layer}]})
        index = blob(files, {"manifests": [{"digest": manifest}]})
        origins.manifest_seen("r", f"team/app{i}", index)
    loads = []
    real = Origins._load
    monkeypatch.setattr(Origins, "_load", lambda self, d: loads.append(d) or real(self, d))
    for _ in range(3):
        for i, layer in enumerate(layers):
            assert origins.is_manifest(layer) is False
            origins._blobs.pop(layer, None)  # as if forgotten: located through the manifests again
            assert origins.locate(layer) == Location("r", f"team/app{i}")
    assert len(loads) == len(set(loads)) == 100  # 50 indexes and their 50 manifests, once each


def test_named_gives_size_and_repository_from_memory_the_newest_manifest_winning(tmp_path, monkeypatch):
    """What `Info` claims with: a GET's body is indexed at once; a manifest the mirror only
    answered a HEAD for is read once it is in the store; nothing is read twice."""
    files: dict[str, bytes] = {}
    path = store_at(tmp_path, files)

    layer, config = "sha256:" + "a" * 64, "sha256:" + "c" * 64
    doc = {"config": {"digest": config, "size": 7}, "layers": [{"digest": layer, "size": 1234},
                                                              {"digest": "sha256:" + "b" * 64, "size": True}]}
    origins = Origins(path)
    assert origins.named(layer) is None
    body = json.dumps(doc).encode()
    origins.manifest_body("r", "team/app", "sha256:" + hashlib.sha256(body).hexdigest(), body)
    named = origins.named(layer)
    assert (named.where, named.size) == (Location("r", "team/app"), 1234) and origins.named(config).size == 7
    assert origins.named(config).config and not named.config  # containerd reads the config first
    assert origins.named("sha256:" + "b" * 64) is None  # no usable size: not claimable

    later = blob(files, {**doc, "annotations": {"x": "y"}})  # another repository names the same layer
    origins.manifest_seen("r", "team/other", later)  # a HEAD: indexed once containerd wrote it
    loads = []
    real = Origins._load
    monkeypatch.setattr(Origins, "_load", lambda self, d: loads.append(d) or real(self, d))
    for _ in range(3):
        assert origins.named(layer).where == Location("r", "team/other")
    assert loads == [later]
    missing = "sha256:" + "9" * 64  # resolved, never written: looked for, bounded
    origins.manifest_seen("r", "team/gone", missing)
    assert origins.named(layer).where == Location("r", "team/other")
