"""What this node did for its pulls, event by event, and every wait with its reason.

A rollout that is slower than its network allows is slow because something waits: a piece
held until a provider is trusted, a relay that has not received the bytes yet, an upload slot,
a lookup, an apply worker, the hash of a finished blob.  Each of those places reports here
(`waited`), and the notable moments of a pull too (`mark`: `Info` claimed a blob, a fetch's
first and last byte from each source, a layer's apply start and end).  `cs-p2p status
--timeline` and `hack/bench-cluster` print the events; `cs_p2p_wait_seconds_total{reason}` sums
the waits.  Memory is bounded: the newest `MAX_EVENTS` events are kept.

Like `metrics`, a leaf every layer writes to.
"""

from __future__ import annotations

import collections
import time

from prometheus_client import Counter

from .metrics import REGISTRY

MAX_EVENTS = 20_000
MIN_WAIT = 0.001  # shorter waits are summed in the metric but not kept as events

WAIT_REASONS = ("lookup", "announce", "probe", "claim_burst", "claim_slot", "upload_slot", "provider_busy", "relay", "unverified",
                "apply_worker", "verify", "registry_turn")
WAIT_SECONDS = Counter(
    "cs_p2p_wait_seconds_total",
    "Seconds spent waiting, by reason: lookup (a DHT walk a fetch or Info waited on), announce (a claimed "
    "fetch's own in-flight record, stored before its lookup), probe (checking that providers found can "
    "deliver, before following them), claim_burst (a claimed fetch holding off while containerd's Info "
    "calls keep coming), claim_slot (a "
    "claimed fetch waiting for one of the node's slots for them), upload_slot "
    "(a peer's request waited for one of this node's upload slots), provider_busy (a fetch backing off "
    "a provider's 503), relay (a piece asked of a node still downloading the blob, until its first "
    "byte), unverified (a Read waiting for pieces of a provider not proven honest yet), apply_worker "
    "(a layer waiting for a free apply process), verify (hashing and syncing a fetched blob before commit), "
    "registry_turn (a registry response of a blob nobody waits on, paused while blobs someone waits on stream).",
    ["reason"], registry=REGISTRY)


class Timeline:
    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self._events: collections.deque[dict] = collections.deque(maxlen=max_events)

    def mark(self, kind: str, digest: str = "", **fields) -> None:
        """Something happened now (`kind`: info_claimed, fetch_start, source_done, apply_start, ...)."""
        self._events.append({"at": time.time(), "kind": kind, "digest": digest, **fields})

    def waited(self, reason: str, seconds: float, digest: str = "", **fields) -> None:
        """A wait of `seconds` for `reason` (one of `WAIT_REASONS`) just ended."""
        if seconds <= 0:
            return
        WAIT_SECONDS.labels(reason=reason).inc(seconds)
        if seconds >= MIN_WAIT:
            self._events.append({"at": time.time(), "kind": "wait", "reason": reason,
                                 "seconds": round(seconds, 4), "digest": digest, **fields})

    def events(self, since: float = 0.0) -> list[dict]:
        """The events kept from unix time `since` on, oldest first."""
        return [e for e in self._events if e["at"] >= since]


TIMELINE = Timeline()


def waits_by_reason(events: list[dict]) -> dict[str, float]:
    """Seconds waited per reason in `events`."""
    total: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e["kind"] == "wait":
            total[e["reason"]] += e["seconds"]
    return dict(total)
