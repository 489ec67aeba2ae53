"""The Grafana dashboard in packaging/ asks only for metrics the daemon exports, with the
labels they have: a renamed metric would leave a panel silently empty."""

from __future__ import annotations

import json
import pathlib
import re

from cs_p2p import metrics
from cs_p2p.store import LocalStore

DASHBOARD = pathlib.Path(__file__).resolve().parents[2] / "packaging" / "grafana" / "cs-p2p-dashboard.json"


def exported(tmp_path) -> dict[str, set[str]]:
    """Every metric family the daemon exports (name -> label names), counters and the
    scrape-time gauges alike."""
    store = LocalStore(str(tmp_path))
    collector = metrics.register_node(store.usage, lambda: store.cache.max_bytes, lambda: 0, lambda: 0)
    try:
        families: dict[str, set[str]] = {}
        for family in metrics.REGISTRY.collect():
            for sample in family.samples:
                families.setdefault(sample.name, set()).update(sample.labels)
            families.setdefault(family.name, set())
        # Labelled families have no sample until first used: their names and labels from the metric.
        for metric in (metrics.FETCHED_BYTES, metrics.MIRROR_BYTES, metrics.MIRROR_REQUESTS, metrics.FETCHES,
                       metrics.PROVIDERS_BANNED, metrics.DHT_LOOKUPS, metrics.INFO_LATENCY, metrics.GRPC_CALLS,
                       metrics.MIRROR_REFUSALS, metrics.MIRROR_ACCESS_CHECKS):
            names = metric._labelnames
            for suffix in ("", "_total", "_bucket", "_count", "_sum"):
                families.setdefault(metric._name + suffix, set()).update(names)
            families.setdefault(metric._name + "_bucket", set()).add("le")
        return families
    finally:
        metrics.REGISTRY.unregister(collector)


def test_every_panel_asks_for_exported_metrics_and_labels(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    families = exported(tmp_path)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        for name, selector in re.findall(r"(cs_p2p_\w+)(\{[^}]*\})?", expr):
            assert name in families, f"{name} is not exported ({expr})"
            for label in re.findall(r"(\w+)\s*(?:=~|!=|=)", selector or ""):
                assert label in families[name] | {"instance"}, f"{name} has no label {label}"
        for label in re.findall(r"by \(([^)]*)\)", expr):
            names = {n.strip() for n in label.split(",")}
            used = {n for n, _ in re.findall(r"(cs_p2p_\w+)(\{[^}]*\})?", expr)}
            assert names <= set().union(*(families[u] for u in used)) | {"le", "instance"}, expr


def test_the_panels_an_operator_asks_for_first_are_there():
    titles = {p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Registry bytes saved (range)", "Where containerd's blobs came from",
            "Info latency (inside containerd's metadata transaction)", "DHT lookup latency"} <= titles
