"""`cs-p2p status`: what the local daemon is doing, read from its admin socket and printed as
a few tables (or as JSON for scripts)."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import IO

from .admin import STATUS_PATH
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
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", STATUS_PATH)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"{path} answered {resp.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


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
    if st.get("open_on_network"):
        lines += ["", "WARNING    open membership on the network (" + ", ".join(st["open_on_network"]) + "): any host "
                  "that reaches them downloads every blob this node holds; configure cluster-token-file or "
                  "per-node keys"]
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


def status(path: str, as_json: bool, out: IO[str] = sys.stdout) -> int:
    try:
        st = fetch_status(path)
    except (OSError, ValueError) as exc:
        print(f"cs-p2p: no daemon answered at {path} ({exc}); is `cs-p2p serve` running with this root?",
              file=sys.stderr)
        return 2
    out.write(json.dumps(st, indent=2) + "\n" if as_json else render(st))
    return 0
