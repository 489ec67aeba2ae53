"""Fixtures: real processes only (cs-p2p daemon, containerd, registry), each stopped by its fixture."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
from typing import Iterator

import grpc
import pytest

from cs_p2p.addresses import join_host_port
from cs_p2p.api import content_pb2 as pb
from cs_p2p.api import content_pb2_grpc
from cs_p2p_dev.processes import Containerd, CsP2P, Registry, free_port, wait_for
from cs_p2p.dht.node import DhtNode

GRPC_OPTS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
HAVE_CONTAINERD = all(shutil.which(b) for b in ("containerd", "ctr", "docker-registry", "skopeo")) and os.geteuid() == 0


def pytest_report_header(config) -> str:
    from cs_p2p_dev.releases import ENV, release

    if not HAVE_CONTAINERD:
        return "containerd: none (integration tests skipped)"
    r = release()
    return f"containerd: {r.name} ({r.series}) from {r.bin_dir}; {ENV} picks another"


@pytest.fixture
def workdir() -> Iterator[str]:
    # Short paths: unix socket names are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="csp-", dir="/tmp")
    yield d
    if not os.environ.get("CS_P2P_KEEP"):  # CS_P2P_KEEP=1 keeps the nodes' logs for a post-mortem
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def loopback() -> str:
    """The address the nodes of a test listen on; tests/integration/test_ipv6.py makes it ::1."""
    return "127.0.0.1"


@pytest.fixture
def daemon(workdir: str) -> Iterator[CsP2P]:
    cs = CsP2P(os.path.join(workdir, "cs")).start()
    yield cs
    cs.stop()


@pytest.fixture
def p2p_node(workdir: str, loopback: str):
    """Start daemons with a peer server and a DHT node on loopback: `start(name, args,
    bootstrap)` -> (daemon, peer address, DHT address)."""
    made: list[CsP2P] = []

    def start(name: str, args: list[str], bootstrap: str | None = None) -> tuple[CsP2P, str, str]:
        peer, dht = join_host_port(loopback, free_port()), join_host_port(loopback, free_port())
        argv = ["--peer-listen", peer, "--dht-listen", dht, *args] + (["--bootstrap", bootstrap] if bootstrap else [])
        cs = CsP2P(os.path.join(workdir, name), argv).start()
        made.append(cs)
        return cs, peer, dht

    yield start
    for cs in made:
        cs.stop()


@pytest.fixture
async def dht_nodes():
    """In-process DHT nodes on loopback: `make(sealer, bootstrap, node_id)` -> a node with
    `.port` and, if it bootstrapped through another, `.met` (peers it met)."""
    made: list[DhtNode] = []

    async def make(sealer=None, bootstrap: DhtNode | None = None, node_id: bytes | None = None) -> DhtNode:
        node = DhtNode(node_id or os.urandom(20), f"127.0.0.1:{20000 + len(made)}", sealer=sealer)
        node.port = await node.listen("127.0.0.1", 0)
        made.append(node)
        if bootstrap is not None:
            node.met = await node.bootstrap([f"127.0.0.1:{bootstrap.port}"])
        return node

    yield make
    for n in made:
        n.stop()


def content_stub(cs: CsP2P) -> tuple[grpc.Channel, content_pb2_grpc.ContentStub]:
    ch = grpc.insecure_channel("unix:" + cs.socket, options=GRPC_OPTS)
    return ch, content_pb2_grpc.ContentStub(ch)


@pytest.fixture
def stub(daemon: CsP2P) -> Iterator[content_pb2_grpc.ContentStub]:
    ch, st = content_stub(daemon)
    yield st
    ch.close()


class WriteSession:
    """A Write stream driven one request at a time, like containerd's remote writer."""

    def __init__(self, stub: content_pb2_grpc.ContentStub) -> None:
        self._q: "queue.Queue[pb.WriteContentRequest | None]" = queue.Queue()
        self._responses = stub.Write(iter(self._q.get, None))

    def send(self, **kw) -> pb.WriteContentResponse:
        self._q.put(pb.WriteContentRequest(**kw))
        return next(self._responses)

    def close(self) -> None:
        self._q.put(None)
        self._responses.cancel()


def info_size(stub: content_pb2_grpc.ContentStub, digest: str) -> int:
    """The size `Info` answers for `digest`, or -1 if it answers with an error."""
    try:
        return stub.Info(pb.InfoRequest(digest=digest)).info.size
    except grpc.RpcError:
        return -1


def assert_read_from_peers(cs: CsP2P, digest: str, data: bytes) -> None:
    """The daemon's Info finds a blob only peers hold, and Read returns it whole."""
    ch, stub = content_stub(cs)
    try:
        wait_for(lambda: info_size(stub, digest) == len(data), 30, "Info to find the blob on peers")
        assert b"".join(r.data for r in stub.Read(pb.ReadContentRequest(digest=digest))) == data
    finally:
        ch.close()


def assert_outsider_gets_nothing(outsider: CsP2P, digest: str) -> None:
    """A daemon outside the cluster never joined it, and its Info for a member's blob is NOT_FOUND."""
    ch, stub = content_stub(outsider)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(pb.InfoRequest(digest=digest))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()
    assert "dht joined" not in open(outsider.proc.log_path).read()


def commit_via_socket(cs: CsP2P, data: bytes, ref: str = "r") -> str:
    """Commit `data` through the daemon's content API, as containerd would; returns its digest."""
    ch, stub = content_stub(cs)
    try:
        w = WriteSession(stub)
        w.send(action=pb.STAT, ref=ref)
        w.send(action=pb.WRITE, offset=0, data=data)
        digest = w.send(action=pb.COMMIT, offset=len(data)).digest
        w.close()
        return digest
    finally:
        ch.close()


@pytest.fixture
def writes(stub) -> Iterator:
    sessions: list[WriteSession] = []

    def open_session() -> WriteSession:
        s = WriteSession(stub)
        sessions.append(s)
        return s

    yield open_session
    for s in sessions:
        s.close()


requires_containerd = pytest.mark.skipif(
    not HAVE_CONTAINERD, reason="needs root and containerd, ctr, docker-registry, skopeo (hack/install-deps.sh)"
)


@pytest.fixture
def own_registry(workdir: str) -> Iterator[Registry]:
    """A registry of this test's own, which it may stop and restart (the session's stays up
    for the others)."""
    reg = Registry(os.path.join(workdir, "registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    if not HAVE_CONTAINERD:
        pytest.skip("needs docker-registry (hack/install-deps.sh)")
    d = tempfile.mkdtemp(prefix="csp-reg-", dir="/tmp")
    reg = Registry(d).start()
    yield reg
    reg.stop()
    shutil.rmtree(d, ignore_errors=True)


class Node:
    """One containerd whose content store is one cs-p2p daemon."""

    def __init__(self, workdir: str, registry: Registry, cs_args: list[str] | None = None) -> None:
        self.cs = CsP2P(os.path.join(workdir, "cs"), cs_args).start()
        self.containerd = Containerd(os.path.join(workdir, "ctd"), self.cs.socket, [registry.addr]).start()

    def ctr(self, *args: str, **kw):
        return self.containerd.ctr(*args, **kw)

    def stop(self) -> None:
        self.containerd.stop()
        self.cs.stop()


@pytest.fixture
def node(workdir: str, registry: Registry) -> Iterator[Node]:
    n = Node(workdir, registry)
    yield n
    n.stop()
