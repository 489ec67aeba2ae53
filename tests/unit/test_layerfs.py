"""Names in a layer are resolved inside the snapshot, as continuity's fs.RootPath does."""

from __future__ import annotations

import os

import pytest

from cs_p2p.apply.layerfs import InvalidLayer, root_path


@pytest.fixture
def root(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("/etc", tmp_path / "abs")
    os.symlink("../../../..", tmp_path / "up")
    os.symlink("real", tmp_path / "rel")
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    return str(tmp_path)


@pytest.mark.parametrize("name,want", [
    ("a/b", "a/b"), ("/a/b", "a/b"), ("../../a", "a"), ("a/../../b", "b"), ("", ""), (".", ""),
    ("abs/passwd", "etc/passwd"), ("up/etc", "etc"), ("rel/x", "real/x"), ("rel/../x", "x"),
    ("up/../../abs/../x", "x"),
])
def test_every_name_resolves_inside_the_root(root, name, want):
    got = root_path(root, name)
    assert got == (os.path.join(root, want) if want else root)
    assert got == root or got.startswith(root + "/")


def test_a_symlink_loop_is_an_invalid_layer(root):
    with pytest.raises(InvalidLayer):
        root_path(root, "loop1/x")
