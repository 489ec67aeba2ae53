"""How much of an ingest is on disk, for peers that stream it while it is being written.

An ingest's bytes reach the disk on the writer's own I/O thread (write-behind), so the
durable length is reported from that thread and applied on the event loop, where the
peer server waits on it.  A truncate starts a new generation: a reader of the old one
must stop, since the bytes it already sent may be rewritten differently.
"""

from __future__ import annotations

import asyncio


class IngestGone(Exception):
    """The ingest a reader was following was aborted, truncated or failed to commit."""


class Progress:
    def __init__(self) -> None:
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None  # a writer driven without a loop (tests, tools): nobody waits
        self.durable = 0
        self.generation = 0
        self.outcome: str | None = None  # "committed" or "failed" once the ingest ended
        self._changed = asyncio.Event() if self._loop else None

    def _apply(self, fn, *args) -> None:
        if self._loop is None:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def advance(self, generation: int, end: int) -> None:
        """Bytes [0, end) of `generation` are on disk.  Callable from any thread; the
        writer numbers its generations, so late reports of an old one are ignored."""
        self._apply(self._set, generation, end)

    def reset(self, generation: int) -> None:
        """The ingest was truncated to zero and its bytes are now `generation`."""
        self._apply(self._set, generation, 0)

    def committed(self, length: int) -> None:
        """Committed with `length` bytes.  Its last `advance` may still be on its way (a
        future's result is visible before its callbacks run), so the length comes along."""
        self._apply(self._finish, "committed", length)

    def failed(self) -> None:
        """Ended without a commit (no-op after one)."""
        self._apply(self._finish, "failed", 0)

    def _set(self, generation: int, end: int) -> None:
        if generation > self.generation:
            self.generation, self.durable = generation, 0
            self._wake()
        if generation == self.generation and end > self.durable:
            self.durable = end
            self._wake()

    def _finish(self, outcome: str, length: int) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.durable = max(self.durable, length)
            self._wake()

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_beyond(self, offset: int, generation: int) -> int:
        """The durable length once it exceeds `offset`; IngestGone if the ingest of
        `generation` will never get there."""
        while True:
            if self.generation != generation or self.outcome == "failed":
                raise IngestGone("the ingest was truncated or ended without a commit")
            if self.durable > offset or self.outcome == "committed":
                return self.durable
            assert self._changed is not None
            await self._changed.wait()
