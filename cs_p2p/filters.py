"""containerd's filter language, as `ctr content ls` and containerd's GC send it.

Grammar (containerd/filters/parser.go):

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := "..." (also /.../ and |...| after ~=)

Selectors joined by commas must all match; a request's repeated filters match when
any one of them does.  A selector without operator tests that the field is present.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import InvalidArgument

# An adaptor answers (value, present) for a field path of one object.
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_FIELD_RE = re.compile(r"[A-Za-z0-9_]+")
_OPERATORS = ("==", "!=", "~=")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


@dataclass(frozen=True)
class Selector:
    fieldpath: tuple[str, ...]
    operator: str | None  # None: presence test
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is None:
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return not present or value != self.value
        assert self.pattern is not None
        return present and self.pattern.search(value) is not None


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str) -> InvalidArgument:
        return InvalidArgument(f"filters: parse error: [{self.text} >|{self.pos}|<]: {msg}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def quoted(self, alt_quotes: bool) -> str:
        quote = self.text[self.pos]
        if quote != '"' and not (alt_quotes and quote in "/|"):
            raise self.error("invalid quote encountered")
        out: list[str] = []
        i = self.pos + 1
        while True:
            if i >= len(self.text) or self.text[i] == "\n":
                raise self.error("quoted literal not terminated")
            ch = self.text[i]
            if ch == quote:
                self.pos = i + 1
                return "".join(out)
            if ch == "\\":
                i += 1
                esc = self.text[i] if i < len(self.text) else ""
                if esc in _ESCAPES:
                    out.append(_ESCAPES[esc])
                elif esc == quote:
                    # A regexp between slashes keeps "\/" meaning "/", like Go's unquote.
                    out.append(esc)
                else:
                    raise self.error("illegal escape sequence")
                i += 1
                continue
            out.append(ch)
            i += 1

    def field(self) -> str:
        ch = self.peek()
        if ch in ('"', "/", "|"):
            return self.quoted(alt_quotes=False)
        m = _FIELD_RE.match(self.text, self.pos)
        if not m:
            raise self.error("expected field or quoted")
        self.pos = m.end()
        return m.group(0)

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in (",", ""):
            return Selector(tuple(path), None)
        op = self.text[self.pos : self.pos + 2]
        if op not in _OPERATORS:
            raise self.error('expected an operator ("=="|"!="|"~=")')
        self.pos += 2
        ch = self.peek()
        if ch in ('"', "/", "|"):
            value = self.quoted(alt_quotes=op == "~=")
        else:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] != "," and not self.text[self.pos].isspace():
                self.pos += 1
            value = self.text[start : self.pos]
            if not value:
                raise self.error("expected value or quoted")
        pattern = None
        if op == "~=":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise self.error(f"invalid regular expression: {exc}") from None
        return Selector(tuple(path), op, value, pattern)

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return tuple(selectors)
            if ch != ",":
                raise self.error(f"unexpected input: {ch}")
            self.pos += 1
            selectors.append(self.selector())


@dataclass(frozen=True)
class Filter:
    """Any of `alternatives` matches; each alternative needs all its selectors."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(adaptor) for s in alt) for alt in self.alternatives)


def parse_filters(filters: Iterable[str]) -> Filter:
    """Parse a request's repeated filters; empty strings match everything, as in containerd."""
    alternatives = []
    for text in filters:
        if text == "":
            return Filter(())
        alternatives.append(_Parser(text).parse())
    return Filter(tuple(alternatives))


def info_adaptor(digest: str, labels: dict[str, str]) -> Adaptor:
    """Fields of a blob's Info: `digest` and `labels.<key>` (containerd's content.AdaptInfo)."""

    def adapt(path: Sequence[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        if path[0] == "digest":
            return digest, True
        if path[0] == "labels" and labels:
            key = ".".join(path[1:])
            if key in labels:
                return labels[key], True
        return "", False

    return adapt


def status_adaptor(ref: str) -> Adaptor:
    """Fields of an ingest's Status: only `ref` (containerd's local adaptStatus)."""

    def adapt(path: Sequence[str]) -> tuple[str, bool]:
        if len(path) == 1 and path[0] == "ref":
            return ref, True
        return "", False

    return adapt
