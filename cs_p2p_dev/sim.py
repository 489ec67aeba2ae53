"""A cluster of many nodes in one process, in simulated time: the real DHT protocol, replication
floor and proofs of storage (`dht`, `placement`) on an in-process datagram network with latency
and loss, while nodes die and new ones join.  `hack/bench-sim` runs it.

- Time: an event loop whose clock jumps to the next timer instead of sleeping (nothing here
  does real I/O), and `time.time`/`time.monotonic` read that clock, so record expiry, floors and
  challenge rounds all run on simulated time; a simulated hour takes minutes of CPU.
- Network: every datagram is delivered after a random one-way latency, or lost.
- Blobs: a node "holds" a digest; fetching one for the floor takes a simulated transfer time;
  a challenge is answered from what the node holds (the bytes are not simulated, the hashes
  are: an honest holder's answer is the one every other holder gives).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import selectors
import statistics
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

from cs_p2p.dht.node import DhtNode
from cs_p2p.dht.providers import ProviderRecord
from cs_p2p.placement.challenger import Challenger
from cs_p2p.placement.floor import ReplicaFloor
from cs_p2p.proofs import Challenge

EPOCH = 1.8e9  # simulated unix time at the start
T = TypeVar("T")


class _NoSelector(selectors.DefaultSelector):
    """select() never waits: the loop's clock jumps ahead by the timeout instead."""

    def __init__(self, clock: "VirtualClock") -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing scheduled")
        self.clock.now += max(timeout, 0.0)
        return []


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class SimLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_NoSelector(clock))
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


class SimNetwork:
    def __init__(self, latency: tuple[float, float], loss: float, rng: random.Random) -> None:
        self.latency = latency
        self.loss = loss
        self.rng = rng
        self.endpoints: dict[tuple[str, int], "asyncio.DatagramProtocol"] = {}
        self.datagrams = 0

    def transport(self, addr: tuple[str, int]) -> "SimTransport":
        return SimTransport(self, addr)

    def send(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.datagrams += 1
        if self.rng.random() < self.loss:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.rng.uniform(*self.latency), self._deliver, data, src, tuple(dst))

    def _deliver(self, data: bytes, src, dst) -> None:
        proto = self.endpoints.get(dst)
        if proto is not None:
            proto.datagram_received(data, src)


class SimTransport:
    def __init__(self, net: SimNetwork, addr: tuple[str, int]) -> None:
        self.net = net
        self.addr = addr

    def sendto(self, data: bytes, addr=None) -> None:
        self.net.send(data, self.addr, addr)

    def get_extra_info(self, name, default=None):
        return self.addr if name == "sockname" else default

    def close(self) -> None:
        self.net.endpoints.pop(self.addr, None)


def _right_answer(ch: Challenge) -> str:
    return hashlib.sha256(ch.nonce + ch.digest.encode() + str((ch.offset, ch.length)).encode()).hexdigest()


class SimChallenger(Challenger):
    async def _own_answer(self, path: str, ch: Challenge) -> str:
        return _right_answer(ch)


class SimStore:
    """What the floor and the challenger ask of a node's store."""

    def __init__(self, node: "SimNode") -> None:
        self.node = node
        self.cache = type("Cache", (), {"max_bytes": 1 << 40})()

    def served_path(self, hex_: str) -> str | None:
        return "held" if "sha256:" + hex_ in self.node.held else None

    def to_cache(self, digest: str) -> tuple[bool, list[str]]:
        return True, []


class SimPeers:
    """The floor's fetches and the challenger's transport, over the simulated cluster."""

    def __init__(self, node: "SimNode") -> None:
        self.node = node
        self.ledger = None

    async def replicate(self, digest: str, size: int = 0):
        sim = self.node.sim
        providers = [p for p in await self.node.dht.find_providers(digest) if sim.alive(p.node_id)
                     and digest in sim.nodes[p.node_id].held]
        if not providers:
            return None
        await asyncio.sleep(sim.transfer_seconds)
        if not self.node.alive:
            return None
        self.node.held.add(digest)
        self.node.dht.committed(digest, sim.blob_size)
        sim.copies += 1
        return True

    async def challenge(self, rec: ProviderRecord, ch: Challenge):
        sim = self.node.sim
        self.node.challenge_bytes += ch.length
        await asyncio.sleep(2 * sim.network.rng.uniform(*sim.network.latency))
        holder = sim.nodes.get(rec.node_id)
        if holder is None or not holder.alive:
            await asyncio.sleep(1.0)  # the request times out
            return None, None, None
        if ch.digest not in holder.held:
            return 404, None, None
        return 200, _right_answer(ch), None

    def failed_proof(self, addr: str, digest: str, banned: bool) -> None:
        self.node.failed_proofs += 1


@dataclass
class SimNode:
    sim: "Simulation"
    dht: DhtNode
    held: set[str] = field(default_factory=set)
    alive: bool = True
    joined: bool = False  # its join is done
    tasks: list = field(default_factory=list)
    challenge_bytes: int = 0
    failed_proofs: int = 0


@dataclass
class Results:
    nodes: int
    minutes: float
    churn_per_minute: float
    lookups: int
    lookups_ok: int
    lookup_seconds: list[float]
    blob_minutes: float
    blob_minutes_at_floor: float
    blob_minutes_held: float
    challenge_bytes_per_node_minute: float
    copies: int
    datagrams_per_node_second: float

    @property
    def lookup_success(self) -> float:
        return self.lookups_ok / max(1, self.lookups)

    @property
    def lookup_p50_ms(self) -> float:
        return statistics.median(self.lookup_seconds) * 1000 if self.lookup_seconds else 0.0

    @property
    def lookup_p99_ms(self) -> float:
        s = sorted(self.lookup_seconds)
        return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000 if s else 0.0

    @property
    def floor_held(self) -> float:
        return self.blob_minutes_at_floor / max(self.blob_minutes, 1e-9)

    @property
    def blob_available(self) -> float:
        return self.blob_minutes_held / max(self.blob_minutes, 1e-9)


class Simulation:
    def __init__(self, nodes: int = 1000, blobs: int = 200, minutes: float = 10.0, churn: float = 0.10,
                 replicas: int = 2, latency: tuple[float, float] = (0.0005, 0.005), loss: float = 0.005,
                 floor_interval: float = 10.0, challenge_interval: float = 30.0, seed: int = 1,
                 floor: int | None = None) -> None:
        self.n = nodes
        self.blob_count = blobs
        self.minutes = minutes
        self.churn = churn
        self.replicas = replicas  # the copies nodes keep (`--replicas`)
        self.floor = replicas if floor is None else floor  # the number of holders measured
        self.floor_interval = floor_interval
        self.challenge_interval = challenge_interval
        self.rng = random.Random(seed)
        self.network = SimNetwork(latency, loss, self.rng)
        self.nodes: dict[bytes, SimNode] = {}
        self.blob_size = 64 << 20
        self.transfer_seconds = 2.0  # a blob from a peer on a LAN
        self.copies = 0
        self._next_ip = 0
        self.digests = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(blobs)]

    def alive(self, node_id: bytes) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and node.alive

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def _addr(self) -> tuple[str, int]:
        self._next_ip += 1
        return (f"10.{self._next_ip >> 16 & 255}.{self._next_ip >> 8 & 255}.{self._next_ip & 255}", 4000)

    async def _start_node(self, bootstrap: tuple[str, int] | None) -> SimNode:
        node_id = bytes(self.rng.getrandbits(8) for _ in range(20))
        addr = self._addr()
        dht = DhtNode(node_id, f"{addr[0]}:5001", rpc_timeout=1.0)
        server = dht.server
        proto = server._create_protocol()
        proto.connection_made(self.network.transport(addr))
        server.transport, server.protocol = proto.transport, proto
        self.network.endpoints[addr] = proto
        node = SimNode(self, dht)
        self.nodes[node_id] = node
        peers = SimPeers(node)
        store = SimStore(node)
        challenger = SimChallenger(dht, store, peers, self.challenge_interval)
        floor = ReplicaFloor(dht, store, peers, self.replicas, self.floor_interval, dht,
                             challenger.in_doubt, self.replicas)
        challenger.on_record_dropped = floor.recheck
        floor.prove = challenger.check_now
        dht.protocol.on_check = floor.asked
        loop = asyncio.get_running_loop()
        node.tasks = [loop.create_task(dht._republish_loop()), loop.create_task(floor.run()),
                      loop.create_task(challenger.run())]
        if bootstrap:
            await self._join(node, bootstrap)
        node.joined = True
        return node

    async def _join(self, node: SimNode, bootstrap: tuple[str, int]) -> None:
        """As `DhtNode.keep_joined` does with a headless Service's addresses: bootstrap until
        the table has someone (the contact may have died meanwhile), then refresh every bucket."""
        for _ in range(10):
            await node.dht.server.bootstrap([bootstrap])
            if node.dht.contacts():
                await node.dht.refresh_buckets()
                return
            await asyncio.sleep(5)
            bootstrap = self._bootstrap_addr()

    def _kill(self, node: SimNode) -> None:
        node.alive = False
        for t in node.tasks:
            t.cancel()
        node.dht.stop()
        self.network.endpoints.pop(node.dht.server.transport.addr, None)

    def _bootstrap_addr(self) -> tuple[str, int]:
        node = self.rng.choice(self.live())
        return node.dht.server.transport.addr

    async def run(self, progress=None) -> Results:
        await self.start(progress)
        return await self._measure(progress)

    async def start(self, progress=None) -> None:
        """The cluster joined, and every blob announced by `replicas` random nodes."""
        first = await self._start_node(None)
        for _ in range(min(8, self.n - 1)):
            await self._start_node(first.dht.server.transport.addr)
        # The rest join ten at a time, each through a random node that has joined.
        for i in range(len(self.nodes), self.n, 10):
            await asyncio.gather(*(self._start_node(self._bootstrap_addr()) for _ in range(min(10, self.n - i))))
        for node in self.live():  # a refresh, as joined nodes do: every table fills
            await node.dht.server.bootstrap([self._bootstrap_addr()])
        if progress:
            progress(f"{self.n} nodes joined")
        for digest in self.digests:
            for node in self.rng.sample(self.live(), self.replicas):
                node.held.add(digest)
                await node.dht.announce(digest, self.blob_size)
        if progress:
            progress(f"{len(self.digests)} blobs announced by {self.replicas} nodes each")

    async def lookup(self, asker: SimNode, digest: str) -> float | None:
        """As `Info` looks (`fetch.source`): providers checked as the walk meets them, until one
        can deliver (here a check costs no time: the walk is what is measured).  Returns the
        simulated seconds it took to find a live holder, or None if none was found."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with contextlib.aclosing(asker.dht.providers_as_found(digest, within=1.0)) as batches:
            async for found in batches:
                if any(self.alive(p.node_id) and digest in self.nodes[p.node_id].held for p in found):
                    return loop.time() - t0
        return None

    def holders(self, digest: str) -> int:
        return sum(digest in n.held for n in self.live())

    async def _measure(self, progress) -> Results:
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + self.minutes * 60
        lookups = ok = 0
        seconds: list[float] = []
        blob_minutes = at_floor = held_minutes = 0.0
        replaced = reported = 0
        step = 1.0  # seconds between samples
        kill_every = 60.0 / max(self.churn * self.n, 1e-9)
        next_kill = start + kill_every
        joining: set[asyncio.Task] = set()
        datagrams0 = self.network.datagrams
        challenge0 = sum(n.challenge_bytes for n in self.nodes.values())
        while loop.time() < end:
            await asyncio.sleep(step)
            while loop.time() >= next_kill:  # churn: a node dies and a new one joins
                self._kill(self.rng.choice(self.live()))
                # Joining takes a while (lookups, lost datagrams): in the background, as nodes
                # join on their own; awaited here, a join slower than the churn interval kept
                # this loop replacing nodes while simulated time ran away.
                joining.add(loop.create_task(self._start_node(self._bootstrap_addr())))
                joining = {t for t in joining if not t.done()}
                replaced += 1
                next_kill += kill_every
            holders = {d: 0 for d in self.digests}
            for node in self.live():
                for d in node.held:
                    holders[d] += 1
            for d, count in holders.items():
                blob_minutes += step / 60
                at_floor += step / 60 if count >= self.floor else 0
                held_minutes += step / 60 if count >= 1 else 0
            # Lookups from random nodes for blobs some live node holds.
            for _ in range(5):
                d = self.rng.choice([d for d, c in holders.items() if c] or self.digests)
                # Asked by a node that has joined (one still joining has no routing table yet: its
                # pull would go to the registry, as it does before the DHT answers) and lacks the
                # blob (a holder answers `Info` itself).
                asker = self.rng.choice([n for n in self.live() if n.joined and d not in n.held])
                lookups += 1
                took = await self.lookup(asker, d)
                if took is not None:
                    ok += 1
                    seconds.append(took)
            if progress and int((loop.time() - start) // 60) > reported:
                reported = int((loop.time() - start) // 60)
                progress(f"{(loop.time() - start) / 60:.0f}/{self.minutes:.0f} simulated minutes, "
                         f"{replaced} nodes replaced, lookups {ok}/{lookups}")
        minutes = (loop.time() - start) / 60
        challenge = sum(n.challenge_bytes for n in self.nodes.values()) - challenge0
        for node in self.live():
            self._kill(node)
        for task in joining:
            task.cancel()
        await asyncio.sleep(5)  # what was under way ends
        return Results(self.n, minutes, replaced / minutes, lookups, ok, seconds, blob_minutes, at_floor,
                       held_minutes, challenge / self.n / minutes, self.copies,
                       (self.network.datagrams - datagrams0) / self.n / (minutes * 60))


class _FastCodec:
    """msgpack's C codec in place of rpcudp's pure-Python one: the same bytes on the wire
    (str as str, bytes as bin, tuples as arrays), a fraction of the CPU.  In a simulation
    of a thousand nodes every datagram is encoded and decoded in one process, and the pure-
    Python codec was half of the run time."""

    def __init__(self, msgpack) -> None:
        self._msgpack = msgpack

    def packb(self, obj) -> bytes:
        return self._msgpack.packb(obj, use_bin_type=True)

    def unpackb(self, data: bytes):
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


def _fast_codec():
    try:
        import msgpack
    except ImportError:  # the simulation runs without it, slower
        return None
    return _FastCodec(msgpack)


def simulate(**kw) -> Results:
    """Run a `Simulation` and measure it (`in_simulated_time`)."""
    progress = kw.pop("progress", None)
    return in_simulated_time(lambda: Simulation(**kw).run(progress))


async def _stop_the_rest() -> None:
    """Nodes a scenario left running are stopped, not left for the garbage collector to warn of."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def in_simulated_time(main: Callable[[], Awaitable[T]]) -> T:
    """Run `main()` on a simulated clock (real time, logging and rpcudp's codec restored after)."""
    import rpcudp.protocol

    clock = VirtualClock()
    loop = SimLoop(clock)
    real_time, real_monotonic = time.time, time.monotonic
    real_codec = rpcudp.protocol.umsgpack
    time.time = lambda: EPOCH + clock.now
    time.monotonic = lambda: clock.now
    rpcudp.protocol.umsgpack = _fast_codec() or real_codec
    logging.disable(logging.CRITICAL)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(_stop_the_rest())
        time.time, time.monotonic = real_time, real_monotonic
        rpcudp.protocol.umsgpack = real_codec
        logging.disable(logging.NOTSET)
        loop.close()

