"""Who copies a blob that fell below the replication floor: the nodes closest to its key, the
next ones only after the closer ones had their turn."""

from __future__ import annotations

from cs_p2p.placement.floor import rank, turn_to_act

KEY = bytes(20)


def node(distance: int) -> bytes:
    """A node id at `distance` (XOR) from KEY."""
    return distance.to_bytes(20, "big")


def test_rank_is_the_place_by_xor_distance_to_the_key():
    others = [node(9), node(2), node(40)]
    assert rank(node(1), KEY, others) == 0
    assert rank(node(5), KEY, others) == 1
    assert rank(node(50), KEY, others) == 3
    assert rank(node(5), KEY, others + [node(5)]) == 1  # itself listed among the candidates


def test_the_closest_act_at_once_and_the_next_ones_only_after_waiting_their_turn():
    interval = 10.0
    assert turn_to_act(place=0, deficit=1, short_for=0.0, interval=interval)
    assert turn_to_act(place=1, deficit=2, short_for=0.0, interval=interval)
    assert not turn_to_act(place=1, deficit=1, short_for=interval, interval=interval)
    assert turn_to_act(place=1, deficit=1, short_for=2 * interval, interval=interval)
    assert not turn_to_act(place=3, deficit=1, short_for=5 * interval, interval=interval)
    assert turn_to_act(place=3, deficit=1, short_for=6 * interval, interval=interval)
    assert not turn_to_act(place=0, deficit=0, short_for=1e9, interval=interval)
