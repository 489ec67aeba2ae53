"""The zero-copy WriteContentRequest decoder agrees with protobuf on every message."""

from __future__ import annotations

import random

import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p.service.wire import DecodeError, decode_write_request


def _random_request(rng: random.Random) -> pb.WriteContentRequest:
    def text() -> str:
        return "".join(rng.choice("abcé/:-_0123456789ü") for _ in range(rng.randrange(0, 30)))

    return pb.WriteContentRequest(
        action=rng.choice([0, 1, 2]),
        ref=text(),
        total=rng.choice([0, 1, 2**40, -1, -(2**63), 2**63 - 1, rng.randrange(-(2**63), 2**63)]),
        expected=text(),
        offset=rng.choice([0, 127, 128, 2**31, -5, rng.randrange(-(2**63), 2**63)]),
        data=rng.randbytes(rng.choice([0, 1, 300, 70000])),
        labels={text(): text() for _ in range(rng.randrange(0, 4))},
    )


@pytest.mark.parametrize("seed", range(300))
def test_decoder_matches_protobuf(seed):
    msg = _random_request(random.Random(seed))
    raw = msg.SerializeToString()
    got = decode_write_request(raw)
    assert (got.action, got.ref, got.total, got.expected, got.offset) == (
        msg.action, msg.ref, msg.total, msg.expected, msg.offset)
    assert bytes(got.data) == msg.data
    assert got.labels == dict(msg.labels)


def test_data_is_not_copied():
    raw = pb.WriteContentRequest(action=pb.WRITE, data=b"x" * 100000).SerializeToString()
    got = decode_write_request(raw)
    assert isinstance(got.data, memoryview) and got.data.obj is raw


def test_unknown_fields_are_skipped_and_last_value_wins():
    raw = (pb.WriteContentRequest(offset=5).SerializeToString()
           + b"\xa0\x06\x01"  # field 100, varint
           + b"\xaa\x06\x02hi"  # field 101, bytes
           + pb.WriteContentRequest(offset=9, ref="r").SerializeToString())
    got = decode_write_request(raw)
    assert got.offset == 9 and got.ref == "r"


@pytest.mark.parametrize("raw", [b"\x08", b"\x32\x05ab", b"\x12\x02\xff\xfe", b"\x00\x01", b"\x0b", b"\x08" + b"\xff" * 11])
def test_malformed_messages_are_rejected(raw):
    with pytest.raises(DecodeError):
        decode_write_request(raw)
