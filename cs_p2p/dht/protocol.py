"""Kademlia protocol with provider-record RPCs.

Sharp edges of `kademlia`/`rpcudp` guarded here:
- a handler that raises sends no reply, and the caller waits out its whole timeout:
  every RPC of ours catches bad input and answers `{"error": ...}` instead;
- replies must fit the 8 KiB datagram cap: `get_providers` returns at most
  `MAX_RECORDS_PER_REPLY` records and the usual k neighbours;
- calls to peers that are gone wait `wait_timeout` (5 s by default): lookups use a
  shorter timeout, since `Info` must answer quickly;
- undecodable datagrams made rpcudp raise in a task nobody awaits: they are dropped here.

With a cluster token (`auth.Sealer`), every datagram in and out is sealed; one that does
not open (no token, another token, forged, stale, replayed) is dropped without a reply.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from ..auth import AuthError, Sealer
from .providers import ProviderRecord, ProviderStore
from .tags import TagRecord, TagStore

log = logging.getLogger("cs_p2p.dht")

MAX_RECORDS_PER_REPLY = 40  # 40 x ~70 bytes + 20 neighbours x ~45 bytes < 8 KiB


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 20


class ProviderProtocol(KademliaProtocol):
    def __init__(self, source_node: Node, storage: Any, ksize: int, wait_timeout: float = 1.0,
                 sealer: Sealer | None = None) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = wait_timeout
        self.providers = ProviderStore()
        self.tags = TagStore()
        self.sealer = sealer
        self.dropped = 0  # datagrams refused (unauthenticated, replayed or malformed)

    def connection_made(self, transport) -> None:
        super().connection_made(_SealingTransport(transport, self.sealer) if self.sealer else transport)

    def datagram_received(self, data: bytes, addr) -> None:
        if self.sealer is not None:
            try:
                data = self.sealer.open(data)
            except AuthError as exc:
                self.dropped += 1
                log.debug("datagram dropped", extra={"from": f"{addr[0]}:{addr[1]}", "reason": str(exc)})
                return
        asyncio.ensure_future(self._solve_safely(data, addr))

    async def _solve_safely(self, data: bytes, addr) -> None:
        try:
            await self._solve_datagram(data, addr)
            return
        except Exception as exc:  # undecodable or malformed: drop, as if never received
            reason = repr(exc)
        self.dropped += 1
        log.debug("malformed datagram dropped", extra={"from": f"{addr[0]}:{addr[1]}", "reason": reason})

    async def _accept_request(self, msg_id, data, address):
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:
            self.dropped += 1
            log.debug("malformed request dropped", extra={"from": f"{address[0]}:{address[1]}", "reason": repr(exc)})

    def _sender_node(self, sender: tuple[str, int], nodeid: object) -> Node | None:
        if not _is_key(nodeid):
            return None
        node = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(node)
        return node

    def rpc_add_provider(self, sender, nodeid, key, record) -> Any:
        node = self._sender_node(sender, nodeid)
        if node is None or not _is_key(key):
            return {"error": "bad node id or key"}
        try:
            rec = ProviderRecord.from_wire(record)
        except ValueError as exc:
            return {"error": str(exc)}
        if rec.node_id != nodeid:
            return {"error": "a node announces only itself"}
        if not self.providers.add(key, rec):
            return {"error": "too many records from this node"}
        return True

    def rpc_remove_provider(self, sender, nodeid, key) -> Any:
        if self._sender_node(sender, nodeid) is None or not _is_key(key):
            return {"error": "bad node id or key"}
        self.providers.remove(key, nodeid)  # only the sender's own record
        return True

    def rpc_get_providers(self, sender, nodeid, key) -> Any:
        node = self._sender_node(sender, nodeid)
        if node is None or not _is_key(key):
            return {"error": "bad node id or key"}
        records = [r.to_wire() for r in self.providers.get(key)[:MAX_RECORDS_PER_REPLY]]
        neighbors = self.router.find_neighbors(Node(key), exclude=node)
        return {"providers": records, "nodes": [tuple(n) for n in neighbors]}

    def rpc_add_tag(self, sender, nodeid, key, record) -> Any:
        if self._sender_node(sender, nodeid) is None or not _is_key(key):
            return {"error": "bad node id or key"}
        try:
            rec = TagRecord.from_wire(record)
        except ValueError as exc:
            return {"error": str(exc)}
        if rec.node_id != nodeid:
            return {"error": "a node publishes only its own tag records"}
        self.tags.add(key, rec)
        return True

    def rpc_get_tags(self, sender, nodeid, key) -> Any:
        node = self._sender_node(sender, nodeid)
        if node is None or not _is_key(key):
            return {"error": "bad node id or key"}
        records = [r.to_wire() for r in self.tags.get(key)[:MAX_RECORDS_PER_REPLY // 4]]
        neighbors = self.router.find_neighbors(Node(key), exclude=node)
        return {"tags": records, "nodes": [tuple(n) for n in neighbors]}

    async def call_add_tag(self, node: Node, key: bytes, rec: TagRecord) -> bool:
        result = await self.add_tag((node.ip, node.port), self.source_node.id, key, rec.to_wire())
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_get_tags(self, node: Node, key: bytes) -> tuple[list[TagRecord], list[Node]] | None:
        result = await self.get_tags((node.ip, node.port), self.source_node.id, key)
        return self._records_and_nodes(result, node, "tags", TagRecord.from_wire)

    async def call_add_provider(self, node: Node, key: bytes, rec: ProviderRecord) -> bool:
        result = await self.add_provider((node.ip, node.port), self.source_node.id, key, rec.to_wire())
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_remove_provider(self, node: Node, key: bytes) -> bool:
        result = await self.remove_provider((node.ip, node.port), self.source_node.id, key)
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_get_providers(self, node: Node, key: bytes) -> tuple[list[ProviderRecord], list[Node]] | None:
        """Records and closer nodes from `node`, or None if it did not answer sensibly."""
        result = await self.get_providers((node.ip, node.port), self.source_node.id, key)
        return self._records_and_nodes(result, node, "providers", ProviderRecord.from_wire)

    def _records_and_nodes(self, result, node: Node, field: str, parse):
        self.handle_call_response(result, node)
        ok, reply = result
        if not ok or not isinstance(reply, dict) or field not in reply or not isinstance(reply[field], list):
            return None
        records, nodes = [], []
        for raw in reply[field][:MAX_RECORDS_PER_REPLY]:
            try:
                records.append(parse(raw))
            except ValueError:
                continue  # one bad record does not spoil the rest
        raw_nodes = reply.get("nodes")
        for raw in raw_nodes if isinstance(raw_nodes, list) else []:
            if isinstance(raw, (list, tuple)) and len(raw) == 3 and _is_key(raw[0]):
                nodes.append(Node(raw[0], raw[1], raw[2]))
        return records, nodes


class _SealingTransport:
    """The datagram transport as rpcudp sees it: everything sent is sealed first."""

    def __init__(self, inner, sealer: Sealer) -> None:
        self._inner = inner
        self._sealer = sealer

    def sendto(self, data: bytes, addr=None) -> None:
        self._inner.sendto(self._sealer.seal(data), addr)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
