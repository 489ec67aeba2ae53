"""Writing a host's files so that a reader never sees half of one and an unchanged file is
not touched (what changed decides which services the installer restarts)."""

from __future__ import annotations

import os

from ..store.blobs import write_file_atomic


def write_if_changed(path: str, data: bytes | str, mode: int | None = None) -> bool:
    """`store.blobs.write_file_atomic`, with `mode` (default: the replaced file's, or 0644), and
    only if the file does not already hold exactly `data` (False then: nothing written)."""
    if isinstance(data, str):
        data = data.encode()
    try:
        with open(path, "rb") as f:
            old_mode = os.fstat(f.fileno()).st_mode & 0o7777
            if f.read() == data:
                if mode is not None and old_mode != mode:
                    os.chmod(path, mode)
                return False
        mode = old_mode if mode is None else mode
    except FileNotFoundError:
        mode = 0o644 if mode is None else mode
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomic(path, data, mode)
    return True
