"""`cs-p2p status`: what the local daemon is doing, read from its admin socket and printed as
a few tables (or as JSON for scripts)."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import IO

from .admin import PURGE_PATH, STATUS_PATH, TIMELINE_PATH
from .placement.preheat_client import human


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def fetch_status(path: str, timeout: float = 10.0) -> dict:
    return _ask(path, "GET", STATUS_PATH, None, timeout)


def fetch_timeline(path: str, since: float = 0.0, timeout: float = 10.0) -> list[dict]:
    return _ask(path, "GET", f"{TIMELINE_PATH}?since={since}", None, timeout)  # type: ignore[return-value]


def render_timeline(events: list[dict], t0: float | None = None) -> str:
    """The events one a line, in seconds from `t0` (default: the first event), then the waits
    summed by reason: where a pull's time went."""
    if not events:
        return "no events\n"
    t0 = events[0]["at"] if t0 is None else t0
    lines = []
    waits: dict[str, list[float]] = {}
    for e in events:
        at = f"{e['at'] - t0:+8.3f}"
        digest = _short(e.get("digest") or "")
        if e["kind"] == "wait":
            waits.setdefault(e["reason"], []).append(e["seconds"])
            if e["seconds"] >= 0.05:  # the small ones only in the sums below
                lines.append(f"{at}  wait {e['reason']:<13} {e['seconds']:7.3f} s  {digest}"
                             + (f"  {e['addr']}" if e.get("addr") else ""))
        elif e["kind"] == "fetch_done":
            sources = ", ".join(f"{addr} {first - t0:+.2f}..{last - t0:+.2f} {human(n)}"
                                for addr, (first, last, n) in sorted(e["sources"].items(), key=lambda kv: kv[1][0]))
            lines.append(f"{at}  fetch_done          {digest}  started {e['started'] - t0:+.2f}; {sources}")
        else:
            extra = "  ".join(f"{k}={v}" for k, v in e.items() if k not in ("at", "kind", "digest"))
            lines.append(f"{at}  {e['kind']:<19} {digest}  {extra}".rstrip())
    lines.append("waits by reason: " + (", ".join(f"{r} {sum(v):.2f} s ({len(v)}x, longest {max(v):.2f} s)"
                                                  for r, v in sorted(waits.items(), key=lambda kv: -sum(kv[1])))
                                        or "none"))
    return "\n".join(lines) + "\n"


class Refused(Exception):
    """The daemon answered, with an error of the request's own (4xx)."""


def _ask(path: str, method: str, what: str, body: dict | None, timeout: float) -> dict:
    conn = _UnixConnection(path, timeout)
    try:
        conn.request(method, what, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        data = resp.read()
        if 400 <= resp.status < 500:
            raise Refused(data.decode(errors="replace"))
        if resp.status != 200:
            raise OSError(f"{path} answered {resp.status}: {data[:200]!r}")
        return json.loads(data)
    finally:
        conn.close()


def purge(path: str, target: str, as_json: bool, out: IO[str] = sys.stdout) -> int:
    """`cs-p2p purge`: the daemon issues it; this prints what was purged."""
    try:
        done = _ask(path, "POST", PURGE_PATH, {"target": target}, timeout=120)
    except Refused as exc:
        print(f"cs-p2p: purge {target}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"cs-p2p: no daemon answered at {path} ({exc}); is `cs-p2p serve` running with this root?",
              file=sys.stderr)
        return 2
    if as_json:
        out.write(json.dumps(done, indent=2) + "\n")
        return 0
    what = f"{done['reference']} and " if done["reference"] else ""
    out.write(f"purged {what}{len(done['digests'])} blob(s); told {done['contacts_told']} of "
              f"{done['contacts']} contacts now, the rest of the cluster within a minute\n")
    for digest in done["digests"]:
        out.write(f"  {digest}\n")
    for digest in done["unread_manifests"]:
        out.write(f"  (no node holds {_short(digest)} as a manifest: purged alone, nothing it names)\n")
    out.write("blobs a node's containerd still references stay with it, no longer shared\n")
    return 0


def _short(digest: str) -> str:
    return digest[:19]


def _sources(sources: dict) -> str:
    return ", ".join(f"{addr} {human(n)}" for addr, n in sorted(sources.items(), key=lambda kv: -kv[1])) or "-"


def _ago(at: float) -> str:
    seconds = max(0, time.time() - at)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def render(st: dict) -> str:
    lines = [
        f"node       {st.get('node_id') or '- (no DHT)'}",
        f"version    {st['version']}, up {st['uptime_seconds']:.0f} s, membership {st['membership']}",
        "listening  " + ", ".join(f"{k} {v}" for k, v in st["listeners"].items()),
        f"peers      {len(st['peers'])}" + (f": {', '.join(st['peers'][:8])}" + (" …" if len(st['peers']) > 8 else "")
                                           if st["peers"] else ""),
        f"blobs      {st['blobs']['count']} held for containerd, {human(st['blobs']['bytes'])}",
        f"cache      {st['cache']['count']} blobs, {human(st['cache']['bytes'])} of "
        f"{human(max(st['cache']['budget_bytes'], 0))}",
        f"ingests    {st['ingests_open']} open",
    ]
    if st.get("dht_alone"):
        lines += ["", f"WARNING    the DHT found no other node: {st['dht_alone']}; every pull goes to the registry"]
    if st.get("open_on_network"):
        lines += ["", "WARNING    open membership on the network (" + ", ".join(st["open_on_network"]) + "): any host "
                  "that reaches them downloads every blob this node holds; configure cluster-token-file or "
                  "per-node keys"]
    refusals = st.get("mirror_refusals") or {}
    if refusals or st.get("purges"):
        lines += ["", f"ACCESS     mirror refusals: " + (", ".join(f"{k} {v}" for k, v in sorted(refusals.items()))
                                                        or "none") + f"; purges known: {st.get('purges', 0)}"]
    lines += ["", f"FETCHING ({len(st['fetches'])})"]
    if st["fetches"]:
        lines.append(f"  {'DIGEST':<19}  {'SIZE':>10}  {'DONE':>5}  SOURCES")
        for f in st["fetches"]:
            done = f["done_bytes"] / f["size"] if f["size"] else 1.0
            lines.append(f"  {_short(f['digest']):<19}  {human(f['size']):>10}  {done:>5.0%}  {_sources(f['sources'])}")
    lines += ["", f"RECENT FETCHES ({len(st['recent_fetches'])})"]
    if st["recent_fetches"]:
        lines.append(f"  {'DIGEST':<19}  {'SIZE':>10}  {'RESULT':<9}  {'WHEN':>11}  SOURCES")
        for f in st["recent_fetches"]:
            lines.append(f"  {_short(f['digest']):<19}  {human(f['size']):>10}  {f['result']:<9}  "
                         f"{_ago(f['at']):>11}  {_sources(f['sources'])}" + (f"  ({f['error']})" if f.get("error") else ""))
    lines += ["", f"RECENT BANS ({len(st['recent_bans'])}; banned now: {len(st['banned_now'])})"]
    for b in st["recent_bans"]:
        lines.append(f"  {b['addr']:<21}  {b['reason']:<26}  {_ago(b['at']):>11}  for {b['seconds']:.0f} s  "
                     f"({_short(b['digest'])})")
    return "\n".join(lines) + "\n"


def status(path: str, as_json: bool, out: IO[str] = sys.stdout, timeline: float | None = None) -> int:
    """`timeline`: print the events of the last that many seconds instead (`cs_p2p.timeline`)."""
    try:
        if timeline is not None:
            events = fetch_timeline(path, time.time() - timeline)
            out.write(json.dumps(events, indent=1) + "\n" if as_json else render_timeline(events))
            return 0
        st = fetch_status(path)
    except (OSError, ValueError) as exc:
        print(f"cs-p2p: no daemon answered at {path} ({exc}); is `cs-p2p serve` running with this root?",
              file=sys.stderr)
        return 2
    out.write(json.dumps(st, indent=2) + "\n" if as_json else render(st))
    return 0
