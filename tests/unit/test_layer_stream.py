"""The layer stream the applier reads: decompressed by magic bytes like containerd's
DecompressStream, and hashed whole (trailing bytes too) for the diff_id containerd checks."""

from __future__ import annotations

import gzip
import hashlib
import io
import os

import pytest
import zstandard

from cs_p2p.apply.stream import CorruptLayer, HashingStream

DATA = os.urandom(3 << 20) + b"tail" * 1000


def read_all(blob: bytes, step: int = 70_000) -> tuple[HashingStream, bytes]:
    s = HashingStream(io.BytesIO(blob))
    out = b"".join(iter(lambda: s.read(step), b""))
    return s, out


@pytest.mark.parametrize("compress,kind", [
    (lambda d: d, "none"),
    (gzip.compress, "gzip"),
    (lambda d: gzip.compress(d[:1000]) + gzip.compress(d[1000:]), "gzip"),  # multi-member, as Go reads it
    (lambda d: zstandard.ZstdCompressor().compress(d), "zstd"),
    (lambda d: zstandard.ZstdCompressor().compress(d[:5]) + zstandard.ZstdCompressor().compress(d[5:]), "zstd"),
], ids=["plain", "gzip", "gzip-members", "zstd", "zstd-frames"])
def test_every_compression_yields_the_tar_bytes_and_their_digest(compress, kind):
    s, out = read_all(compress(DATA))
    assert s.compression == kind and out == DATA
    assert s.diff_id == "sha256:" + hashlib.sha256(DATA).hexdigest() and s.size == len(DATA)


def test_seeking_forward_skips_but_still_hashes_and_never_goes_back():
    s = HashingStream(io.BytesIO(gzip.compress(DATA)))
    assert s.read(10) == DATA[:10]
    s.seek(2 << 20)
    assert s.tell() == 2 << 20 and s.read(5) == DATA[2 << 20:(2 << 20) + 5]
    with pytest.raises(CorruptLayer):
        s.seek(0)
    s.drain()  # what the tar reader leaves unread counts in the diff_id
    assert s.diff_id == "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("blob", [
    gzip.compress(DATA)[:-100],
    gzip.compress(DATA) + b"garbage after the member",
    b"\x1f\x8b\x08" + os.urandom(100),
    zstandard.ZstdCompressor().compress(DATA)[:-50],
    zstandard.ZstdCompressor().compress(DATA) + b"garbage",
], ids=["gzip-cut", "gzip-garbage", "gzip-bad-header", "zstd-cut", "zstd-garbage"])
def test_a_broken_stream_is_a_corrupt_layer_never_a_short_one(blob):
    with pytest.raises(CorruptLayer):
        read_all(blob)
