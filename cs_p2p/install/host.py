"""Put cs-p2p on a host and make it the host's content store; take it off without a loss.

This is what the Kubernetes DaemonSet's pod runs (with the host's root mounted at `/host`),
and what an operator runs by hand on a host without Kubernetes (`--host /`).  The pod is only
the installer and updater: the host runs its own copy of cs-p2p under systemd (`unit.py`),
so that after a reboot cs-p2p is up before containerd and needs neither containerd nor the
kubelet to start.

Install, in an order that leaves the node working wherever it stops:
1. the image's root file system is copied to `/opt/cs-p2p/<build>` and `/opt/cs-p2p/current`
   switched to it (atomically; the previous build stays for a rollback);
2. the settings, the secrets and the unit are written;
3. on the first install, containerd's builtin store is adopted while containerd runs
   (`store.handover`), containerd's configuration is wired (`wiring.py`), then containerd is
   stopped, what it wrote meanwhile is adopted too, cs-p2p is started and answers on its
   socket, and containerd is started again: the node's one containerd restart.  If cs-p2p
   does not come up, the wiring is undone and containerd starts as it was;
4. on a new build only cs-p2p is restarted: containerd keeps running and its calls fail fast
   for the second or two the restart takes.

Uninstall hands every blob back to containerd's builtin store (`store.handover.release`)
while containerd runs, stops it, hands back what came meanwhile, restores containerd's own
configuration, starts it, and removes the unit and the copy; the store (`/var/lib/cs-p2p`) is
kept unless `purge`.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import DEFAULT_SOCKET, MirrorRegistry
from ..containerd_config import is_v2
from ..store import handover
from . import unit
from .files import write_if_changed
from .contacts import CONTACTS_FILE, resolve, write_contacts
from .wiring import ContainerdFiles, unwire, wire

BUILD_FILE = "usr/lib/cs-p2p/BUILD"  # in the image: which build it is
ROOTFS_ENTRIES = ("bin", "sbin", "lib", "lib64", "usr", "etc")
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "var/tmp", unit.STATE[1:], unit.RUN[1:], unit.ETC[1:])
INSTALLED = f"{unit.ETC}/.installed"  # the names of the files install wrote there
DEFAULT_SYSTEMCTL = "nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl"


class InstallError(Exception):
    """The host was left as it was before this step; the message says why."""


@dataclass
class InstallOptions:
    source: str  # the root file system to copy: the image's, "/" in the installer's pod
    config: str  # cs-p2p's TOML, copied to /etc/cs-p2p/config.toml
    release: str  # containerd's, as containerd-config takes it
    files: list[str] = field(default_factory=list)  # secrets, copied to /etc/cs-p2p/<name> (0600)
    serve_args: list[str] = field(default_factory=list)  # node-specific flags (addresses)
    registries: list[MirrorRegistry] = field(default_factory=list)
    mirror_listen: str = "127.0.0.1:5080"
    socket: str = DEFAULT_SOCKET
    containerd_root: str = "/var/lib/containerd"
    wait_seconds: float = 60.0  # for cs-p2p's socket after a start; 0: do not wait
    bootstrap_names: list[str] = field(default_factory=list)  # NAME:PORT resolved into contacts.CONTACTS_FILE

    def unit_args(self) -> list[str]:
        """The flags the unit serves with: the node's own and, on containerd 1.6 and 1.7, which
        apply layers themselves, no apply workers started before a layer asks for one."""
        return self.serve_args + ([] if is_v2(self.release) else ["--no-apply-prestart"])


class Systemctl:
    """The host's systemctl, reached from a pod by entering PID 1's namespaces."""

    def __init__(self, command: str = DEFAULT_SYSTEMCTL, log: Callable[[str], None] = print) -> None:
        self.argv = shlex.split(command)
        self.log = log

    def __call__(self, *args: str) -> None:
        self.log("systemctl " + " ".join(args))
        res = subprocess.run([*self.argv, *args], capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise InstallError(f"systemctl {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")


class Host:
    """Paths on the host, whose root this process sees at `root` ("/host" in the pod)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def path(self, host_path: str) -> str:
        return os.path.join(self.root, host_path.lstrip("/"))


def build_of(rootfs: str) -> str:
    try:
        with open(os.path.join(rootfs, BUILD_FILE)) as f:
            build = f.read().strip()
    except FileNotFoundError:
        raise InstallError(f"{rootfs} is not a cs-p2p image's root file system (no /{BUILD_FILE})") from None
    if not build or "/" in build or build.startswith("."):
        raise InstallError(f"/{BUILD_FILE} names no build: {build!r}")
    return build


def _copy_rootfs(source: str, dest: str) -> None:
    """The image's files (not /proc, /sys, the pod's mounts...) into `dest`, atomically."""
    tmp = dest + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in ROOTFS_ENTRIES:
        src = os.path.join(source, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(tmp, name))
        elif os.path.isdir(src):
            shutil.copytree(src, os.path.join(tmp, name), symlinks=True,
                            ignore=shutil.ignore_patterns("cs-p2p") if name == "etc" else None)
    for mount_point in MOUNT_POINTS:
        os.makedirs(os.path.join(tmp, mount_point), exist_ok=True)
    os.rename(tmp, dest)


def _switch(link: str, target: str) -> str | None:
    """Point `link` at `target` atomically; returns what it pointed at before."""
    try:
        before = os.readlink(link)
    except FileNotFoundError:
        before = None
    if before != target:
        tmp = f"{link}.tmp.{os.getpid()}"
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return before


def socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _wait_for_socket(path: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not socket_answers(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def install(host: Host, opts: InstallOptions, systemctl: Systemctl, log: Callable[[str], None] = print) -> None:
    build = build_of(opts.source)
    opt = host.path(unit.OPT)
    os.makedirs(opt, exist_ok=True)
    version_dir = os.path.join(opt, build)
    if not os.path.isdir(version_dir):
        log(f"copying cs-p2p {build} to {unit.OPT}/{build}")
        _copy_rootfs(opts.source, version_dir)
    before = _switch(host.path(unit.CURRENT), build)
    upgraded = before is not None and before != build
    if upgraded:
        log(f"upgrade: {before} -> {build}")

    changed = False
    with open(opts.config, "rb") as f:
        changed |= write_if_changed(host.path(f"{unit.ETC}/config.toml"), f.read())
    secrets = _secret_files(opts.files)
    for secret in secrets:
        with open(secret, "rb") as f:
            changed |= write_if_changed(host.path(f"{unit.ETC}/{os.path.basename(secret)}"), f.read(), 0o600)
    # what uninstall removes from /etc/cs-p2p (an operator's own files there, e.g. pki/, stay)
    names = sorted({"config.toml", os.path.basename(CONTACTS_FILE), *(os.path.basename(p) for p in secrets)})
    write_if_changed(host.path(INSTALLED), "".join(n + "\n" for n in names))
    # read by the daemon at each join attempt: a change needs no restart
    write_contacts(host.path(CONTACTS_FILE), resolve(opts.bootstrap_names))
    unit_changed = write_if_changed(host.path(unit.UNIT_PATH), unit.render_unit(opts.unit_args(), opts.containerd_root))
    for d in (unit.STATE, unit.RUN):
        os.makedirs(host.path(d), exist_ok=True)
    if unit_changed or upgraded:
        systemctl("daemon-reload")
    systemctl("enable", "cs-p2p.service")

    files = ContainerdFiles(host.root)
    store, ctd_root = host.path(unit.STATE), host.path(opts.containerd_root)
    first = not os.path.exists(files.on_host(files.drop_in))
    if first and os.path.isdir(ctd_root):
        _adopt(ctd_root, store, log)  # the bulk, while containerd still serves the node
    if wire(files, opts.socket, opts.release, opts.registries, opts.mirror_listen):
        log("containerd wired to cs-p2p: one restart of containerd")
        systemctl("stop", "containerd.service")
        if os.path.isdir(ctd_root):
            _adopt(ctd_root, store, log)  # what containerd wrote since
        if not _restarted(host, opts, systemctl):
            log("cs-p2p did not answer on its socket: containerd's configuration restored")
            unwire(files)
            systemctl("start", "containerd.service")
            raise InstallError(f"cs-p2p did not answer on {opts.socket} within {opts.wait_seconds:.0f} s "
                               "(journalctl -u cs-p2p); containerd runs as before the install")
        systemctl("start", "containerd.service")
    elif upgraded or changed or unit_changed:
        if not _restarted(host, opts, systemctl):
            back = (f"`ln -sfn {before} {unit.CURRENT}` and a restart roll back" if upgraded else
                    "only its settings changed: install again with the previous ones to go back")
            raise InstallError(f"cs-p2p {build} did not answer on {opts.socket} within {opts.wait_seconds:.0f} s "
                               f"(journalctl -u cs-p2p); {back}")
    else:
        systemctl("start", "cs-p2p.service")  # a no-op when it runs
    for name in os.listdir(opt):  # keep this build and the one before, for a rollback
        if name not in (build, before, "current") and not name.startswith("current."):
            shutil.rmtree(os.path.join(opt, name), ignore_errors=True)
    log(f"cs-p2p {build} installed")


def _restarted(host: Host, opts: InstallOptions, systemctl: Systemctl) -> bool:
    """Restart cs-p2p; False if it does not answer on its socket within `opts.wait_seconds`."""
    systemctl("restart", "cs-p2p.service")
    return not opts.wait_seconds or _wait_for_socket(host.path(opts.socket), opts.wait_seconds)


def _secret_files(paths: list[str]) -> list[str]:
    """The files named, a directory standing for the files in it (a mounted Secret: its
    entries are links into a hidden `..data`, which is skipped)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path)
                            if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        else:
            files.append(path)
    return files


def _adopt(containerd_root: str, store: str, log: Callable[[str], None]) -> None:
    report = handover.adopt(containerd_root, store)
    log(f"adopted {report.taken} blobs of containerd's store ({report.present} already held)")
    for digest in report.corrupt:
        log(f"not adopted, its bytes do not match its digest: {digest}")


def uninstall(host: Host, systemctl: Systemctl, containerd_root: str = "/var/lib/containerd", purge: bool = False,
              log: Callable[[str], None] = print) -> None:
    files = ContainerdFiles(host.root)
    store, ctd_root = host.path(unit.STATE), host.path(containerd_root)
    if os.path.exists(files.on_host(files.drop_in)) or os.path.exists(files.on_host(files.config) + ".cs-p2p-orig"):
        if os.path.isdir(store):
            _release(store, ctd_root, log)  # the bulk, while containerd still serves the node
        systemctl("stop", "containerd.service")
        if os.path.isdir(store):
            _release(store, ctd_root, log)  # what containerd wrote since
        unwire(files)
        log("containerd's own configuration restored")
        systemctl("start", "containerd.service")
    if os.path.exists(host.path(unit.UNIT_PATH)):
        systemctl("disable", "--now", "cs-p2p.service")
        os.unlink(host.path(unit.UNIT_PATH))
        systemctl("daemon-reload")
    shutil.rmtree(host.path(unit.OPT), ignore_errors=True)
    _remove_installed(host)
    if purge:
        shutil.rmtree(store, ignore_errors=True)
        log(f"removed {unit.STATE}")
    log("cs-p2p uninstalled")


def _remove_installed(host: Host) -> None:
    """The files install wrote to /etc/cs-p2p, and the directory if nothing else is left."""
    try:
        with open(host.path(INSTALLED)) as f:
            names = f.read().split()
    except FileNotFoundError:
        names = []
    for name in [*names, os.path.basename(INSTALLED)]:
        if name and "/" not in name and not name.startswith(".."):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(host.path(f"{unit.ETC}/{name}"))
    with contextlib.suppress(OSError):
        os.rmdir(host.path(unit.ETC))


def _release(store: str, containerd_root: str, log: Callable[[str], None]) -> None:
    report = handover.release(store, containerd_root)
    log(f"released {report.taken} blobs to containerd's store ({report.present} already there)")
