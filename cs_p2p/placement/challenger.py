"""Proofs of storage, the challenging side: a node that relies on provider records checks
that their holders hold the blob (the format: `proofs`).

A record says "I hold this blob"; nothing made it true.  A node that deleted the blob behind
the DHT's back (a disk wiped, a bug, a free rider) would keep being counted by the replication
floor and tried by every fetch.  So the nodes that keep a blob's records (the watchers, see
`floor`) challenge its holders now and then: "return sha256(nonce || bytes[a:a+n])" for a
nonce and a range they pick.  The answer cannot be precomputed and cannot be given without
the bytes.

- A watcher that holds the blob itself computes the answer from its own copy: a wrong answer
  is caught.  One that does not can still catch "not held" (404) and no answer at all; a
  wrong hash needs a copy to be told from a right one.
- A failed proof drops the record from the watcher's store (lookups through it no longer
  return it, and the floor counts one holder less, so it copies the blob elsewhere).  Only a
  wrong or unsigned answer is evidence of cheating: that counts against the holder as corrupt
  data does, banned from fetches for a while.  "Not held" (404) drops the record and nothing
  more: an honest node answers so for a blob its GC deleted while the withdraw datagram was
  lost, and it still serves every other blob.  No answer counts as a failed probe (three in a
  row ban it).
- In key-pair mode the answer is signed by the holder's key over the digest, nonce, range
  and answer, and checked against the certificate its records came with: a node cannot
  answer for another.
- Cheap and bounded: at most `bytes_per_minute` of challenged ranges per watcher (each
  range at most `MAX_RANGE`), over the peer transport with its authentication and limits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

from ..digests import parse_digest
from ..dht.node import DhtNode
from ..dht.providers import ProviderRecord
from ..expiring import Expiring
from ..fetch.fetcher import Fetcher
from ..identity import IdentityError
from ..store import LocalStore
from ..proofs import Challenge, answer, pick, signable

log = logging.getLogger("cs_p2p.placement")

DEFAULT_INTERVAL = 30.0
DEFAULT_BYTES_PER_MINUTE = 16 << 20
# Challenges a round sends at most, whatever the byte budget: a node watching thousands of small
# blobs must not send thousands of requests at once (they queue behind `Info`'s probes).
MAX_PER_ROUND = 16
MAX_ASKED = 10_000  # keys remembered as checked out of turn


def jittered(interval: float) -> float:
    """`interval` on average, anywhere from half to one and a half of it.  Nodes started
    together (a DaemonSet rolled out, a simulated cluster) otherwise challenge in step, and a
    holder that dies is first challenged half an interval later, however many watchers it
    has; out of step, one of its ~20 watchers challenges it within a small share of that
    (`hack/bench-sim`: a dead holder found after 5 s in the median, with 10 s rounds)."""
    return interval * random.uniform(0.5, 1.5)


NO_ANSWER = "no answer"
NOT_HELD = "does not hold the blob"


def verdict(expected: str | None, status: int | None, result: str | None, signed: bool) -> str | None:
    """Why a holder failed its proof, or None if it passed (or nothing can be told)."""
    if status is None:
        return NO_ANSWER
    if status == 404:
        return NOT_HELD
    if status != 200 or result is None:
        return None  # busy (429, 503) or refused for another reason: not a proof either way
    if not signed:
        return "answer not signed by the holder"
    if expected is not None and result != expected:
        return "wrong answer"
    return None


class Challenger:
    def __init__(self, dht: DhtNode, store: LocalStore, fetcher: Fetcher, interval: float = DEFAULT_INTERVAL,
                 bytes_per_minute: int = DEFAULT_BYTES_PER_MINUTE) -> None:
        self.dht = dht
        self.store = store
        self.fetcher = fetcher
        self.interval = interval
        self.bytes_per_minute = bytes_per_minute
        self.failed = 0  # proofs failed, over the node's life
        self._disputed: dict[bytes, float] = {}  # key -> until when one of its holders is in doubt
        # Told of each key that lost a record here (`ReplicaFloor.recheck`): the floor then
        # acts at once instead of at its next check, which halves how long a blob stays short.
        self.on_record_dropped: Callable[[bytes], None] | None = None
        self._asked = Expiring(MAX_ASKED)  # keys checked out of turn a moment ago
        self._spent_out_of_turn = 0  # bytes challenged by `check_now` since the last round

    def in_doubt(self, key: bytes) -> bool:
        """Two holders of the blob gave different answers to one challenge, and this node has
        no copy to tell which is wrong: the replication floor counts one holder less, so a node
        fetches a copy (verified against the digest, the liar's pieces found and banned) and can
        judge from then on."""
        until = self._disputed.get(key)
        if until is not None and until < time.monotonic():
            del self._disputed[key]
            return False
        return until is not None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(jittered(self.interval))
            try:
                await self.round()
            except Exception:  # one bad round must not end the checks
                log.exception("proof round failed")

    async def round(self) -> int:
        """Challenge holders of watched blobs within this round's share of the budget; returns
        how many challenges were sent."""
        # What checks out of turn spent since the last round comes off this one's share.
        share = int(self.bytes_per_minute * self.interval / 60)
        budget, self._spent_out_of_turn = share - self._spent_out_of_turn, max(0, self._spent_out_of_turn - share)
        protocol = self.dht.protocol
        keys = list(protocol.digests.items())
        random.shuffle(keys)
        sent = []
        for key, digest in keys:
            holders = [r for r in protocol.providers.get(key) if not r.inflight and r.node_id != self.dht.node_id]
            if not holders or budget <= 0 or len(sent) >= MAX_PER_ROUND:
                continue
            # With a copy here, one holder's answer is checked against it; without, two holders
            # answer the same challenge and are checked against each other.
            mine = self.store.served_path(parse_digest(digest)) is not None
            chosen = random.sample(holders, 1 if mine else min(2, len(holders)))
            ch = pick(digest, chosen[0].size, budget // len(chosen))
            if ch is None or any(r.size != chosen[0].size for r in chosen):
                continue
            budget -= ch.length * len(chosen)
            sent.append(self._check(key, chosen, ch))
        await asyncio.gather(*sent)
        return len(sent)

    async def check_now(self, key: bytes) -> bool:
        """Challenge every holder of one key now, out of turn: another watcher found the blob
        short and this node is ahead of it in the floor's ranking (`ReplicaFloor.asked`), so
        this node must see the dead holder before the floor can act here.  At most once per
        key per round; what it challenges counts against the proof budget (the next round
        sends less), and past a round's worth it waits for the rounds."""
        if key in self._asked or not self._asked.add(key, self.interval):
            return False
        digest = self.dht.protocol.digests.get(key)
        holders = [r for r in self.dht.protocol.providers.get(key) if not r.inflight and r.node_id != self.dht.node_id]
        if digest is None or not holders:
            return False
        holders = [r for r in holders if r.size == holders[0].size][:MAX_PER_ROUND]
        share = int(self.bytes_per_minute * self.interval / 60)
        if self._spent_out_of_turn >= share:  # a round's worth already: wait for the rounds
            return False
        ch = pick(digest, holders[0].size, max(1, share // MAX_PER_ROUND // len(holders)))
        if ch is None:
            return False
        self._spent_out_of_turn += ch.length * len(holders)
        await self._check(key, holders, ch)
        return True

    async def _check(self, key: bytes, holders: list[ProviderRecord], ch: Challenge) -> None:
        own = self.store.served_path(parse_digest(ch.digest))
        expected = None
        if own is not None:
            try:
                expected = await self._own_answer(own, ch)
            except (OSError, ValueError):
                return  # our copy went away meanwhile, or sizes disagree: the fetcher handles that
        answers = await asyncio.gather(*(self.fetcher.challenge(rec, ch) for rec in holders))
        passed = []
        for rec, (status, result, sig) in zip(holders, answers):
            why = verdict(expected, status, result, self._signed(rec, ch, result, sig))
            if why is None:
                if status == 200:
                    passed.append(result)
                continue
            self.failed += 1
            self.dht.protocol.refute(key, rec.node_id, 2 * self.interval)
            log.warning("proof of storage failed: record dropped", extra={
                "digest": ch.digest, "addr": rec.addr, "node_id": rec.node_id.hex(), "reason": why})
            if why != NOT_HELD:  # a 404 is no evidence against the node: its record goes, nothing more
                self.fetcher.failed_proof(rec.addr, ch.digest, banned=why != NO_ANSWER)
            if self.on_record_dropped:
                self.on_record_dropped(key)
        if len(set(passed)) > 1:
            self._disputed[key] = time.monotonic() + 4 * self.interval
            log.warning("holders disagree on a proof of storage", extra={
                "digest": ch.digest, "holders": [r.addr for r in holders]})

    async def _own_answer(self, path: str, ch: Challenge) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, answer, path, ch)

    def _signed(self, rec: ProviderRecord, ch: Challenge, result: str | None, sig: bytes | None) -> bool:
        protocol = self.dht.protocol
        if protocol.identity is None:
            return True  # a cluster token or open membership: the transport is the only check
        der = protocol.certs.get(rec.node_id)
        if der is None or sig is None or result is None:
            return False
        try:
            return protocol.identity.trust.member(der, time.time()).verify(signable(ch, result), sig)
        except IdentityError:  # its certificate expired, or its CA is no longer trusted
            return False
