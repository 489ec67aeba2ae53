"""Operator commands that ask the DHT as a client (providing nothing, answering nothing, so
they leave no contact behind in any routing table): `cs-p2p locate DIGEST` prints who
provides a blob, `cs-p2p peers` the nodes of the network."""

from __future__ import annotations

import os
import sys
import time

from ..addresses import join_host_port
from ..config import ConfigError
from ..digests import parse_digest
from ..errors import InvalidArgument
from kademlia.node import Node

from ..membership import Membership
from .node import DhtNode
from .providers import provider_key


async def _joined_client(bootstrap: list[str], member: Membership | None) -> DhtNode | None:
    member = member or Membership()
    node_id = member.identity.node_id if member.identity else os.urandom(20)
    node = DhtNode(node_id, "0.0.0.0:0", sealer=member.dht_sealer, client=True)
    try:
        await node.listen("::", 0)  # both families: the contacts may be IPv4 or IPv6
    except OSError:  # a host without IPv6
        await node.listen("0.0.0.0", 0)
    try:
        met = await node.bootstrap(bootstrap)
    except ConfigError as exc:
        node.stop()
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return None
    if not met:
        node.stop()
        print(f"cs-p2p: no DHT node answered at {', '.join(bootstrap)}", file=sys.stderr)
        return None
    return node


async def locate(digest: str, bootstrap: list[str], member: Membership | None = None) -> int:
    try:
        parse_digest(digest)
    except InvalidArgument as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 2
    node = await _joined_client(bootstrap, member)
    if node is None:
        return 1
    try:
        providers = await node.find_providers(digest)
        demand = node.protocol.demand_heard.get(provider_key(digest), 0.0)
    finally:
        node.stop()
    if not providers:
        print(f"no provider of {digest}")
        return 1
    print(f"{'NODE':<40} {'ADDRESS':<24} {'SIZE':>12} {'STATE':<9} EXPIRES IN")
    for rec in providers:
        state = "in-flight" if rec.inflight else "cached" if rec.cached else "held"
        print(f"{rec.node_id.hex():<40} {rec.addr:<24} {rec.size:>12} {state:<9} "
              f"{int(rec.expires - time.time())}s")
    held = sum(not rec.inflight for rec in providers)  # containerd's copies and cached ones
    print(f"{held} holder{'' if held == 1 else 's'}; demand {demand:.1f} lookups/min "
          "(the most any node near the key saw)")
    return 0


async def peers(bootstrap: list[str], member: Membership | None = None) -> int:
    """Walk the network towards a few random ids and print every node that answered."""
    node = await _joined_client(bootstrap, member)
    if node is None:
        return 1
    try:
        for _ in range(3):
            await node.find_providers("sha256:" + os.urandom(32).hex())  # each walk meets more nodes
        # Around a random id: in key-pair mode the client has its node's id, and a walk around
        # its own id would leave that node out.
        contacts = node.protocol.router.find_neighbors(Node(os.urandom(20)), k=1000)
    finally:
        node.stop()
    print(f"{'NODE':<40} DHT ADDRESS")
    for n in sorted(contacts, key=lambda n: n.id):
        print(f"{n.id.hex():<40} {join_host_port(n.ip, n.port)}")
    print(f"{len(contacts)} nodes")
    return 0
