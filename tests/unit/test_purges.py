"""Purge records and the list every node keeps (`purges`)."""

from __future__ import annotations

import time

import pytest

from cs_p2p.purges import MAX_DIGESTS, PurgeList, PurgeRecord

D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
NODE = b"\x01" * 20


def test_a_record_round_trips_and_its_id_is_the_same_everywhere():
    rec = PurgeRecord(NODE, time.time(), "reg.example/app:v1", (D1, D2))
    back = PurgeRecord.from_wire(rec.to_wire())
    assert back == rec and back.id == rec.id


@pytest.mark.parametrize("wire", [
    [NODE, time.time(), "", []],  # nothing purged
    [NODE, time.time(), "", [b"x" * 31]],
    [NODE, time.time() + 3600, "", [b"x" * 32]],  # from the future
    [b"short", time.time(), "", [b"x" * 32]],
    [NODE, time.time(), "", [b"x" * 32] * (MAX_DIGESTS + 1)],
    [NODE, time.time(), 7, [b"x" * 32]],
    "not a list",
])
def test_malformed_records_are_refused(wire):
    with pytest.raises(ValueError):
        PurgeRecord.from_wire(wire)


def test_the_list_is_kept_across_restarts_and_tells_its_listeners_once(tmp_path):
    path = str(tmp_path / "purges.jsonl")
    told = []
    purges = PurgeList(path)
    purges.listeners.append(told.append)
    rec = PurgeRecord(NODE, time.time(), "reg.example/app:v1", (D1,))
    assert purges.add(rec) and not purges.add(rec)
    assert told == [rec]
    again = PurgeList(path)
    assert again.purged(D1) and not again.purged(D2)
    assert again.reference_purged_at("reg.example/app:v1") == pytest.approx(rec.issued)
    assert again.get(rec.id) == rec
    with open(path, "a") as f:
        f.write('["torn')  # a crash mid-line: the rest still loads
    assert PurgeList(path).purged(D1)
