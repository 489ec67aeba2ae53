"""Writing a host's files so that a reader never sees half of one and an unchanged file is
not touched (what changed decides which services the installer restarts)."""

from __future__ import annotations

import os


def write_if_changed(path: str, data: bytes | str, mode: int | None = None) -> bool:
    """Atomically replace `path` with `data`, synced before the rename, with `mode` (default:
    the replaced file's, or 0644); False, and nothing written, if it already held exactly that."""
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
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return True
