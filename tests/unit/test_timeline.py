"""The timeline (`cs_p2p.timeline`): events kept in order and bounded, waits summed by reason
in the metric and printed where a pull's time went."""

from __future__ import annotations

import time

import pytest

from cs_p2p import metrics
from cs_p2p.status_client import render_timeline
from cs_p2p.timeline import Timeline, waits_by_reason

D = "sha256:" + "ab" * 32


def wait_total(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("cs_p2p_wait_seconds_total", {"reason": reason}) or 0.0


def test_waits_are_summed_by_reason_and_kept_as_events_in_order():
    t = Timeline(max_events=100)
    before = wait_total("relay")
    t0 = time.time()
    t.mark("info_claimed", D, size=10)
    t.waited("relay", 0.25, D, addr="10.0.0.2:5001")
    t.waited("relay", 0.0004, D)  # counted, too short to keep
    t.waited("apply_worker", 1.5, D)
    t.mark("fetch_done", D, size=10, started=t0, sources={"10.0.0.2:5001": [t0 + 0.1, t0 + 0.9, 10]})
    assert wait_total("relay") - before == pytest.approx(0.2504)
    events = t.events(t0)
    assert [e["kind"] for e in events] == ["info_claimed", "wait", "wait", "fetch_done"]
    assert waits_by_reason(events) == {"relay": 0.25, "apply_worker": 1.5}
    text = render_timeline(events, t0)
    assert "wait relay" in text and "10.0.0.2:5001 +0.10..+0.90" in text
    assert text.strip().splitlines()[-1].startswith("waits by reason: apply_worker 1.50 s (1x")


def test_the_timeline_keeps_only_the_newest_events():
    t = Timeline(max_events=3)
    for i in range(10):
        t.mark("apply_start", D, n=i)
    assert [e["n"] for e in t.events()] == [7, 8, 9]
