"""`cs-p2p locate DIGEST`: join the DHT for a moment as a client and print who provides a blob."""

from __future__ import annotations

import os
import sys
import time

from ..config import ConfigError
from ..digests import parse_digest
from ..errors import InvalidArgument
from .node import DhtNode


async def locate(digest: str, bootstrap: list[str]) -> int:
    try:
        parse_digest(digest)
    except InvalidArgument as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 2
    node = DhtNode(os.urandom(20), "0.0.0.0:0")  # a client: it provides nothing
    await node.listen("0.0.0.0", 0)
    try:
        try:
            met = await node.bootstrap(bootstrap)
        except ConfigError as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        if not met:
            print(f"cs-p2p: no DHT node answered at {', '.join(bootstrap)}", file=sys.stderr)
            return 1
        providers = await node.find_providers(digest)
    finally:
        node.stop()
    if not providers:
        print(f"no provider of {digest}")
        return 1
    print(f"{'NODE':<40} {'ADDRESS':<24} {'SIZE':>12} EXPIRES IN")
    for rec in providers:
        print(f"{rec.node_id.hex():<40} {rec.addr:<24} {rec.size:>12} {int(rec.expires - time.time())}s")
    return 0
