"""The durable length of an ingest, as peers that stream it see it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cs_p2p.store.progress import IngestGone, Progress


async def test_a_reader_waits_for_bytes_reported_from_the_write_thread():
    p = Progress()
    reader = asyncio.ensure_future(p.wait_beyond(100, 0))
    await asyncio.sleep(0)
    assert not reader.done()
    t = threading.Thread(target=p.advance, args=(0, 4096))  # the writer's I/O thread
    t.start()
    t.join()
    assert await asyncio.wait_for(reader, 5) == 4096


async def test_a_late_report_of_a_truncated_generation_is_ignored():
    p = Progress()
    p.advance(0, 1000)
    p.reset(1)  # truncated: what was written before is not the blob any more
    p.advance(0, 5000)  # a write of the old generation completing late
    await asyncio.sleep(0)
    assert (p.generation, p.durable) == (1, 0)
    with pytest.raises(IngestGone):
        await p.wait_beyond(0, 0)  # a reader of the old generation must stop


async def test_commit_releases_readers_even_before_the_last_write_report():
    p = Progress()
    p.advance(0, 10)
    reader = asyncio.ensure_future(p.wait_beyond(10, 0))
    p.committed(20)  # the last advance(0, 20) has not been applied yet
    assert await asyncio.wait_for(reader, 5) == 20


async def test_an_ingest_that_ends_without_commit_fails_its_readers():
    p = Progress()
    reader = asyncio.ensure_future(p.wait_beyond(0, 0))
    await asyncio.sleep(0)
    p.failed()
    with pytest.raises(IngestGone):
        await asyncio.wait_for(reader, 5)
