"""Per-peer request rates and bans, shared by the peer server and the DHT.

A peer is whatever the transport can tell apart (an IP for TCP, ip:port for UDP).  Each has a
token bucket: past its rate, requests are refused (HTTP 429) or datagrams dropped, so one
noisy peer cannot take a node's time from the others.  A peer that fails `strikes`
authentication challenges within a minute is banned for `ban_seconds`: everything from it is
dropped unread, which bounds what guessing or replaying costs the node.  Memory is bounded:
past `max_peers`, peers that are not banned are forgotten.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("cs_p2p.penalties")

STRIKE_WINDOW = 60.0


@dataclass
class _Peer:
    tokens: float
    stamp: float
    strikes: int = 0
    first_strike: float = 0.0
    banned_until: float = 0.0


class PeerLimits:
    def __init__(self, rate: float, burst: float | None = None, strikes: int = 10, ban_seconds: float = 600.0,
                 max_peers: int = 65536, name: str = "peer") -> None:
        self.name = name  # what the peers are to, for the log: "peer server", "dht"
        self.rate = rate  # requests per second; 0: no rate limit
        self.burst = burst if burst is not None else 2 * rate
        self.strikes = strikes
        self.ban_seconds = ban_seconds
        self.max_peers = max_peers
        self.refused = 0  # over the rate
        self.bans = 0
        self._peers: dict[str, _Peer] = {}

    def _get(self, peer: str, now: float) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self.max_peers:
                self._peers = {k: v for k, v in self._peers.items() if v.banned_until > now}
            state = self._peers[peer] = _Peer(self.burst, now)
        return state

    def banned(self, peer: str, now: float | None = None) -> bool:
        state = self._peers.get(peer)
        return state is not None and state.banned_until > (time.monotonic() if now is None else now)

    def allow(self, peer: str, now: float | None = None) -> bool:
        """One request from `peer`: False if it is banned or over its rate."""
        now = time.monotonic() if now is None else now
        state = self._get(peer, now)
        if state.banned_until > now:
            return False
        if self.rate <= 0:
            return True
        state.tokens = min(self.burst, state.tokens + (now - state.stamp) * self.rate)
        state.stamp = now
        if state.tokens < 1:
            self.refused += 1
            return False
        state.tokens -= 1
        return True

    def strike(self, peer: str, now: float | None = None) -> bool:
        """`peer` failed a challenge; True if that got it banned."""
        now = time.monotonic() if now is None else now
        state = self._get(peer, now)
        if now - state.first_strike > STRIKE_WINDOW:
            state.strikes, state.first_strike = 0, now
        state.strikes += 1
        if state.strikes >= self.strikes and state.banned_until <= now:
            state.banned_until = now + self.ban_seconds
            self.bans += 1
            log.warning("peer banned after failed challenges",
                        extra={"to": self.name, "from": peer, "seconds": self.ban_seconds})
            return True
        return False
