"""containerd's configuration on a host, changed to use cs-p2p and changed back exactly.

Three things are written, each undone by `unwire`:
- the drop-in (`conf.d/cs-p2p.toml`, `containerd_config`'s fragment);
- an import of that drop-in in the node's `config.toml`, where the file does not import it
  already (containerd 2.3's own config imports `conf.d/*.toml`; 2.0's and most distributions'
  do not), or a `config.toml` with that import alone where the node has none (containerd then
  reads no import at all, 2.3 included);
- a `hosts.toml` per mirrored registry in the directory the node's config already names for
  registries (`config_path`), or the default one.

A file the installer changes is first kept as `<file>.cs-p2p-orig` (once: a second install
keeps the true original), and a file it creates is marked so, so that the uninstall restores
the node's own files byte for byte and removes only what cs-p2p added.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass

from ..config import MirrorRegistry
from ..containerd_config import (DEFAULT_HOSTS_DIR, check_mirror_address, config_version_of, containerd_config,
                                 hosts_toml, native_config_version)
from .files import write_if_changed

ORIG_SUFFIX = ".cs-p2p-orig"
CREATED_MARK = "# cs-p2p: created by the installer\n"
_IMPORTS = re.compile(r"^imports\s*=\s*\[[^\]]*\]", re.MULTILINE)


@dataclass(frozen=True)
class ContainerdFiles:
    """Where a host's containerd configuration lives (under the host's root, `host`)."""

    host: str
    config: str = "/etc/containerd/config.toml"
    drop_in: str = "/etc/containerd/conf.d/cs-p2p.toml"

    def on_host(self, path: str) -> str:
        return os.path.join(self.host, path.lstrip("/"))


def _keep_original(path: str) -> None:
    """Before the first change: keep the node's own file (or mark that there was none)."""
    orig = path + ORIG_SUFFIX
    if os.path.exists(orig):
        return
    if os.path.exists(path):
        os.link(path, orig) if not os.path.islink(path) else os.symlink(os.readlink(path), orig)
    else:
        write_if_changed(orig, CREATED_MARK)


def _restore_original(path: str) -> bool:
    orig = path + ORIG_SUFFIX
    if not os.path.exists(orig):
        return False
    with open(orig) as f:
        created = f.read() == CREATED_MARK
    if created:
        os.unlink(orig)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        os.replace(orig, path)
    return True


def registry_hosts_dir(files: ContainerdFiles) -> str:
    """The `config_path` the node's config.toml gives the CRI plugin's registries (both the
    2.x and the 1.x name), or containerd's conventional directory."""
    try:
        with open(files.on_host(files.config), "rb") as f:
            plugins = tomllib.load(f).get("plugins", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return DEFAULT_HOSTS_DIR
    for name in ("io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"):
        path = plugins.get(name, {}).get("registry", {}).get("config_path", "")
        if path:
            return path.split(":")[0]  # containerd accepts a list separated by ':'; the first is ours
    return DEFAULT_HOSTS_DIR


def _imports(text: str) -> list[str]:
    return list(tomllib.loads(text).get("imports", []))


def _with_import(text: str, drop_in: str) -> str:
    """`text` (a config.toml) importing `drop_in` too; nothing else changes."""
    imports = _imports(text)
    line = "imports = [" + ", ".join(f'"{p}"' for p in [*imports, drop_in]) + "]"
    if _IMPORTS.search(text):
        new = _IMPORTS.sub(lambda _: line, text, count=1)
    else:  # a top-level key goes before the first table
        m = re.search(r"^\s*\[", text, re.MULTILINE)
        at = m.start() if m else len(text)
        new = text[:at] + ("" if at == 0 or text[:at].endswith("\n") else "\n") + line + "\n" + text[at:]
    before, after = tomllib.loads(text), tomllib.loads(new)
    after_imports = after.pop("imports")
    before.pop("imports", None)
    if before != after or after_imports != [*imports, drop_in]:
        raise ValueError("could not add an import to containerd's config.toml without changing anything else")
    return new


def _imported(text: str, drop_in: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(drop_in, pattern) for pattern in _imports(text))


def wire(files: ContainerdFiles, socket: str, release: str, registries: list[MirrorRegistry],
         mirror_listen: str) -> bool:
    """Make cs-p2p the host's containerd's content store (and applier, and mirror).  Returns
    whether anything changed: containerd must then be restarted to see it."""
    if registries:
        check_mirror_address(release, mirror_listen)  # before anything is written
    config_path = files.on_host(files.config)
    changed = False
    if os.path.exists(config_path):
        with open(config_path) as f:
            text = f.read()
        if not _imported(text, files.drop_in):
            _keep_original(config_path)
            changed |= write_if_changed(config_path, _with_import(text, files.drop_in))
    else:  # containerd reads no import, not even 2.3's default conf.d, without a config.toml
        _keep_original(config_path)
        changed |= write_if_changed(config_path, f"{CREATED_MARK}version = {native_config_version(release)}\n"
                                       f"imports = [\"{files.drop_in}\"]\n")
    hosts_dir = registry_hosts_dir(files)
    for reg in registries:
        path = os.path.join(files.on_host(hosts_dir), reg.host, "hosts.toml")
        _keep_original(path)
        changed |= write_if_changed(path, hosts_toml(reg, mirror_listen))
    fragment = containerd_config(socket, release, hosts_dir if registries else None,
                                 root_version=config_version_of(config_path))
    changed |= write_if_changed(files.on_host(files.drop_in), fragment)
    return changed


def unwire(files: ContainerdFiles) -> bool:
    """Undo `wire`: the drop-in removed, every file it changed restored, every file it created
    removed.  Returns whether anything changed."""
    changed = False
    try:
        os.unlink(files.on_host(files.drop_in))
        changed = True
    except FileNotFoundError:
        pass
    changed |= _restore_original(files.on_host(files.config))
    hosts_dir = files.on_host(registry_hosts_dir(files))
    if os.path.isdir(hosts_dir):
        for name in os.listdir(hosts_dir):
            path = os.path.join(hosts_dir, name, "hosts.toml")
            if _restore_original(path):
                changed = True
                try:
                    os.rmdir(os.path.dirname(path))  # a directory the installer made, now empty
                except OSError:
                    pass
    return changed
