"""Which registry response is read next: the blobs someone waits on first.

The registry's bytes for every blob of a pull arrive on one event loop, which serves the open
responses evenly: eight layers fetched at once all land at the same moment, at the end of the
download, and containerd, which applies two layers at a time, applies the first two as they
stream and the other six after the last byte (1.5 s of an 8 x 128 MiB pull).  A response of a
blob nobody waits on (`Fetch.wanted` unset: no `Read`, no apply, no follower relaying it) is
therefore not read while a blob someone waits on streams from a registry.  TCP holds the
registry back (the bytes wait in the socket, not in this process's memory), and the response
goes on as soon as a reader comes for its blob or the last awaited response ends: the loop's
time goes to the bytes that are needed next, and layers land in the order they are applied.

A blob waited on never pauses, so a relay's followers are never held up by this rule, and no
response waits for a response that is not itself moving (only responses being read count).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Iterator

from ..timeline import TIMELINE
from .pieces import Fetch


class RegistryTurns:
    def __init__(self) -> None:
        self._open: dict[int, tuple[Fetch, int]] = {}  # id(fetch) -> the fetch, its responses being read
        self._ended = asyncio.Event()  # set (and replaced) whenever a response ends

    @contextlib.contextmanager
    def reading(self, fetch: Fetch) -> Iterator[None]:
        """A registry response of `fetch` is open and read for as long as this lasts."""
        key = id(fetch)
        self._open[key] = (fetch, self._open.get(key, (fetch, 0))[1] + 1)
        try:
            yield
        finally:
            left = self._open[key][1] - 1
            if left:
                self._open[key] = (fetch, left)
            else:
                del self._open[key]
            self._ended.set()
            self._ended = asyncio.Event()

    def _awaited_streaming(self, fetch: Fetch) -> bool:
        return any(other is not fetch and other.wanted.is_set() for other, _ in self._open.values())

    async def wait_turn(self, fetch: Fetch) -> None:
        """Return when `fetch`'s response may be read on: at once if a reader waits on it or no
        blob a reader waits on is streaming; else once one of those holds."""
        if fetch.wanted.is_set() or not self._awaited_streaming(fetch):
            return
        t0 = time.monotonic()
        while not fetch.wanted.is_set() and self._awaited_streaming(fetch):
            waits = {asyncio.ensure_future(fetch.wanted.wait()), asyncio.ensure_future(self._ended.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
        TIMELINE.waited("registry_turn", time.monotonic() - t0, fetch.digest)
