"""Provider records on the wire: old shapes still parse, the cache flag survives signing."""

from __future__ import annotations

import pytest

from cs_p2p.dht.providers import ProviderRecord

NODE = bytes(range(20))


@pytest.mark.parametrize("rec", [
    ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9),
    ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9, started=5.0),
    ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9, sig=b"s" * 64),
    ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9, cached=True),
    ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9, sig=b"s" * 64, cached=True),
])
def test_records_round_trip(rec):
    assert ProviderRecord.from_wire(rec.to_wire()) == rec


def test_a_record_without_the_cache_flag_keeps_its_old_shape():
    assert len(ProviderRecord(NODE, "10.0.0.1:5001", 42, 1e9).to_wire()) == 5
    assert ProviderRecord.from_wire([NODE, "10.0.0.1:5001", 42, 1e9]).cached is False
    with pytest.raises(ValueError):
        ProviderRecord.from_wire([NODE, "10.0.0.1:5001", 42, 1e9, 0.0, b"", "yes"])
