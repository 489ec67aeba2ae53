"""A layer's tar cannot make the applier read an unbounded header or parse one in quadratic
time (issue: hostile layers): special headers over 1 MiB are refused before they are read,
PAX records are parsed in one pass, sparse maps are bounded; ordinary headers still apply."""

from __future__ import annotations

import gzip
import io
import os
import resource
import tarfile

import pytest

from cs_p2p.apply.layerfs import InvalidLayer
from cs_p2p.apply.tarheaders import MAX_SPECIAL_HEADER, LayerRefused, parse_pax_records
from cs_p2p.apply.worker import Target, apply_layer


def header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def pax_record(keyword: str, value: bytes) -> bytes:
    body = f" {keyword}=".encode() + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return str(length).encode() + body


def write_layer(path: str, *parts: bytes, compress: bool = True) -> None:
    data = b"".join(parts) + b"\0" * 1024
    with (gzip.open(path, "wb", compresslevel=1) if compress else open(path, "wb")) as f:
        f.write(data)


def a_file(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
                                  tarfile.GNUTYPE_LONGLINK])
def test_a_special_header_over_a_mebibyte_is_refused_unread(kind, tmp_path):
    """256 MiB of header from a layer of a few hundred KB: refused, the worker's memory does not
    grow by the header, nothing is written."""
    layer = str(tmp_path / "layer.gz")
    size = 256 << 20
    with gzip.open(layer, "wb", compresslevel=1) as f:
        f.write(header("././@Header", size, kind))
        chunk = b"1" * (1 << 20)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(a_file("etc/passwd", b"root:x:0:0\n") + b"\0" * 1024)
    target = tmp_path / "root"
    target.mkdir()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InvalidLayer, match="exceeds 1048576 bytes"):
        apply_layer(layer, Target("dir", str(target)))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 << 10, f"memory grew by {grown_kib} KiB"
    assert os.listdir(target) == []


def test_a_pax_header_that_backtracks_tarfiles_regular_expressions_applies_in_linear_time(tmp_path):
    """CVE-2024-6232's shape: a long run of digits in a PAX header (here a comment's value).
    `tarfile` before 3.11.10 searches it with backtracking regular expressions, for hours;
    parsed in one pass, the layer applies at once (pytest-timeout fails the test otherwise)."""
    records = pax_record("comment", b"1" * 900_000) + pax_record("path", b"etc/hostname")
    layer = str(tmp_path / "layer.gz")
    write_layer(layer, header("././@PaxHeader", len(records), tarfile.XHDTYPE), records,
                b"\0" * (-len(records) % 512), a_file("ignored-name", b"node\n"))
    target = tmp_path / "root"
    target.mkdir()
    apply_layer(layer, Target("dir", str(target)))
    assert (target / "etc" / "hostname").read_bytes() == b"node\n"


def test_pax_records_parse_as_tarfile_reads_them():
    buf = pax_record("path", "dir/ü".encode()) + pax_record("mtime", b"1700000000.123456789") + b"\0" * 100
    assert parse_pax_records(buf) == [(b"path", "dir/ü".encode()), (b"mtime", b"1700000000.123456789")]
    info = tarfile.TarInfo("x")
    info.pax_headers = {"path": "a/" + "b" * 300, "SCHILY.xattr.user.k": "v"}
    real = info.tobuf(format=tarfile.PAX_FORMAT)
    size = tarfile.nti(real[124:136])
    assert dict((k.decode(), v.decode()) for k, v in parse_pax_records(real[512:512 + size])) == \
        {"path": "a/" + "b" * 300, "SCHILY.xattr.user.k": "v"}


@pytest.mark.parametrize("buf", [b"12 path=x", b"999 path=abc\n", b"7 =abc\n", b"x path=abc\n", b"1" * 5000])
def test_malformed_pax_records_are_refused(buf):
    with pytest.raises(LayerRefused, match="malformed PAX record"):
        parse_pax_records(buf)


def test_a_gnu_sparse_map_larger_than_a_header_may_be_is_refused(tmp_path):
    """GNU sparse 1.0 keeps its map before the data: a count of 2^40 extents is refused
    before a block of it is read."""
    records = (pax_record("GNU.sparse.major", b"1") + pax_record("GNU.sparse.minor", b"0")
               + pax_record("GNU.sparse.name", b"big") + pax_record("GNU.sparse.realsize", b"1"))
    layer = str(tmp_path / "layer.gz")
    sparse_map = (str(1 << 40).encode() + b"\n").ljust(512, b"\0")
    write_layer(layer, header("././@PaxHeader", len(records), tarfile.XHDTYPE), records,
                b"\0" * (-len(records) % 512), header("GNUSparseFile.0/big", 512, tarfile.REGTYPE), sparse_map)
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(InvalidLayer, match="sparse map"):
        apply_layer(layer, Target("dir", str(target)))
    assert MAX_SPECIAL_HEADER == 1 << 20


def test_a_broken_header_after_the_first_member_is_refused_not_taken_for_the_end(tmp_path):
    """`tarfile` stops at a header with a bad checksum as if the archive ended there, and the
    layer would be half applied with the right diff ID; containerd refuses it."""
    garbage = bytearray(a_file("b", b"second\n")[:512])
    garbage[148:156] = b"0000000\0"  # a checksum that does not add up
    layer = str(tmp_path / "layer.gz")
    write_layer(layer, a_file("a", b"first\n"), bytes(garbage), a_file("c", b"third\n"))
    target = tmp_path / "root"
    target.mkdir()
    with pytest.raises(InvalidLayer, match="invalid tar header"):
        apply_layer(layer, Target("dir", str(target)))


def test_an_empty_layer_and_a_layer_without_end_blocks_still_apply(tmp_path):
    for name, parts in (("empty", []), ("no-end", [a_file("a", b"x\n")])):
        layer = str(tmp_path / f"{name}.tar")
        with open(layer, "wb") as f:
            f.write(b"".join(parts))
        target = tmp_path / name
        target.mkdir()
        apply_layer(layer, Target("dir", str(target)))
        assert sorted(os.listdir(target)) == (["a"] if parts else [])
