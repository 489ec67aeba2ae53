"""What the content service asks when containerd wants a blob this node lacks.

`Info` runs inside containerd's bolt write transaction, so it must answer fast: it looks the
digest up in the DHT (bounded by `lookup_timeout`), starts the fetch in the background and
answers with the size the providers announced.  It never waits for bytes.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from ..dht.node import DhtNode
from .fetcher import Fetch, Fetcher

log = logging.getLogger("cs_p2p.fetch")


class PeerSource:
    def __init__(self, dht: DhtNode, fetcher: Fetcher, lookup_timeout: float = 1.0) -> None:
        self.dht = dht
        self.fetcher = fetcher
        self.lookup_timeout = lookup_timeout

    def inflight(self, digest: str) -> Fetch | None:
        return self.fetcher.inflight.get(digest)

    async def locate(self, digest: str) -> Fetch | None:
        """The fetch of `digest` from peers, started if peers have it; None if none do."""
        fetch = self.fetcher.inflight.get(digest)
        if fetch is not None:
            return fetch
        if self.fetcher.recently_failed(digest):
            return None
        try:
            providers = await asyncio.wait_for(self.dht.find_providers(digest, want=1), self.lookup_timeout)
        except asyncio.TimeoutError:
            log.warning("provider lookup timed out", extra={"digest": digest})
            return None
        if not providers:
            return None
        # Providers that disagree on the size cannot all be right: follow the majority.
        size = collections.Counter(p.size for p in providers).most_common(1)[0][0]
        return self.fetcher.start(digest, size, [p for p in providers if p.size == size],
                                  more=lambda: self.dht.find_providers(digest))
