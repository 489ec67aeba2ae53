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
With key pairs (`identity.KeySealer`), datagrams are signed, the sender of each is known, a
request must name its sender's own node id, and provider and tag records carry their
publisher's signature, checked where they are stored and again by every reader.  Senders over
their datagram rate are dropped, and senders that keep failing authentication are banned
(`penalties`).

Routing tables hold only nodes that answer.  kademlia adds every node that sends a request;
an operator command (`cs-p2p locate`, `peers`) runs a short-lived client that is gone a
second later, and hundreds of those filled the tables with dead contacts that every lookup
then waited on.  Here a node that sends a request joins the table only once it has answered
a ping of ours, and a client (`client=True`) answers no request at all, so it never does.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
from typing import Any, Callable

import umsgpack

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from ..addresses import join_host_port, unmapped
from ..auth import AuthError, Sealer
from ..expiring import Expiring
from ..identity import Identity, IdentityError, KeySealer, Member
from ..penalties import PeerLimits
from ..purges import PURGE_KEY, PurgeList, PurgeRecord
from .demand import Demand
from .providers import ProviderRecord, ProviderStore, provider_key
from .rtt import RoundTrip
from .tags import TagRecord, TagStore

log = logging.getLogger("cs_p2p.dht")

MAX_RECORDS_PER_REPLY = 40  # 40 x ~70 bytes + 20 neighbours x ~45 bytes < 8 KiB
# Signed: 12 x (~140 bytes + a ~300-byte certificate) + neighbours + the datagram's own
# certificate and signature < 8 KiB.
MAX_SIGNED_RECORDS_PER_REPLY = 12
MAX_CERTS = 100_000
MAX_WATCHED = 100_000  # digests of the keys whose records this node keeps
DATAGRAMS_PER_PEER = 2000.0  # per second from one ip:port; a node announcing what it holds sends bursts
HANDOVER_PLACES = 3  # a newcomer gets a key's records from the nodes this close to it (`_hand_over`)
MAX_HANDED_OVER = 10_000  # node ids remembered as handed their records
MAX_VERIFYING = 256  # new contacts being pinged at once; more are ignored until they call again
PURGE_IDS_PER_REPLY = 200  # 20 bytes each


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == 20


class ProviderProtocol(KademliaProtocol):
    def __init__(self, source_node: Node, storage: Any, ksize: int, wait_timeout: float = 1.0,
                 sealer: Sealer | KeySealer | None = None, client: bool = False) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = wait_timeout
        self.client = client  # asks, never answers: never enters anyone's routing table
        self._verifying: dict[bytes, asyncio.Task] = {}  # new contacts being pinged
        self.providers = ProviderStore()
        # key -> digest, for the keys whose records this node keeps: the replication floor
        # (`placement`) fetches a blob by digest, and a key alone does not name it.
        self.digests: dict[bytes, str] = {}
        self.demand = Demand()  # lookups answered per key (`demand`)
        self.demand_heard: dict[bytes, float] = {}  # clients: key -> the highest demand a lookup was told
        self.tags = TagStore()
        self.sealer = sealer
        # Key-pair mode: who sent each datagram is known, and records carry signatures.
        self.identity: Identity | None = sealer.identity if isinstance(sealer, KeySealer) else None
        self.certs: dict[bytes, bytes] = {}  # node id -> certificate of publishers whose records we keep
        if self.identity is not None:
            self.certs[self.identity.node_id] = self.identity.cert_der
        self.dropped = 0  # datagrams refused (unauthenticated, replayed, malformed, over the rate)
        self.limits = PeerLimits(rate=DATAGRAMS_PER_PEER, name="dht")
        self.forged = 0  # records refused: not signed by the node they name
        # Told of a key another watcher asked this node to check now (`ReplicaFloor.asked`).
        self.on_check: Callable[[bytes], None] | None = None
        self.refuted = Expiring(MAX_WATCHED)  # (key, holder) a proof refuted here a moment ago (`refute`)
        self.round_trip = RoundTrip()  # of the replies to our requests: how long walks wait (`rtt`)
        self._handed_over: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # node ids (`_welcome`)
        self.purges: PurgeList | None = None  # purges this node keeps and hands on (`purges`)
        self.purged_keys: set[bytes] = set()  # provider keys of purged digests: no record is kept for them
        self.on_purge: Callable[[PurgeRecord, bytes], None] | None = None  # a new purge, from that node

    def connection_made(self, transport) -> None:
        super().connection_made(_Transport(transport, self.sealer))

    def datagram_received(self, data: bytes, addr) -> None:
        # An IPv6 socket gives (host, port, flowinfo, scope): nodes are (host, port), and an
        # IPv4 peer on a dual-stack socket is known by its IPv4 address (`addresses`).
        addr = (unmapped(addr[0]), addr[1])
        peer = join_host_port(*addr)
        if not self.limits.allow(peer):  # banned, or over its rate
            self.dropped += 1
            return
        if self.sealer is not None:
            try:
                data, member = self.sealer.unseal(data)
            except AuthError as exc:
                self.dropped += 1
                log.debug("datagram dropped", extra={"from": peer, "reason": str(exc)})
                self.limits.strike(peer)
                return
            if member is not None:
                addr = _Sender(addr, member)
        asyncio.ensure_future(self._solve_safely(data, addr))

    async def _solve_safely(self, data: bytes, addr) -> None:
        try:
            await self._solve_datagram(data, addr)
            return
        except Exception as exc:  # undecodable or malformed: drop, as if never received
            reason = repr(exc)
        self.dropped += 1
        log.debug("malformed datagram dropped", extra={"from": join_host_port(addr[0], addr[1]), "reason": reason})

    async def _solve_datagram(self, datagram: bytes, address) -> None:
        """rpcudp's dispatch, except that a datagram is answered or raises (and is counted as
        dropped by `_solve_safely`): none is ignored silently, and a request is answered in
        this task, not in one more left running."""
        if len(datagram) < 22 or datagram[:1] not in (b"\x00", b"\x01"):
            raise ValueError("too short, or of no known kind")
        msg_id, data = datagram[1:21], umsgpack.unpackb(datagram[21:])
        if datagram[:1] == b"\x00":
            await self._accept_request(msg_id, data, address)
        elif msg_id not in self._outstanding:
            raise ValueError("a response to no request of this node's")
        else:
            self._accept_response(msg_id, data, address)

    async def _accept_request(self, msg_id, data, address):
        if self.client:
            return
        try:
            if self.identity is not None and not _speaks_for_itself(data, address):
                raise ValueError("a request names a node id that is not its sender's")
            if (not isinstance(data, list) or len(data) != 2 or not isinstance(data[0], str)
                    or not callable(getattr(self, f"rpc_{data[0]}", None))):
                raise ValueError("not a call of a procedure this node has")
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:
            self.dropped += 1
            log.debug("malformed request dropped", extra={"from": join_host_port(address[0], address[1]),
                                                          "reason": repr(exc)})

    def welcome_if_new(self, node: Node) -> None:
        """kademlia calls this for the sender of every request: a new one is pinged first and
        joins the routing table only if it answers (see the module docstring)."""
        if (self.client or node.id == self.source_node.id or not self.router.is_new_node(node)
                or node.id in self._verifying or len(self._verifying) >= MAX_VERIFYING):
            return
        self._verifying[node.id] = asyncio.ensure_future(self._verify(node))

    async def _verify(self, node: Node) -> None:
        try:
            ok, answer = await self.ping((node.ip, node.port), self.source_node.id)
            if ok and answer == node.id:
                self._welcome(node)
        finally:
            self._verifying.pop(node.id, None)

    def _welcome(self, node: Node) -> None:
        """Into the routing table; a node never met before is first handed the records it
        should keep."""
        if self.router.is_new_node(node) and not self.client and node.id not in self._handed_over:
            # Once per node: one whose bucket is full stays "new" (kademlia keeps it among the
            # bucket's replacements), and every reply from it handed the records over again.
            self._handed_over[node.id] = None
            if len(self._handed_over) > MAX_HANDED_OVER:
                self._handed_over.popitem(last=False)
            self._hand_over(node)
        KademliaProtocol.welcome_if_new(self, node)

    def _hand_over(self, node: Node) -> None:
        """Kademlia's join (section 2.5 of the paper): a new node that is among the k closest
        to a key gets the key's records from the nodes closest to it.  Records otherwise reach
        only the nodes that were closest when they were announced; under churn those die and
        newcomers take their places knowing nothing, so lookups met empty nodes first and the
        replication floor, whose watchers are the nodes that keep a blob's records, ranked
        newcomers that never acted first (`hack/bench-sim`: copies twice what was lost, and
        blobs short for 20 s a place).  Only this node's `HANDOVER_PLACES` closest of what it
        knows hand over, so a join costs a few datagrams per key."""
        for key in self.providers.keys():
            target = Node(key)
            known = self.router.find_neighbors(target)
            if len(known) >= self.router.ksize and node.distance_to(target) >= known[-1].distance_to(target):
                continue  # not among the k closest
            mine = self.source_node.distance_to(target)
            if sum(n.distance_to(target) < mine for n in known) >= HANDOVER_PLACES:
                continue  # closer nodes hand over
            records = self.providers.get(key)
            if records:
                asyncio.ensure_future(self.call_hand_over(node, key, records, self.digests.get(key)))

    def stop_verifying(self) -> None:
        for task in list(self._verifying.values()):
            task.cancel()

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node):
        """As kademlia's, timed: joins and announces teach `round_trip` before any lookup."""
        t0 = asyncio.get_running_loop().time()
        result = await super().call_find_node(node_to_ask, node_to_find)
        if result[0]:
            self.round_trip.observe(asyncio.get_running_loop().time() - t0)
        return result

    def handle_call_response(self, result, node: Node):
        """A node that answered us is alive: into the table at once; one that did not, out."""
        if not result[0]:
            self.router.remove_contact(node)
        elif self.client or node.id != self.source_node.id:  # a client may speak with its node's id
            self._welcome(node)
        return result

    def _sender_node(self, sender: tuple[str, int], nodeid: object) -> Node | None:
        if not _is_key(nodeid):
            return None
        node = Node(nodeid, sender[0], sender[1])
        self.welcome_if_new(node)
        return node

    # Records are signed over their DHT key and fields (key-pair mode): a node that stores or
    # forwards them cannot alter them, nor move them to another key.
    def sign(self, kind: str, key: bytes, rec):
        if self.identity is None:
            return rec
        return dataclasses.replace(rec, sig=self.identity.sign(_signable(kind, key, rec)))

    def _signed_by(self, kind: str, key: bytes, rec, member: Member | None) -> bool:
        return member is not None and member.node_id == rec.node_id and member.verify(_signable(kind, key, rec), rec.sig)

    def _add(self, kind: str, sender, nodeid, key, record, parse, store) -> Any:
        """add_provider / add_tag: keep a record the sender published for itself."""
        if self._sender_node(sender, nodeid) is None or not _is_key(key):
            return {"error": "bad node id or key"}
        try:
            rec = parse(record)
        except ValueError as exc:
            return {"error": str(exc)}
        if rec.node_id != nodeid:
            return {"error": "a node publishes only its own records"}
        if self.identity is not None:
            member = getattr(sender, "member", None)
            if not self._signed_by(kind, key, rec, member):
                return {"error": "record not signed by its publisher"}
            self._keep_cert(rec.node_id, member.cert_der)
        if not store(key, rec):
            return {"error": "too many records from this node"}
        return True

    def _get(self, sender, nodeid, key, field: str, records: list) -> Any:
        """get_providers / get_tags: what we keep under `key`, with closer nodes."""
        node = self._sender_node(sender, nodeid)
        if node is None or not _is_key(key):
            return {"error": "bad node id or key"}
        reply: dict[str, Any] = {}
        if self.identity is not None:  # each record travels with its publisher's certificate
            records = [r for r in records if r.node_id in self.certs][:MAX_SIGNED_RECORDS_PER_REPLY]
            reply["certs"] = list({self.certs[r.node_id] for r in records})
        reply[field] = [r.to_wire() for r in records]
        reply["nodes"] = [tuple(n) for n in self.router.find_neighbors(Node(key), exclude=node)]
        return reply

    def rpc_add_provider(self, sender, nodeid, key, record, digest=None) -> Any:
        if key in self.purged_keys:
            return {"error": "purged"}
        result = self._add("provider", sender, nodeid, key, record, ProviderRecord.from_wire, self.providers.add)
        if result is True:
            self.watch(key, digest)
        return result

    def rpc_hand_over(self, sender, nodeid, key, records, certs=None, digest=None, check=False) -> Any:
        """Records of other publishers, from a node that kept them (`_hand_over`, and the
        replication floor's `_nudge`, which with `check` asks this node to look at the key
        now: `on_check`).  In key-pair mode each must carry its publisher's signature, as in a
        lookup's reply; with a cluster token a member could as well put them in such a reply."""
        if self._sender_node(sender, nodeid) is None or not _is_key(key) or not isinstance(records, list):
            return {"error": "bad node id, key or records"}
        parsed = self._signed_records("provider", key, records, certs, ProviderRecord.from_wire, keep_certs=True)
        if self.keep_records(key, parsed):
            self.watch(key, digest)
        if check is not True:
            return True
        if self.on_check is not None and key in self.digests:
            self.on_check(key)
        # The asker learns what this node knows of the key in return (a record that reached
        # only the nodes closest to the key when it was announced, say).
        return self._get(sender, nodeid, key, "providers", self.providers.get(key)[:MAX_RECORDS_PER_REPLY])

    def keep_records(self, key: bytes, records: list[ProviderRecord]) -> int:
        """Records of other publishers, handed over or synced (not this node's own, not ones a
        proof of storage refuted here a moment ago); returns how many were kept."""
        kept = 0
        if key in self.purged_keys:
            return 0
        for rec in records:
            if (rec.node_id != self.source_node.id and (key, rec.node_id) not in self.refuted
                    and self.providers.add(key, rec)):
                kept += 1
        return kept

    def refute(self, key: bytes, node_id: bytes, for_seconds: float) -> None:
        """A proof of storage failed: drop the record, and take it from no other node for a while
        (the node that handed it here may not have caught the holder yet)."""
        self.providers.remove(key, node_id)
        self.refuted.add((key, node_id), for_seconds)

    async def call_hand_over(self, node: Node, key: bytes, records: list[ProviderRecord], digest: str | None,
                             check: bool = False) -> bool:
        """True if `node` answered."""
        certs = None
        if self.identity is not None:
            records = [r for r in records if r.node_id in self.certs][:MAX_SIGNED_RECORDS_PER_REPLY]
            certs = list({self.certs[r.node_id] for r in records})
        else:
            records = records[:MAX_RECORDS_PER_REPLY]
        result = await self.hand_over((node.ip, node.port), self.source_node.id, key, [r.to_wire() for r in records],
                                      certs, digest, check)
        if check:  # the reply is what `node` knows of the key
            synced = self._records_and_nodes(result, node, key, "provider", ProviderRecord.from_wire, keep_certs=True)
            if synced is not None:
                self.keep_records(key, synced[0])
        elif not result[0]:
            self.router.remove_contact(node)
        return bool(result[0])

    def watch(self, key: bytes, digest: object) -> None:
        """Remember which digest `key` is for; the sender says, `provider_key` checks it."""
        if (isinstance(digest, str) and len(digest) < 200 and key not in self.digests
                and len(self.digests) < MAX_WATCHED and provider_key(digest) == key):
            self.digests[key] = digest

    def rpc_remove_provider(self, sender, nodeid, key) -> Any:
        if self._sender_node(sender, nodeid) is None or not _is_key(key):
            return {"error": "bad node id or key"}
        self.providers.remove(key, nodeid)  # only the sender's own record
        return True

    def rpc_get_providers(self, sender, nodeid, key) -> Any:
        reply = self._get(sender, nodeid, key, "providers",
                          self.providers.get(key)[:MAX_RECORDS_PER_REPLY] if _is_key(key) else [])
        if "providers" in reply:
            if reply["providers"] or key in self.digests:  # a blob the cluster has: count the ask
                self.demand.hit(key)
            reply["demand"] = round(self.demand.per_minute(key), 2)
        return reply

    def rpc_add_tag(self, sender, nodeid, key, record) -> Any:
        def keep(key: bytes, rec: TagRecord) -> bool:
            if self.purges is not None and self.purges.purged(rec.digest):
                return False
            self.tags.add(key, rec)
            return True

        return self._add("tag", sender, nodeid, key, record, TagRecord.from_wire, keep)

    def rpc_get_tags(self, sender, nodeid, key) -> Any:
        return self._get(sender, nodeid, key, "tags",
                         self.tags.get(key)[:MAX_RECORDS_PER_REPLY // 4] if _is_key(key) else [])

    async def call_add_tag(self, node: Node, key: bytes, rec: TagRecord) -> bool:
        result = await self.add_tag((node.ip, node.port), self.source_node.id, key, rec.to_wire())
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_get_tags(self, node: Node, key: bytes) -> tuple[list[TagRecord], list[Node]] | None:
        result = await self.get_tags((node.ip, node.port), self.source_node.id, key)
        return self._records_and_nodes(result, node, key, "tag", TagRecord.from_wire)

    async def call_add_provider(self, node: Node, key: bytes, rec: ProviderRecord, digest: str) -> bool:
        result = await self.add_provider((node.ip, node.port), self.source_node.id, key, rec.to_wire(), digest)
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_remove_provider(self, node: Node, key: bytes) -> bool:
        result = await self.remove_provider((node.ip, node.port), self.source_node.id, key)
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_get_providers(self, node: Node, key: bytes) -> tuple[list[ProviderRecord], list[Node]] | None:
        """Records and closer nodes from `node`, or None if it did not answer sensibly."""
        result = await self.get_providers((node.ip, node.port), self.source_node.id, key)
        return self._records_and_nodes(result, node, key, "provider", ProviderRecord.from_wire)

    # Purges (`purges`): pushed by their issuer, handed on by every node that learns one, and
    # pulled by every node now and then (`DhtNode.sync_purges`).
    def forget_purged(self, rec: PurgeRecord) -> None:
        """Keep no provider record of a purged digest, and no tag record that names one."""
        for digest in rec.digests:
            key = provider_key(digest)
            self.purged_keys.add(key)
            self.providers.drop(key)
            self.digests.pop(key, None)
        self.tags.drop_digests(set(rec.digests))

    def purge_wire(self, rec: PurgeRecord) -> list:
        """A purge as it travels: the record, and its issuer's certificate in key-pair mode."""
        return [rec.to_wire(), self.certs.get(rec.node_id, b"") if self.identity is not None else b""]

    def accept_purge(self, wire: object) -> PurgeRecord | None:
        """A purge from another node, if well formed and (key-pair mode) signed by its issuer."""
        if not (isinstance(wire, (list, tuple)) and len(wire) == 2):
            return None
        try:
            rec = PurgeRecord.from_wire(wire[0])
        except ValueError:
            return None
        if self.identity is not None:
            member = self._publishers([wire[1]]).get(rec.node_id)
            if not self._signed_by("purge", PURGE_KEY, rec, member):
                self.forged += 1
                return None
            self._keep_cert(rec.node_id, member.cert_der)
        return rec

    def learn_purge(self, rec: PurgeRecord, from_id: bytes) -> None:
        if self.purges is not None and self.purges.add(rec):
            self.forget_purged(rec)
            if self.on_purge is not None:
                self.on_purge(rec, from_id)

    def rpc_purge(self, sender, nodeid, wire) -> Any:
        if self._sender_node(sender, nodeid) is None or self.purges is None:
            return {"error": "bad node id, or no purges here"}
        rec = self.accept_purge(wire)
        if rec is None:
            return {"error": "malformed or unsigned purge"}
        self.learn_purge(rec, nodeid)
        return True

    def rpc_purge_ids(self, sender, nodeid, start=0) -> Any:
        if self._sender_node(sender, nodeid) is None or self.purges is None or not isinstance(start, int):
            return {"error": "bad node id, or no purges here"}
        ids = self.purges.ids()
        return {"ids": ids[start:start + PURGE_IDS_PER_REPLY], "total": len(ids)}

    def rpc_get_purge(self, sender, nodeid, record_id) -> Any:
        if self._sender_node(sender, nodeid) is None or self.purges is None or not _is_key(record_id):
            return {"error": "bad node id or purge id"}
        rec = self.purges.get(record_id)
        return self.purge_wire(rec) if rec is not None else None

    async def call_purge(self, node: Node, rec: PurgeRecord) -> bool:
        result = await self.purge((node.ip, node.port), self.source_node.id, self.purge_wire(rec))
        self.handle_call_response(result, node)
        return result[0] and result[1] is True

    async def call_purge_ids(self, node: Node, start: int = 0) -> tuple[list[bytes], int] | None:
        result = await self.purge_ids((node.ip, node.port), self.source_node.id, start)
        self.handle_call_response(result, node)
        ok, reply = result
        if not ok or not isinstance(reply, dict) or not isinstance(reply.get("ids"), list) \
                or not isinstance(reply.get("total"), int):
            return None
        return [i for i in reply["ids"] if _is_key(i)], reply["total"]

    async def call_get_purge(self, node: Node, record_id: bytes) -> PurgeRecord | None:
        result = await self.get_purge((node.ip, node.port), self.source_node.id, record_id)
        self.handle_call_response(result, node)
        ok, reply = result
        rec = self.accept_purge(reply) if ok else None
        return rec if rec is not None and rec.id == record_id else None

    def _records_and_nodes(self, result, node: Node, key: bytes, kind: str, parse, keep_certs: bool = False):
        self.handle_call_response(result, node)
        ok, reply = result
        field = kind + "s"
        if not ok or not isinstance(reply, dict) or field not in reply or not isinstance(reply[field], list):
            return None
        records = self._signed_records(kind, key, reply[field], reply.get("certs"), parse, keep_certs)
        nodes = []
        raw_nodes = reply.get("nodes")
        for raw in raw_nodes if isinstance(raw_nodes, list) else []:
            if isinstance(raw, (list, tuple)) and len(raw) == 3 and _is_key(raw[0]):
                nodes.append(Node(raw[0], raw[1], raw[2]))
        demand = reply.get("demand")
        if self.client and isinstance(demand, (int, float)) and not isinstance(demand, bool) and 0 <= demand < 1e9:
            self.demand_heard[key] = max(self.demand_heard.get(key, 0.0), float(demand))
        return records, nodes

    def _signed_records(self, kind: str, key: bytes, raws: list, certs: object, parse, keep_certs: bool) -> list:
        """Records from another node (a reply, a hand-over); in key-pair mode only the ones
        their publishers signed, with their certificates kept if this node keeps the records
        (it passes them on with them)."""
        publishers = self._publishers(certs) if self.identity is not None else {}
        records = []
        for raw in raws[:MAX_RECORDS_PER_REPLY]:
            try:
                rec = parse(raw)
            except ValueError:
                continue  # one bad record does not spoil the rest
            if self.identity is not None:
                member = publishers.get(rec.node_id)
                if not self._signed_by(kind, key, rec, member):
                    self.forged += 1
                    continue  # altered or made up by the node that sent it
                if keep_certs:
                    self._keep_cert(rec.node_id, member.cert_der)
            records.append(rec)
        return records

    def _keep_cert(self, node_id: bytes, der: bytes) -> None:
        if len(self.certs) < MAX_CERTS or node_id in self.certs:
            self.certs[node_id] = der

    def _publishers(self, certs: object) -> dict[bytes, Member]:
        members: dict[bytes, Member] = {}
        for der in certs[:MAX_SIGNED_RECORDS_PER_REPLY] if isinstance(certs, list) else []:
            if isinstance(der, bytes):
                try:
                    member = self.identity.trust.member(der)
                except IdentityError:
                    continue
                members[member.node_id] = member
        return members


def _signable(kind: str, key: bytes, rec) -> bytes:
    return b"cs-p2p/v1/record/" + kind.encode() + b"/" + key + umsgpack.packb(dataclasses.replace(rec, sig=b"").to_wire())


def _speaks_for_itself(data: object, sender: object) -> bool:
    """Every kademlia and cs-p2p RPC names its caller's node id first: in key-pair mode it
    must be the id of the key that signed the datagram."""
    member = getattr(sender, "member", None)
    return (member is not None and isinstance(data, list) and len(data) == 2 and isinstance(data[1], list)
            and bool(data[1]) and data[1][0] == member.node_id)


class _Sender(tuple):
    """A datagram's source address, and the member whose key signed it."""

    member: Member

    def __new__(cls, addr, member: Member) -> "_Sender":
        self = super().__new__(cls, addr)
        self.member = member
        return self


class _Transport:
    """The datagram transport as rpcudp sees it: everything sent is sealed first (with a
    sealer), and sent in the family of the socket: an IPv4 address as IPv4-mapped on a
    dual-stack IPv6 socket; an address the socket cannot reach is dropped (the call times out,
    as for a node that is gone)."""

    def __init__(self, inner, sealer: Sealer | KeySealer | None) -> None:
        self._inner = inner
        self._sealer = sealer
        sock = inner.get_extra_info("socket")
        self._v6 = sock is not None and sock.family == socket.AF_INET6
        self._v6_only = self._v6 and bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))

    def sendto(self, data: bytes, addr=None) -> None:
        if addr is not None:
            host, port = addr[0], addr[1]
            if self._v6 and ":" not in host:
                if self._v6_only:
                    return
                host = "::ffff:" + host
            elif not self._v6 and ":" in host:
                return
            addr = (host, port)
        self._inner.sendto(self._sealer.seal(data) if self._sealer else data, addr)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
