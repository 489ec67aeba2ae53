"""`cs-p2p preheat`: ask a node to preheat an image and show its progress on the terminal."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import IO

from .preheat import PATH


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(event: dict) -> str | None:
    """One line for the terminal, or None for events not worth a line."""
    kind = event.get("event")
    if kind == "resolved":
        return f"{event['ref']} is {event['digest']}"
    if kind == "blob":
        return (f"  {event['digest'][:19]}  {event['kind']:<8} {human(event['size']):>10}  "
                f"{event['from']:<18} {event['seconds']:.1f} s")
    if kind == "holders":
        return f"  holders: {event['at_floor']}/{event['blobs']} blobs have {event['replicas']}"
    if kind == "error":
        return f"error: {event['message']}"
    if kind == "done":
        short = len(event["below_floor"])
        state = ("every blob has" if event["ok"] else
                 f"{short} blob{'' if short == 1 else 's'} {'has' if short == 1 else 'have'} fewer than")
        return (f"{'preheated' if event['ok'] else 'preheat incomplete'}: {event['blobs']} blobs, "
                f"{human(event['bytes'])} in {event['seconds']:.1f} s; from the registry "
                f"{human(event['from_registry'])}, from peers {human(event['from_peers'])}, already held "
                f"{human(event['held'])}; {state} {event['replicas']} holders")
    return None


def preheat(ref: str, platforms: list[str], mirror: str, as_json: bool, out: IO[str] = sys.stdout) -> int:
    body = json.dumps({"ref": ref, "platforms": platforms}).encode()
    req = urllib.request.Request(f"http://{mirror}{PATH}", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    last: dict = {}
    try:
        with urllib.request.urlopen(req, timeout=3600) as resp:
            for line in resp:
                last = json.loads(line)
                text = line.decode().rstrip() if as_json else describe(last)
                if text:
                    print(text, file=out, flush=True)
    except urllib.error.HTTPError as exc:
        print(f"cs-p2p: preheat refused: {exc.read().decode(errors='replace') or exc.reason}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError) as exc:
        print(f"cs-p2p: no node's mirror at {mirror} ({exc}); is cs-p2p serving with --mirror-registry?",
              file=sys.stderr)
        return 2
    return 0 if last.get("event") == "done" and last.get("ok") else 1
