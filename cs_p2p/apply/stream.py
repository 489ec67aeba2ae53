"""A layer blob as the uncompressed tar stream containerd's applier reads, hashed as it is read.

The compression is recognised by its magic bytes, as containerd's `DecompressStream` does
(gzip, zstd, else plain tar), whatever the media type says. The sha256 of everything the
decompressor yields, trailing bytes after the tar's end included, is the diff_id
containerd checks against the image config.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from typing import BinaryIO, Iterator

READ_SIZE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b\x08"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SLICE = 64 << 10  # compressed bytes per decompress step


class CorruptLayer(Exception):
    """The compressed stream is broken or ends early."""


def _raw_chunks(f: BinaryIO, first: bytes) -> Iterator[bytes]:
    if first:
        yield first
    while chunk := f.read(READ_SIZE):
        yield chunk


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Multi-member gzip, like Go's gzip.Reader; output bounded to READ_SIZE per step."""
    d = zlib.decompressobj(wbits=31)
    fed = False  # has the current member seen input? (a fresh one at the end is a clean end)
    for pending in chunks:
        while True:
            fed = fed or bool(pending)
            try:
                out = d.decompress(pending, READ_SIZE)
            except zlib.error as exc:  # tarfile would take this for an empty archive
                raise CorruptLayer(f"gzip: {exc}") from None
            if out:
                yield out
            if d.eof:
                pending, d, fed = d.unused_data, zlib.decompressobj(wbits=31), False
                if not pending:
                    break
                if not pending.startswith(b"\x1f\x8b"):
                    raise CorruptLayer("gzip: invalid header after a member")
                continue
            pending = d.unconsumed_tail
            if not pending and len(out) < READ_SIZE:
                break
    if fed:
        raise CorruptLayer("gzip: unexpected end of stream")


def _unzstd(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Concatenated zstd frames, like containerd's reader; input fed in small slices so that
    each step's output stays small, and a frame cut short is an error (zstandard's own
    stream reader ends quietly there)."""
    import zstandard  # only workers that meet a zstd layer pay for the import

    dctx = zstandard.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    for chunk in chunks:
        for start in range(0, len(chunk), ZSTD_SLICE):
            data = chunk[start:start + ZSTD_SLICE]
            while data:
                fed = True
                try:
                    out = obj.decompress(data)
                except zstandard.ZstdError as exc:
                    raise CorruptLayer(f"zstd: {exc}") from None
                if out:
                    yield out
                if not obj.eof:
                    break
                data, obj, fed = obj.unused_data, dctx.decompressobj(), False
    if fed:
        raise CorruptLayer("zstd: unexpected end of stream")


class HashingStream:
    """A read-only, forward-only file over the decompressed chunks: what tarfile reads the
    layer from (its plain reader, with `seek` skipping forward)."""

    def __init__(self, f: BinaryIO) -> None:
        first = f.read(4)
        while len(first) < 4:  # a FIFO may hand the magic over in pieces
            more = f.read(4 - len(first))
            if not more:
                break
            first += more
        if first.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            chunks = _gunzip(_raw_chunks(f, first))
        elif first.startswith(ZSTD_MAGIC):
            self.compression = "zstd"
            chunks = _unzstd(_raw_chunks(f, first))
        else:
            self.compression = "none"
            chunks = _raw_chunks(f, first)
        self._chunks = chunks
        self._buf = memoryview(b"")
        self.hasher = hashlib.sha256()
        self.size = 0  # bytes the decompressor produced
        self.pos = 0  # bytes handed out (or skipped)

    def _fill(self) -> bool:
        chunk = next(self._chunks, b"")
        if not chunk:
            return False
        self.hasher.update(chunk)
        self.size += len(chunk)
        self._buf = memoryview(chunk)
        return True

    def _take(self, n: int) -> Iterator[memoryview]:
        """The next (up to) `n` bytes as views into the decompressor's chunks, consumed as
        they are yielded; fewer if the stream ends."""
        while n > 0 and (self._buf or self._fill()):
            view = self._buf[:n]
            self._buf = self._buf[len(view):]
            self.pos += len(view)
            n -= len(view)
            yield view

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(READ_SIZE), b""))
        return b"".join(self._take(n))  # tarfile wants exactly n bytes, across chunks too

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next `n` bytes to `fd` straight from the decompressor's buffers (no copy
        through tarfile's file object); CorruptLayer if the stream ends first."""
        for view in self._take(n):
            n -= len(view)
            while view:
                view = view[os.write(fd, view):]
        if n:
            raise CorruptLayer("unexpected end of data")

    # Forward-only seeking lets tarfile read members in place (its plain reader) instead of
    # its stream mode, which re-slices a whole buffer on every small read.
    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.pos + offset if whence == 1 else -1
        if target < self.pos:
            raise CorruptLayer(f"the layer stream cannot seek back (from {self.pos} to {target})")
        for _ in self._take(target - self.pos):
            pass  # past the end it stops: the next read finds nothing, as with a file
        return self.pos

    def drain(self) -> None:
        """Read what follows the tar's end: it counts in the diff_id as in containerd."""
        self._buf = memoryview(b"")
        for chunk in self._chunks:
            self.hasher.update(chunk)
            self.size += len(chunk)

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.hasher.hexdigest()
