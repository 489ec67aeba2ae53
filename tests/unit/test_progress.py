"""Long steps of the demo and benchmarks say what they are doing: on a terminal one line
rewritten in place, in a log a line at most every few seconds, and always how it ended."""

from __future__ import annotations

import io

from cs_p2p_dev.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_updates_are_rate_limited_and_the_end_is_always_printed():
    out = io.StringIO()
    p = Progress("pulling", 4 << 20, "MiB", out=out, every=3600)
    for done in range(0, 4 << 20, 1 << 20):
        p.update(done)
    p.done("from peers")
    lines = out.getvalue().splitlines()
    assert lines[0] == "pulling …"
    assert len(lines) == 2 and lines[1].startswith("pulling: done in ") and lines[1].endswith(", from peers")


def test_on_a_terminal_every_update_rewrites_one_line():
    out = Terminal()
    p = Progress("lookups", 10, "lookups", out=out)
    p.update(5, "3 peers")
    p.done()
    text = out.getvalue()
    assert "\rlookups: 5/10 lookups (50%), 3 peers" in text
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "\rlookups: 1/10" not in text
