"""A host under a directory, and a systemctl that really starts its two services.

The installer writes host-absolute paths (containerd's `/etc/containerd/config.toml` imports
`/etc/containerd/conf.d/cs-p2p.toml`, the drop-in names `/run/cs-p2p/content.sock`, the unit
runs `/opt/cs-p2p/current`).  So that a test can check them for real without touching this
machine's own files, every service of the fake host runs in a private mount namespace where
the host's directories are bind mounts of the fake host's (`FakeHost.wrap`): inside, the
paths are the real ones; outside, the files are under the fake host's directory.

`python -m tests.integration.fakehost HOST systemctl-args...` is the systemctl the installer
is given: `start`, `stop`, `restart` of `containerd.service` (the release's containerd, with
the host's config.toml) and `cs-p2p.service` (started as systemd starts the unit the installer
wrote: its `RootDirectory=`, `BindPaths=`, `BindReadOnlyPaths=`, API file systems and
`ExecStart=`); `enable`, `disable` and `daemon-reload` are recorded only.  Every call is logged
to HOST/systemctl.log; each service's pid is kept in HOST/fake-systemd/NAME.pid.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

from cs_p2p_dev import proctree
from cs_p2p_dev.releases import release
from cs_p2p.install.unit import UNIT_PATH, parse_unit

# the host's directories a service of the fake host sees as its own
HOST_DIRS = ("/etc/containerd", "/var/lib/containerd", "/run/containerd", "/etc/cs-p2p", "/var/lib/cs-p2p",
             "/run/cs-p2p", "/opt/cs-p2p")
SERVICES = ("containerd.service", "cs-p2p.service")


class FakeHost:
    def __init__(self, root: str) -> None:
        self.root = root
        for d in HOST_DIRS:
            os.makedirs(self.path(d), exist_ok=True)
            os.makedirs(d, exist_ok=True)  # an empty mount point on this machine, if it had none
        os.makedirs(self.path("/fake-systemd"), exist_ok=True)

    def path(self, host_path: str) -> str:
        return os.path.join(self.root, host_path.lstrip("/"))

    @property
    def containerd_socket(self) -> str:
        return self.path("/run/containerd/containerd.sock")

    @property
    def systemctl(self) -> str:
        return shlex.join([sys.executable, "-m", "tests.integration.fakehost", self.root])

    def wrap(self, script: str) -> list[str]:
        """`script` run by sh in a mount namespace of its own that sees this host's directories."""
        # (uninstall removes /opt/cs-p2p and /etc/cs-p2p: an empty directory stands in for them)
        binds = "; ".join(f"mkdir -p {shlex.quote(self.path(d))}; mount --bind {shlex.quote(self.path(d))} {d}"
                          for d in HOST_DIRS)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", f"{binds}; {script}"]

    def systemctl_log(self) -> list[str]:
        try:
            with open(self.path("/systemctl.log")) as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def pid(self, service: str) -> int | None:
        try:
            with open(self.path(f"/fake-systemd/{service}.pid")) as f:
                pid = int(f.read())
        except FileNotFoundError:
            return None
        return pid if proctree.alive(pid) else None

    def start(self, service: str) -> None:
        if self.pid(service):
            return
        if service == "containerd.service":
            r = release()
            script = f"exec {shlex.quote(r.bin('containerd'))}"
            env = r.env()
        else:
            script = self._unit_script()
            env = dict(os.environ)
        with open(self.path(f"/fake-systemd/{service}.log"), "ab") as log:
            proc = subprocess.Popen(self.wrap(script), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True)
        with open(self.path(f"/fake-systemd/{service}.pid"), "w") as f:
            f.write(str(proc.pid))

    def _unit_script(self) -> str:
        """What systemd does for the unit: the root, its API file systems and binds, then ExecStart."""
        with open(self.path(UNIT_PATH)) as f:
            unit = parse_unit(f.read())
        root = unit["RootDirectory"]
        steps = [f"root=$(readlink -f {root})"]
        if unit.get("MountAPIVFS") == "yes":
            steps += ['mount -t proc proc "$root/proc"', 'mount --rbind /sys "$root/sys"',
                      'mount --rbind /dev "$root/dev"']
        for key, ro in (("BindPaths", False), ("BindReadOnlyPaths", True)):
            for path in unit.get(key, "").split():
                optional = path.startswith("-")
                path = path.lstrip("-")
                # systemd makes a missing mount point, as a directory (files are bound over existing files)
                step = (f'{{ [ -e "$root{path}" ] || mkdir -p "$root{path}"; }} && mount --bind {path} "$root{path}"'
                        + (f' && mount -o remount,bind,ro "$root{path}"' if ro else ""))
                if optional:
                    step = f'if [ -e {path} ]; then touch "$root{path}" 2>/dev/null || true; {step}; fi'
                steps.append(step)
        steps.append(f'exec chroot "$root" {unit["ExecStart"]}')
        return "; ".join(steps)

    def stop(self, service: str, timeout: float = 20) -> None:
        pid = self.pid(service)
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proctree.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proctree.alive(pid):
            os.kill(pid, signal.SIGKILL)
        os.unlink(self.path(f"/fake-systemd/{service}.pid"))

    def stop_all(self) -> None:
        for service in SERVICES:
            self.stop(service)


def main(argv: list[str]) -> int:
    host = FakeHost(argv[0])
    args = argv[1:]
    with open(host.path("/systemctl.log"), "a") as f:
        f.write(" ".join(args) + "\n")
    verb, names = args[0], [a for a in args[1:] if not a.startswith("-")]
    if verb == "disable" and "--now" in args:
        verb = "stop"
    for name in names:
        if name not in SERVICES:
            print(f"fake systemctl: unknown unit {name}", file=sys.stderr)
            return 5
        if verb in ("stop", "restart"):
            host.stop(name)
        if verb in ("start", "restart"):
            host.start(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
