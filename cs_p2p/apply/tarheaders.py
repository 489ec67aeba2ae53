"""Tar headers read in bounded memory and linear time, whatever the layer says.

A layer's author chooses every byte of its tar. Python's `tarfile` reads a special header
(PAX extended or global, GNU long name or link) whole into memory, however large its size
field says it is — a 255 KB gzip layer holding one 256 MiB PAX header costs 810 MB — and,
before 3.11.10 / 3.12.6, parses PAX records with regular expressions that backtrack
quadratically (CVE-2024-6232). containerd's own applier refuses special headers over 1 MiB.

`BoundedTarInfo` is the `tarinfo` class the applier opens layers with: it refuses a special
header over `MAX_SPECIAL_HEADER` bytes before reading it, parses PAX records itself in one
linear pass (so the daemon does not depend on which Python a node has), and bounds the GNU
sparse maps the same way. A refusal is a `LayerRefused` (a `tarfile.TarError` that `tarfile`
does not take for the end of the archive): the applier answers FAILED_PRECONDITION and the
snapshot is discarded.  A header with a bad checksum, or cut short, is refused the same way
rather than taken for the end of the archive.
"""

from __future__ import annotations

import tarfile

MAX_SPECIAL_HEADER = 1 << 20  # containerd's limit (archive/tar_unix.go: maxSpecialFileSize)
MAX_SPARSE_ENTRIES = MAX_SPECIAL_HEADER // 24  # a sparse map no larger than a special header
_SPECIAL = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


class LayerRefused(tarfile.TarError):
    """The layer's tar asks for more than a layer may (a header too large, a record malformed)."""


def parse_pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """`"%d %s=%s\\n"` records, in one pass: (keyword, value) pairs.  Parsing stops at padding
    (a NUL or the end); a record whose length does not fit is refused."""
    records: list[tuple[bytes, bytes]] = []
    pos, end = 0, len(buf)
    while pos < end and buf[pos] != 0:
        space = buf.find(b" ", pos, min(end, pos + 21))  # a length field has at most 20 digits
        digits = buf[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise LayerRefused(f"malformed PAX record at byte {pos}: no length")
        length = int(digits)
        if length < len(digits) + 4 or pos + length > end or buf[pos + length - 1] != 0x0A:
            raise LayerRefused(f"malformed PAX record at byte {pos}: length {length}")
        record = buf[space + 1:pos + length - 1]
        eq = record.find(b"=")
        if eq < 1:
            raise LayerRefused(f"malformed PAX record at byte {pos}: no keyword")
        records.append((record[:eq], record[eq + 1:]))
        pos += length
    return records


class BoundedTarInfo(tarfile.TarInfo):
    @classmethod
    def fromtarfile(cls, tarfile_):
        # `tarfile` takes a header with a bad checksum, or one cut short, after the first
        # member for the end of the archive, and the rest of the layer would be skipped in
        # silence (with the right diff ID, as the whole stream is hashed); containerd's Go
        # reader refuses such a layer, so does this one
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as exc:
            raise LayerRefused(f"invalid tar header at byte {tarfile_.offset}: {exc}") from None

    def _proc_member(self, tarfile_):
        if self.type in _SPECIAL and self.size > MAX_SPECIAL_HEADER:
            raise LayerRefused(f"a tar special header of {self.size} bytes (type {self.type!r}) exceeds "
                               f"{MAX_SPECIAL_HEADER} bytes")
        if self.type in _PAX_TYPES:
            return self._proc_pax(tarfile_)
        return super()._proc_member(tarfile_)

    def _proc_sparse(self, tarfile_):
        # Old GNU sparse ('S'): extension blocks follow while the last says so; each holds 21
        # entries. Bounded, as tarfile's own loop is not.
        structs, isextended, origsize = self._sparse_structs
        del self._sparse_structs
        while isextended:
            if len(structs) > MAX_SPARSE_ENTRIES:
                raise LayerRefused(f"a GNU sparse map of more than {MAX_SPARSE_ENTRIES} entries")
            buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise LayerRefused("a GNU sparse map cut short")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos:pos + 12])
                    numbytes = tarfile.nti(buf[pos + 12:pos + 24])
                except (ValueError, tarfile.InvalidHeaderError):
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)
        self.size = origsize
        return self

    def _proc_pax(self, tarfile_):
        """As `tarfile` does (POSIX.1-2008 extended and global headers, GNU sparse 0.0, 0.1
        and 1.0), with the records parsed by `parse_pax_records`."""
        buf = tarfile_.fileobj.read(self._block(self.size))
        records = parse_pax_records(buf[:self.size])
        pax_headers = tarfile_.pax_headers if self.type == tarfile.XGLTYPE else tarfile_.pax_headers.copy()
        for keyword, value in records:
            if keyword == b"hdrcharset":
                pax_headers["hdrcharset"] = value.decode("utf-8", "replace")
        encoding = tarfile_.encoding if pax_headers.get("hdrcharset") == "BINARY" else "utf-8"
        offsets: list[int] = []
        numbytes: list[int] = []
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", tarfile_.errors)
            if keyword in tarfile.PAX_NAME_FIELDS:
                value = self._decode_pax_field(raw_value, encoding, tarfile_.encoding, tarfile_.errors)
            else:
                value = self._decode_pax_field(raw_value, "utf-8", "utf-8", tarfile_.errors)
            if keyword == "GNU.sparse.offset":
                offsets.append(_number(value, keyword))
            elif keyword == "GNU.sparse.numbytes":
                numbytes.append(_number(value, keyword))
            pax_headers[keyword] = value

        try:
            next_ = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            raise tarfile.SubsequentHeaderError(str(exc)) from None

        if "GNU.sparse.map" in pax_headers:  # GNU sparse 0.1: the map in the header
            sparse = [_number(x, "GNU.sparse.map") for x in pax_headers["GNU.sparse.map"].split(",")]
            next_.sparse = list(zip(sparse[::2], sparse[1::2]))
        elif "GNU.sparse.size" in pax_headers:  # GNU sparse 0.0: a record per extent
            next_.sparse = list(zip(offsets, numbytes))
        elif pax_headers.get("GNU.sparse.major") == "1" and pax_headers.get("GNU.sparse.minor") == "0":
            self._sparse_map_10(next_, tarfile_)  # GNU sparse 1.0: the map before the data

        if self.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            next_._apply_pax_info(pax_headers, tarfile_.encoding, tarfile_.errors)
            next_.offset = self.offset
            if "size" in pax_headers:
                offset = next_.offset_data
                if next_.isreg() or next_.type not in tarfile.SUPPORTED_TYPES:
                    offset += next_._block(next_.size)
                tarfile_.offset = offset
        return next_

    @staticmethod
    def _sparse_map_10(next_: tarfile.TarInfo, tarfile_) -> None:
        """GNU sparse 1.0: decimal numbers, one a line, in blocks before the data: a count,
        then offset and size per extent; read no further than a special header may be."""
        buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
        read = len(buf)
        count_line, _, buf = buf.partition(b"\n")
        count = _number(count_line, "GNU sparse 1.0 map")
        if count > MAX_SPARSE_ENTRIES:
            raise LayerRefused(f"a GNU sparse map of {count} entries exceeds {MAX_SPARSE_ENTRIES}")
        numbers: list[int] = []
        while len(numbers) < count * 2:
            if b"\n" not in buf:
                block = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
                read += len(block)
                if not block or read > MAX_SPECIAL_HEADER:
                    raise LayerRefused("a GNU sparse 1.0 map cut short or too large")
                buf += block
                continue
            line, _, buf = buf.partition(b"\n")
            numbers.append(_number(line, "GNU sparse 1.0 map"))
        next_.offset_data = tarfile_.fileobj.tell()
        next_.sparse = list(zip(numbers[::2], numbers[1::2]))


def _number(value: str | bytes, what: str) -> int:
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not text.isdigit() or len(text) > 20:
        raise LayerRefused(f"{what}: not a number: {text[:40]!r}")
    return int(text)
