"""Zero-copy decoding of WriteContentRequest, the one message on the ingest hot path.

protobuf's parser copies the `data` field (up to 16 MiB) out of the received buffer into
a new bytes object.  This decoder walks the wire format itself and hands out `data` as a
memoryview into the received buffer, which hashlib and os.pwrite take as they are.
Everything else about the message is decoded exactly as protobuf does (unknown fields
skipped, last value wins, int64 two's complement); tests/unit/test_wire.py compares the
two on random messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class DecodeError(ValueError):
    pass


@dataclass
class WriteRequest:
    """The fields of containerd.services.content.v1.WriteContentRequest."""

    action: int = 0
    ref: str = ""
    total: int = 0
    expected: str = ""
    offset: int = 0
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    labels: dict[str, str] = field(default_factory=dict)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf: memoryview):
    """Yield (field number, wire type, value) where value is an int or a memoryview."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise DecodeError("field number 0")
        if wt == _VARINT:
            value, pos = _varint(buf, pos)
        elif wt == _LEN:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise DecodeError("truncated length-delimited field")
            value, pos = buf[pos : pos + n], pos + n
        elif wt == _I64:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wt == _I32:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise DecodeError(f"unsupported wire type {wt}")
        if pos > len(buf):
            raise DecodeError("truncated fixed-size field")
        yield num, wt, value


def _text(value: memoryview) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError("string field is not valid UTF-8") from None


def decode_write_request(raw: bytes) -> WriteRequest:
    buf = memoryview(raw)
    req = WriteRequest()
    for num, wt, value in _fields(buf):
        if num == 1 and wt == _VARINT:
            req.action = _int64(value)  # enum: int32 on the wire, sign-extended
        elif num == 2 and wt == _LEN:
            req.ref = _text(value)
        elif num == 3 and wt == _VARINT:
            req.total = _int64(value)
        elif num == 4 and wt == _LEN:
            req.expected = _text(value)
        elif num == 5 and wt == _VARINT:
            req.offset = _int64(value)
        elif num == 6 and wt == _LEN:
            req.data = value
        elif num == 7 and wt == _LEN:
            key = val = ""
            for enum_, ewt, evalue in _fields(value):
                if enum_ == 1 and ewt == _LEN:
                    key = _text(evalue)
                elif enum_ == 2 and ewt == _LEN:
                    val = _text(evalue)
            req.labels[key] = val
    return req


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request that could not be decoded, so the handler can answer
    INVALID_ARGUMENT (grpc itself would answer INTERNAL and log a traceback)."""

    reason: str


def tolerant(decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(raw: bytes) -> Any:
        try:
            return decode(raw)
        except Exception as exc:  # protobuf's DecodeError, ours, or a bad UTF-8 string
            return Malformed(f"malformed request: {exc}")

    return run
