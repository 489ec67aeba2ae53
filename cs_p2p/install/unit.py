"""The systemd unit that runs the host's copy of cs-p2p.

cs-p2p must be up before containerd (containerd dials its socket as it starts) and must not
need containerd to start, so it runs as a systemd unit, never as a pod whose image lives in
the content store it serves.  The copy the installer put under `/opt/cs-p2p/current` is a
whole root file system (the image's), so the host needs no Python: the unit runs it with
`RootDirectory=` and binds in only what cs-p2p uses from the host.
"""

from __future__ import annotations

import shlex

UNIT_PATH = "/etc/systemd/system/cs-p2p.service"
OPT = "/opt/cs-p2p"
CURRENT = f"{OPT}/current"
ETC = "/etc/cs-p2p"
STATE = "/var/lib/cs-p2p"
RUN = "/run/cs-p2p"
ENTRYPOINT = "/usr/local/bin/cs-p2p"
# read-write: the store, the socket's directory, and containerd's root (the layer applier writes
# into the snapshots containerd hands it); read-only: settings and name resolution
BIND_PATHS = (STATE, RUN)
BIND_READ_ONLY_PATHS = (ETC, "-/etc/resolv.conf", "-/etc/hosts")


def render_unit(serve_args: list[str], containerd_root: str = "/var/lib/containerd") -> str:
    """The unit for the copy under `CURRENT`, serving with the host's config plus `serve_args`."""
    exec_start = shlex.join([ENTRYPOINT, "serve", "--config", f"{ETC}/config.toml", *serve_args])
    return f"""\
# Written by cs-p2p's installer (cs-p2p host-install); removed by cs-p2p host-uninstall.
[Unit]
Description=cs-p2p peer-to-peer content store for containerd
# containerd dials cs-p2p's socket at start-up: cs-p2p is up first, and needs nothing of containerd.
Before=containerd.service
Wants=network-online.target
After=network-online.target local-fs.target

[Service]
Type=simple
# The image's root file system, copied by the installer: the host needs no Python.
RootDirectory={CURRENT}
MountAPIVFS=yes
BindPaths={' '.join((*BIND_PATHS, containerd_root))}
BindReadOnlyPaths={' '.join(BIND_READ_ONLY_PATHS)}
ExecStart={exec_start}
Restart=always
RestartSec=1
# SIGTERM: in-flight ingests are kept on disk and resume after the restart.
KillSignal=SIGTERM
TimeoutStopSec=20
RuntimeDirectory=cs-p2p
RuntimeDirectoryMode=0750
RuntimeDirectoryPreserve=yes
StateDirectory=cs-p2p
LimitNOFILE=1048576

[Install]
# Wanted, not required, by containerd: restarting cs-p2p (an upgrade) leaves containerd running.
WantedBy=multi-user.target containerd.service
"""


def parse_unit(text: str) -> dict[str, str]:
    """The `[Service]` settings of a unit: what a test needs to start it as systemd would."""
    settings: dict[str, str] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings[key] = value
    return settings
