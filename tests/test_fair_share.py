"""Fair sharing with real daemons: a node whose upload slots are contended serves the peer that
gave it bytes before the peer that never did, though the free rider asked first; the free
rider is still served after.  Nodes are told apart by address (each on its own loopback
address, and fetching from it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import aiohttp

from cs_p2p_dev.processes import CsP2P, free_port, wait_for
from tests.conftest import commit_via_socket, content_stub, info_size


def node(workdir: str, name: str, ip: str, extra: list[str], bootstrap: str | None = None
         ) -> tuple[CsP2P, str, str]:
    peer, dht = f"{ip}:{free_port()}", f"{ip}:{free_port()}"
    args = ["--peer-listen", peer, "--dht-listen", dht, *extra] + (["--bootstrap", bootstrap] if bootstrap else [])
    return CsP2P(os.path.join(workdir, name), args), peer, dht


async def timed_get(url: str, source_ip: str, rng: str) -> float:
    """Fetch a range from `source_ip`, as the node at that address would; when it finished."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source_ip, 0))) as s:
        async with s.get(url, headers={"Range": rng}) as r:
            assert r.status == 206, r.status
            await r.read()
    return time.monotonic()


def test_a_contended_node_serves_the_peer_that_gave_before_the_free_rider(workdir):
    # The server: one upload slot, 1 MiB/s, so that requests queue for it.
    server, s_peer, s_dht = node(workdir, "server", "127.0.0.3", ["--peer-max-uploads", "1", "--peer-rate-limit", str(1 << 20),
                                                           "--replicas", "0"])
    giver, _, _ = node(workdir, "giver", "127.0.0.4", ["--replicas", "0"], s_dht)
    with contextlib.ExitStack() as stack:
        for cs in (server, giver):
            stack.callback(cs.start().stop)
        # The giver gives: the server fetches a blob from it.
        gift = os.urandom(2 << 20)
        digest = commit_via_socket(giver, gift)
        ch, stub = content_stub(server)
        stack.callback(ch.close)
        wait_for(lambda: info_size(stub, digest) == len(gift), 30, "the giver's blob, seen from the server")
        wait_for(lambda: digest in server.blob_digests(), 30, "the server to fetch it from the giver")

        blob = commit_via_socket(server, os.urandom(3 << 20))
        url = f"http://{s_peer}/blobs/{blob}"

        async def contend() -> tuple[float, float]:
            hog = asyncio.ensure_future(timed_get(url, "127.0.0.1", "bytes=0-2621439"))  # holds the slot ~1.5 s
            await asyncio.sleep(0.2)
            rider = asyncio.ensure_future(timed_get(url, "127.0.0.5", "bytes=0-262143"))  # asks first
            await asyncio.sleep(0.2)
            gave = asyncio.ensure_future(timed_get(url, "127.0.0.4", "bytes=0-262143"))
            await hog
            return await gave, await rider

        gave_done, rider_done = asyncio.run(contend())
        assert gave_done < rider_done  # served first, though it asked after the free rider
