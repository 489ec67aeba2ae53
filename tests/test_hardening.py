"""Bounds an attacker or a broken peer runs into: request rates per peer, bans after failed
challenges, header sizes, ingest disk use, and the permissions of containerd's socket."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
import time

import aiohttp
import grpc
import pytest

from cs_p2p.api import content_pb2 as pb
from cs_p2p.auth import HEADER, Sealer
from cs_p2p_dev.processes import CsP2P
from cs_p2p.dht.node import DhtNode
from cs_p2p.peer.server import PeerServer
from cs_p2p.penalties import PeerLimits
from cs_p2p.store import LocalStore
from tests.conftest import WriteSession, content_stub
from tests.test_peer_server import commit

TOKEN = b"correct horse battery staple 42"


def test_peer_limits_rate_strikes_and_ban_expiry():
    limits = PeerLimits(rate=10, burst=3, strikes=3, ban_seconds=60, max_peers=4)
    assert [limits.allow("a", now=100.0) for _ in range(4)] == [True, True, True, False]
    assert limits.allow("a", now=100.2)  # refilled at 10/s
    assert limits.allow("b", now=100.2)  # peers have their own buckets
    assert not limits.strike("c", now=100.0) and not limits.strike("c", now=101.0)
    assert limits.strike("c", now=102.0)  # the third failed challenge bans it
    assert limits.banned("c", now=150.0) and not limits.allow("c", now=150.0)
    assert not limits.banned("c", now=163.0) and limits.allow("c", now=163.0)
    assert not limits.strike("d", now=0.0) and not limits.strike("d", now=100.0)  # strikes a minute apart
    for i in range(10):
        limits.allow(f"x{i}", now=200.0)
    assert len(limits._peers) <= 5  # bounded memory


def _client(source_ip: str) -> aiohttp.ClientSession:
    """A client whose connections come from `source_ip` (any 127.x address is loopback)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source_ip, 0), force_close=True))


async def test_a_peer_over_its_request_rate_gets_429_and_others_are_served(tmp_path):
    store = LocalStore(str(tmp_path))
    srv = PeerServer(store, limits=PeerLimits(rate=1, burst=2))
    port = await srv.start("127.0.0.1", 0)
    try:
        digest = await commit(store, b"x" * 1000)
        url = f"http://127.0.0.1:{port}/blobs/{digest}"
        async with _client("127.0.0.2") as noisy, _client("127.0.0.3") as quiet:
            statuses = []
            for _ in range(4):
                async with noisy.get(url) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["Retry-After"] == "1"
            assert statuses[:2] == [200, 200] and 429 in statuses
            async with quiet.get(url) as r:
                assert r.status == 200 and await r.read() == b"x" * 1000
    finally:
        await srv.stop()


async def test_a_peer_failing_challenges_is_banned_and_members_keep_fetching(tmp_path):
    store = LocalStore(str(tmp_path))
    srv = PeerServer(store, sealer=Sealer(TOKEN, "peer"), limits=PeerLimits(rate=0, strikes=3, ban_seconds=600))
    port = await srv.start("127.0.0.1", 0)
    member = Sealer(TOKEN, "peer")
    try:
        digest = await commit(store, b"y" * 1000)
        path = f"/blobs/{digest}"
        url = f"http://127.0.0.1:{port}{path}"
        async with _client("127.0.0.2") as attacker, _client("127.0.0.1") as honest:
            for guess in range(3):
                with pytest.raises(aiohttp.ClientError):
                    async with attacker.get(url, headers={HEADER: f"{guess:064x}"}) as r:
                        await r.read()
            assert srv.limits.banned("127.0.0.2")
            # Banned: even a valid request from that address gets nothing now.
            with pytest.raises(aiohttp.ClientError):
                async with attacker.get(url, headers={HEADER: member.request_header("GET", path)}) as r:
                    await r.read()
            async with honest.get(url, headers={HEADER: member.request_header("GET", path)}) as r:
                assert r.status == 200 and await r.read() == b"y" * 1000
    finally:
        await srv.stop()


async def test_oversized_request_lines_and_headers_are_refused(tmp_path):
    store = LocalStore(str(tmp_path))
    srv = PeerServer(store)
    port = await srv.start("127.0.0.1", 0)
    try:
        digest = await commit(store, b"z" * 10)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/blobs/{digest}", headers={"X-Big": "a" * 5000}) as r:
                assert r.status in (400, 431)
            async with s.get(f"http://127.0.0.1:{port}/blobs/{'a' * 5000}") as r:
                assert r.status in (400, 414)
            async with s.get(f"http://127.0.0.1:{port}/blobs/{digest}") as r:
                assert r.status == 200  # and the server still serves
    finally:
        await srv.stop()


async def test_a_flood_of_forged_datagrams_gets_its_sender_banned_while_members_work():
    nodes = []
    try:
        for i in range(3):
            node = DhtNode(os.urandom(20), f"127.0.0.1:{22000 + i}", sealer=Sealer(TOKEN, "dht"))
            node.port = await node.listen("127.0.0.1", 0)
            nodes.append(node)
        for n in nodes[1:]:
            assert await n.bootstrap([f"127.0.0.1:{nodes[0].port}"])
        target = nodes[0].protocol
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            attacker = f"127.0.0.1:{s.getsockname()[1]}"
            for _ in range(50):
                s.sendto(os.urandom(200), ("127.0.0.1", nodes[0].port))
            deadline = time.monotonic() + 5
            while not target.limits.banned(attacker):
                assert time.monotonic() < deadline, "the flooding address was not banned"
                await asyncio.sleep(0.02)
        digest = "sha256:" + "44" * 32
        assert await nodes[1].announce(digest, 9) >= 1
        assert [r.addr for r in await nodes[2].find_providers(digest)] == [nodes[1].peer_addr]
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def strict_daemon(workdir):
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    cs = CsP2P(os.path.join(workdir, "cs"), ["--socket-mode", "0600", "--socket-group", group.gr_name,
                                             "--ingest-max-bytes", "100000"]).start()
    yield cs, group
    cs.stop()


def test_socket_permissions_and_ingest_disk_quota_over_grpc(strict_daemon):
    cs, group = strict_daemon
    st = os.stat(cs.socket)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == group.gr_gid
    ch, stub = content_stub(cs)
    try:
        first, second = WriteSession(stub), WriteSession(stub)
        first.send(action=pb.STAT, ref="quota-1")
        assert first.send(action=pb.WRITE, offset=0, data=b"a" * 80_000).offset == 80_000
        second.send(action=pb.STAT, ref="quota-2")
        with pytest.raises(grpc.RpcError) as err:
            second.send(action=pb.WRITE, offset=0, data=b"b" * 40_000)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit" in err.value.details()
        # Nothing lost: the first ingest is intact and commits; then there is room again.
        digest = first.send(action=pb.COMMIT, offset=80_000).digest
        first.close()
        assert stub.Info(pb.InfoRequest(digest=digest)).info.size == 80_000
        third = WriteSession(stub)
        third.send(action=pb.STAT, ref="quota-2")
        assert third.send(action=pb.WRITE, offset=0, data=b"b" * 40_000).offset == 40_000
        third.close()
    finally:
        ch.close()


def test_a_grpc_message_over_the_limit_is_refused_and_the_ingest_is_untouched(stub):
    w = WriteSession(stub)
    w.send(action=pb.STAT, ref="big-message")
    assert w.send(action=pb.WRITE, offset=0, data=b"a" * 1000).offset == 1000
    with pytest.raises(grpc.RpcError) as err:
        w.send(action=pb.WRITE, offset=1000, data=b"b" * (17 << 20))  # containerd's limit is 16 MiB
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Status(pb.StatusRequest(ref="big-message")).status.offset == 1000


async def test_a_node_over_its_datagram_rate_is_dropped_while_others_are_answered():
    nodes = []
    try:
        for i in range(3):
            node = DhtNode(os.urandom(20), f"127.0.0.1:{23000 + i}")
            node.port = await node.listen("127.0.0.1", 0)
            nodes.append(node)
        target, noisy, quiet = nodes
        addr = ("127.0.0.1", target.port)
        assert (await noisy.protocol.ping(addr, noisy.node_id))[0]
        deadline = time.monotonic() + 5  # target pings a new sender back before it adds it
        while target.protocol.router.is_new_node(noisy.server.node):
            assert time.monotonic() < deadline, "noisy never entered target's routing table"
            await asyncio.sleep(0.01)
        target.protocol.limits = PeerLimits(rate=5, burst=5)
        answered = [(await noisy.protocol.ping(addr, noisy.node_id))[0] for _ in range(10)]
        assert answered[:5] == [True] * 5 and not all(answered)  # past its burst, unanswered
        assert (await quiet.protocol.ping(addr, quiet.node_id))[0]  # another node is still answered
        assert target.protocol.limits.refused >= 1
    finally:
        for n in nodes:
            n.stop()


@pytest.fixture
def one_stream_daemon(workdir):
    cs = CsP2P(os.path.join(workdir, "cs"), ["--grpc-max-concurrent-streams", "1"]).start()
    yield cs
    cs.stop()


def test_streams_beyond_the_limit_wait_for_a_free_one(one_stream_daemon):
    import concurrent.futures

    ch, stub = content_stub(one_stream_daemon)
    try:
        first = WriteSession(stub)
        first.send(action=pb.STAT, ref="stream-1")
        second = WriteSession(stub)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(second.send, action=pb.STAT, ref="stream-2")
            with pytest.raises(concurrent.futures.TimeoutError):
                pending.result(timeout=1.0)  # queued behind the open stream
            first.close()
            assert pending.result(timeout=30).action == pb.STAT  # served once the first ended
        second.close()
    finally:
        ch.close()
