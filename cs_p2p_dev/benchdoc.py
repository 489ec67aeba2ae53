"""docs/benchmarks.md: each benchmark script owns one `## ` section and rewrites only it."""

from __future__ import annotations

import os

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")


def write_section(path: str, section: str, head: str) -> None:
    """Replace the section starting at `head` (or append it), keeping the others."""
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n\n"
    section = section.rstrip("\n") + "\n\n"  # a blank line before the next section
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def command_line(script: str, argv: list[str]) -> str:
    """The command as a reader reruns it: `--out FILE` (or `--out=FILE`) left out, since the
    section lands in docs/benchmarks.md by default."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return " ".join([script, *kept])


def verdict(ok: bool) -> str:
    """A target, judged from the numbers of the run: what the section says, not the reader."""
    return "met" if ok else "**not met**"
