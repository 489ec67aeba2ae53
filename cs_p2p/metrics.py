"""Prometheus metrics: what an operator asks first — is it working, how much did it save the
registry, which peer is slow, why did a pull go to the registry.

Counters are bumped where the work happens (fetcher, peer server, mirror, content service);
what is a state rather than an event (disk used, open ingests, peers known) is read when
`/metrics` is scraped (`NodeCollector`), so there is nothing to keep in step.  One registry
per process: a daemon is one process.

Names follow Prometheus conventions: `cs_p2p_…_total` for counters, `_bytes` and `_seconds`
in the unit's name, labels with a small fixed set of values (never a digest or an address
that grows without bound).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Lookups on a LAN take milliseconds; a registry fallback takes seconds.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

FETCHED_BYTES = Counter(
    "cs_p2p_fetched_bytes_total",
    "Blob bytes this node fetched, by source: peer (a holder), inflight_peer (a node still "
    "downloading it), registry (the registry finishing a fetch peers could not).",
    ["source"], registry=REGISTRY)
WRITTEN_BYTES = Counter(
    "cs_p2p_written_bytes_total",
    "Blob bytes containerd wrote and committed itself (it downloaded them from a registry).",
    registry=REGISTRY)
CACHE_RETURNED_BYTES = Counter(
    "cs_p2p_cache_returned_bytes_total",
    "Blob bytes handed back to containerd from this node's cache (no network).", registry=REGISTRY)
READ_BYTES = Counter(
    "cs_p2p_read_bytes_total", "Bytes served to containerd by the content API's Read.", registry=REGISTRY)
MIRROR_BYTES = Counter(
    "cs_p2p_mirror_bytes_total",
    "Blob bytes the registry mirror served to containerd, by source: local (held here, or "
    "fetched from peers first) or registry (passed through from upstream).",
    ["source"], registry=REGISTRY)
MIRROR_REQUESTS = Counter(
    "cs_p2p_mirror_requests_total", "Registry mirror requests, by kind and outcome.",
    ["kind", "outcome"], registry=REGISTRY)
MIRROR_REFUSALS = Counter(
    "cs_p2p_mirror_refusals_total",
    "Mirror requests refused for access, by reason: unauthorized (the registry said no to these "
    "credentials), not_in_repository (the registry has no such digest in that repository), "
    "outage_unknown_credentials / outage_not_in_repository (registry unreachable and nothing recorded "
    "allows it), purged.", ["reason"], registry=REGISTRY)
MIRROR_ACCESS_CHECKS = Counter(
    "cs_p2p_mirror_access_checks_total",
    "Access checks of mirror requests, by how they were answered: cached (a fresh confirmation), "
    "registry (a request to the registry), outage (records kept from before the registry went down).",
    ["result"], registry=REGISTRY)
UPLOADED_BYTES = Counter(
    "cs_p2p_uploaded_bytes_total", "Blob bytes this node's peer server sent to peers.", registry=REGISTRY)
FETCHES_STARTED = Counter(
    "cs_p2p_fetches_started_total", "Fetches of a blob from peers started.", registry=REGISTRY)
FETCHES = Counter(
    "cs_p2p_fetches_total", "Fetches of a blob from peers that ended, by result.", ["result"], registry=REGISTRY)
PIECE_RETRIES = Counter(
    "cs_p2p_piece_retries_total", "Pieces asked for again after a provider failed or was busy.", registry=REGISTRY)
PROVIDERS_BANNED = Counter(
    "cs_p2p_providers_banned_total", "Providers banned, by reason.", ["reason"], registry=REGISTRY)
DHT_LOOKUPS = Histogram(
    "cs_p2p_dht_lookup_seconds", "DHT provider lookups and their latency, by result.", ["result"],
    buckets=_LATENCY, registry=REGISTRY)
INFO_LATENCY = Histogram(
    "cs_p2p_info_seconds",
    "The content API's Info (it runs inside containerd's metadata transaction), by result.",
    ["result"], buckets=_LATENCY, registry=REGISTRY)
LOOP_LAG = Histogram(
    "cs_p2p_event_loop_lag_seconds",
    "How late the event loop ran a timer (sampled every 20 ms): time the loop was blocked, during which "
    "containerd's calls (Info inside its metadata lock) wait.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY)
GRPC_CALLS = Counter(
    "cs_p2p_grpc_calls_total", "gRPC calls from containerd, by method and status code.",
    ["method", "code"], registry=REGISTRY)

BAN_REASONS = ("sent corrupt data", "unreachable", "failed a proof of storage")


def ban_reason(why: str) -> str:
    """The label for a ban: one of a few fixed reasons (the log line has the details)."""
    return why.replace(" ", "_") if why in BAN_REASONS else "other"


class Timer:
    """`with Timer(hist, result="found") as t: …; t.result = "not_found"` observes once."""

    def __init__(self, hist: Histogram, result: str = "ok") -> None:
        self.hist = hist
        self.result = result

    def __enter__(self) -> "Timer":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.hist.labels(result="error" if exc_type and self.result == "ok" else self.result).observe(
            time.monotonic() - self.t0)


class NodeCollector(Collector):
    """States read at scrape time: disk used, open ingests, peers known, fetches under way.
    Each is a callable its owner hands in (the daemon wires them), so that this module, which
    every layer writes to, knows none of them."""

    def __init__(self, usage: Callable[[], Any], cache_budget: Callable[[], int], peers_known: Callable[[], int],
                 inflight: Callable[[], int], membership: str = "open",
                 dht_alone: Callable[[], bool] = lambda: False) -> None:
        self.dht_alone = dht_alone  # the DHT found no other node (`DhtNode.alone`)
        self.usage = usage  # -> an object with blob_bytes, cached_bytes, ingest_bytes, blobs, cached, ingests
        self.cache_budget = cache_budget
        self.peers_known = peers_known
        self.inflight = inflight
        self.membership = membership

    def collect(self) -> Iterable[GaugeMetricFamily]:
        usage = self.usage()
        disk = GaugeMetricFamily("cs_p2p_disk_bytes", "Bytes on disk, by what they are.", labels=["kind"])
        disk.add_metric(["blobs"], usage.blob_bytes)
        disk.add_metric(["cache"], usage.cached_bytes)
        disk.add_metric(["ingests"], usage.ingest_bytes)
        yield disk
        count = GaugeMetricFamily("cs_p2p_blobs", "Blobs held, by where.", labels=["where"])
        count.add_metric(["containerd"], usage.blobs)
        count.add_metric(["cache"], usage.cached)
        yield count
        yield GaugeMetricFamily("cs_p2p_cache_budget_bytes", "The cache's budget (cache-max-bytes).",
                                value=self.cache_budget())
        yield GaugeMetricFamily("cs_p2p_ingests_open", "containerd's ingests (writes) open on this node.",
                                value=usage.ingests)
        yield GaugeMetricFamily("cs_p2p_fetches_inflight", "Fetches from peers under way.", value=self.inflight())
        mode = GaugeMetricFamily("cs_p2p_membership", "How members prove membership: 1 for the node's mode "
                                 "(open: no token, no keys; anyone who reaches the node is a member).",
                                 labels=["mode"])
        mode.add_metric([self.membership], 1)
        yield mode
        yield GaugeMetricFamily("cs_p2p_peers_known", "Nodes in this node's DHT routing table.",
                                value=self.peers_known())
        yield GaugeMetricFamily("cs_p2p_dht_alone", "1 while this node's DHT has found no other node (bootstrap "
                                "contacts unreachable, wrong, or of another address family): every pull then goes "
                                "to the registry.", value=int(self.dht_alone()))


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def register_node(usage: Callable[[], Any], cache_budget: Callable[[], int], peers_known: Callable[[], int],
                  inflight: Callable[[], int], membership: str = "open",
                  dht_alone: Callable[[], bool] = lambda: False) -> NodeCollector:
    collector = NodeCollector(usage, cache_budget, peers_known, inflight, membership, dht_alone)
    REGISTRY.register(collector)
    return collector
