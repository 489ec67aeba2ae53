"""Digest validation.

Only `sha256:` with 64 lowercase hex characters is accepted: it is the only algorithm
containerd's pull path produces, and a strict check here means a digest can be used
as a file name without any further escaping.
"""

from __future__ import annotations

import re

from .errors import InvalidArgument

_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")


def parse_digest(digest: str) -> str:
    """Return the hex part of a valid sha256 digest, or raise InvalidArgument."""
    m = _SHA256.fullmatch(digest)
    if m is None:
        raise InvalidArgument(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return m.group(1)


def format_digest(hex_: str) -> str:
    return "sha256:" + hex_
