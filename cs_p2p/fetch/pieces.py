"""One fetch's file and what has landed in it: whole pieces, the bytes of pieces still
arriving, the readers, appliers and relays waiting on them, and the digest following the
prefix of whole pieces.  The fetcher (`fetcher`) writes it; the content service, the
applier and the peer server read it while it grows.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import aiohttp

from ..store.blobs import sha256_of_fd, start_writeback

PIECE = 4 << 20
PIECES_HEADER = "X-CS-P2P-Pieces"  # a relay's pieces when its response began: "<whole>,<arriving>", hex bit masks
# Bytes of a piece that arrive between wake-ups of the relays forwarding it.  A relay gets 4
# pieces at once, each at a quarter of the blob's rate, so each hop of a chain of nodes waited
# for this much of a piece: ~170 ms at 256 KiB with four blobs sharing a 200 Mbit/s link.
RELAY_STEP = 64 << 10


def pieces_of(header: str) -> tuple[int, int]:
    """(whole, arriving) bit masks of a relay's `PIECES_HEADER`; none if it is missing or bad."""
    try:
        whole, arriving = header.split(",")
        return int(whole, 16), int(arriving, 16)
    except ValueError:
        return 0, 0


class FetchFailed(Exception):
    pass


class Origin(Protocol):
    """Where a blob lives upstream: the registry and repository it was pulled from."""

    async def open_range(self, digest: str, start: int, end: int) -> aiohttp.ClientResponse:
        """A 206 with bytes [start, end), or a 200 with the whole blob; FetchFailed if not."""
        ...


@dataclass
class Fetch:
    digest: str
    size: int
    path: str
    pieces: int
    done_pieces: set[int] = field(default_factory=set)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    error: str | None = None
    committed: bool = False
    # the digest matched: every byte may be handed out, while the commit makes the blob durable
    verified: bool = False
    task: asyncio.Task | None = None
    bytes_from: dict[str, int] = field(default_factory=dict)
    source: dict[int, str] = field(default_factory=dict)  # piece -> provider that sent it
    trusted: Callable[[str], bool] = lambda addr: True  # whose unverified pieces `Read` may stream
    origin: Origin | None = None  # the registry, known from the start (a claim) or once peers failed
    whole_body: "asyncio.Future | None" = None  # the registry ignored Range: one response streams it all
    repaired: bool = False  # pieces were written again: what was streamed of them may be wrong
    started: float = field(default_factory=time.time)  # unix time (the timeline's clock)
    first_byte: dict[str, float] = field(default_factory=dict)  # source -> unix time of its first byte
    last_byte: dict[str, float] = field(default_factory=dict)  # source -> unix time its last piece ended
    landed: dict[int, int] = field(default_factory=dict)  # piece -> bytes of it written so far, from its start
    prefix: "PrefixHash | None" = None  # the digest of the whole pieces from the start, as they land
    relay_has: dict[str, tuple[int, int]] = field(default_factory=dict)  # relay -> its pieces (`pieces_mask`)
    # piece -> relays waiting for more of its bytes (`wait_landed`), woken by `arrived` alone
    landing: dict[int, list[asyncio.Future]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # providers given up on: not chosen again as the relay
    # `Info` told containerd the blob exists: no download of its own stands behind this fetch
    only_way: bool = False
    wanted: asyncio.Event = field(default_factory=asyncio.Event)  # a reader or a relay waits on its bytes

    def covered(self, offset: int, n: int, trusted_only: bool = False) -> bool:
        first, last = offset // PIECE, (offset + max(n, 1) - 1) // PIECE
        return all(p in self.done_pieces and (not trusted_only or self.trusted(self.source.get(p, "")))
                   for p in range(first, min(last, self.pieces - 1) + 1))

    async def wait_range(self, offset: int, n: int, trusted_only: bool = False, verified_tail: bool = False) -> None:
        """Return when [offset, offset+n) is on disk; raise FetchFailed if the fetch failed.

        A range that reaches the end of the blob waits for the commit: a reader never gets a
        whole blob before it is verified and kept, so corrupt data cannot pass as complete,
        nor a blob the store then fails to keep.  With `verified_tail`, only for the digest
        check (the applier, which waits for the commit before it answers).  With
        `trusted_only`, a range with pieces of providers not proven honest yet waits too.
        """
        tail = offset + n >= self.size
        self.wanted.set()
        await self._until(lambda: self.committed or (verified_tail and self.verified)
                          or (not tail and self.covered(offset, n, trusted_only)))

    def landed_end(self, offset: int) -> int:
        """The end of the bytes written from `offset` on without a gap: whole pieces, then
        what has arrived of the next one (none of it verified yet)."""
        if self.committed:
            return self.size
        piece, end = offset // PIECE, offset
        while piece < self.pieces and piece in self.done_pieces:
            piece += 1
            end = min(self.size, piece * PIECE)
        if piece < self.pieces:
            end = max(end, piece * PIECE + self.landed.get(piece, 0))
        return end

    async def wait_landed(self, offset: int) -> int:
        """Return once bytes from `offset` on have been written, with the end of them;
        FetchFailed if the fetch failed first.  Unverified, the last piece too: for a relay,
        whose follower verifies the blob itself, so a chain of nodes forwards each byte as it
        arrives instead of one piece, and the blob's verification, per hop.  Woken by the
        bytes of its own piece (`arrived`) or any other change (`_notify`), not by every
        piece's bytes: the other waiters are not woken by bytes either."""
        self.wanted.set()
        while True:
            self._raise_if_failed()
            end = self.landed_end(offset)
            if end > offset:
                return end
            waiter = asyncio.get_running_loop().create_future()
            waiting = self.landing.setdefault(offset // PIECE, [])
            waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in waiting:
                    waiting.remove(waiter)

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Return once `ready()` holds, checked at every change; FetchFailed if the fetch fails first."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.error is not None or ready())
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None and not self.committed:
            raise FetchFailed(self.error)

    async def arrived(self, piece: int, n: int) -> None:
        """`n` bytes of `piece` are written from its start: relays waiting on them are woken
        every `RELAY_STEP` bytes."""
        before = self.landed.get(piece, 0)
        if n > before:
            self.landed[piece] = n
            if n // RELAY_STEP != before // RELAY_STEP:
                _wake(self.landing.pop(piece, []))

    def pieces_mask(self) -> str:
        """`PIECES_HEADER`: the pieces on disk whole, and those arriving (some bytes landed)."""
        whole = sum(1 << p for p in self.done_pieces)
        arriving = sum(1 << p for p, n in self.landed.items() if n and p not in self.done_pieces)
        return f"{whole:x},{arriving:x}"

    def open(self, committed_path: str) -> int:
        """A read-only fd of the file this fetch writes into, or of the blob it has just been
        committed as; FetchFailed if it ended without a commit."""
        for path in (self.path, committed_path):
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
        raise FetchFailed(self.error or "the fetch ended without a commit")

    async def _notify(self) -> None:
        for waiting in list(self.landing.values()):
            _wake(waiting)
        self.landing.clear()
        async with self.changed:
            self.changed.notify_all()


def _wake(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _hash_and_write_back(fd: int, hasher: "hashlib._Hash", start: int, end: int) -> tuple["hashlib._Hash", int]:
    """Hash whole pieces that landed and start writing them to disk (`start_writeback`)."""
    hasher, reached = sha256_of_fd(fd, hasher, start, end)
    start_writeback(fd, start, reached - start)
    return hasher, reached


class PrefixHash:
    """The blob's sha256 over its whole pieces from the start, fed as they land, so that the
    verification at the fetch's end reads only the rest instead of the whole blob again (on a
    node also relaying and applying, 0.3-0.8 s for 64 MiB, on the pull's path: the applier's
    last piece waits for it).  Only a shortcut: a fetch with pieces written again, or whose
    shortcut does not match, is hashed whole.  Reads a duplicate of the fetch's fd, closed when
    it stops, so the fetch may close its own whenever it ends."""

    def __init__(self, fetch: Fetch, fd: int) -> None:
        self.hasher = hashlib.sha256()
        self.offset = 0  # bytes hashed
        self.stopping = False
        self._task = asyncio.get_running_loop().create_task(self._follow(fetch, os.dup(fd)))

    def _prefix_end(self, fetch: Fetch) -> int:
        piece = self.offset // PIECE
        while piece in fetch.done_pieces:
            piece += 1
        return min(fetch.size, piece * PIECE)

    async def _follow(self, fetch: Fetch, fd: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.stopping and not fetch.repaired:
                end = self._prefix_end(fetch)
                if end > self.offset:
                    self.hasher, self.offset = await loop.run_in_executor(None, _hash_and_write_back, fd,
                                                                          self.hasher, self.offset, end)
                    continue
                async with fetch.changed:
                    await fetch.changed.wait_for(lambda: self.stopping or self._prefix_end(fetch) > self.offset)
        finally:
            os.close(fd)

    async def stop(self, fetch: Fetch) -> None:
        """Stop after the chunk being hashed, if any: the hasher is then the caller's."""
        self.stopping = True
        await fetch._notify()
        await asyncio.wait([self._task])
