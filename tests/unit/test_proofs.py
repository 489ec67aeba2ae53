"""Proofs of storage: what counts as a failed proof, and the challenge's shape."""

from __future__ import annotations

import pytest

from cs_p2p.placement.challenger import verdict
from cs_p2p.proofs import MAX_RANGE, parse_challenge, pick

D = "sha256:" + "ab" * 32


def test_a_holder_fails_by_not_answering_not_holding_lying_or_not_signing():
    assert verdict("aa", 200, "aa", signed=True) is None
    assert verdict(None, 200, "anything", signed=True) is None  # no copy here: the hash cannot be judged
    assert verdict("aa", 200, "bb", signed=True) == "wrong answer"
    assert verdict("aa", 404, None, signed=True) == "does not hold the blob"
    assert verdict(None, None, None, signed=False) == "no answer"
    assert verdict("aa", 200, "aa", signed=False) == "answer not signed by the holder"
    assert verdict("aa", 503, None, signed=True) is None  # busy: neither proof nor failure


def test_challenges_are_fresh_bounded_and_inside_the_blob():
    seen = set()
    for _ in range(50):
        ch = pick(D, 10 << 20, budget=1 << 30)
        assert ch.length == MAX_RANGE and 0 <= ch.offset <= (10 << 20) - MAX_RANGE
        seen.add(ch.nonce)
    assert len(seen) == 50
    small = pick(D, 100, budget=1 << 30)
    assert (small.offset, small.length) == (0, 100)
    assert pick(D, 10 << 20, budget=0) is None
    assert pick(D, 10 << 20, budget=1000).length == 1000


@pytest.mark.parametrize("query", [
    {"nonce": "00" * 16, "offset": "0"},
    {"nonce": "zz", "offset": "0", "length": "10"},
    {"nonce": "00" * 16, "offset": "-1", "length": "10"},
    {"nonce": "00" * 16, "offset": "0", "length": "0"},
])
def test_malformed_challenges_are_refused(query):
    with pytest.raises(ValueError):
        parse_challenge(D, query)
