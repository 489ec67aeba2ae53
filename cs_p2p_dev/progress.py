"""Progress for the long steps of the demo and the benchmarks, so that they are not silent:
one line on stderr, rewritten in place on a terminal, and otherwise (CI logs) printed again
at most every few seconds."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    def __init__(self, label: str, total: float | None = None, unit: str = "", out: IO[str] | None = None,
                 every: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.every = every
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0
        self._write(f"{label} …", final=False, force=True)

    def _fmt(self, done: float) -> str:
        if self.unit == "MiB":
            text = f"{done / (1 << 20):.1f}" + (f"/{self.total / (1 << 20):.1f}" if self.total else "") + " MiB"
        else:
            text = f"{done:g}" + (f"/{self.total:g}" if self.total else "") + (f" {self.unit}" if self.unit else "")
        if self.total:
            text += f" ({min(done / self.total, 1.0):.0%})"
        return text

    def _write(self, line: str, final: bool, force: bool = False) -> None:
        now = time.monotonic()
        if not (final or force or self.tty or now - self._last >= self.every):
            return
        self._last = now
        if self.tty:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.out.write("\r" + line + " " * pad + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def update(self, done: float, note: str = "") -> None:
        self._write(f"{self.label}: {self._fmt(done)}" + (f", {note}" if note else ""), final=False)

    def done(self, note: str = "") -> None:
        self._write(f"{self.label}: done in {time.monotonic() - self.t0:.1f} s" + (f", {note}" if note else ""),
                    final=True)
