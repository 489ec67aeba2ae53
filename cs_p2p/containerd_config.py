"""containerd wiring: the config.toml fragment that makes cs-p2p the node's content store,
and the `hosts.toml` files that put the node's registry mirror in front of each registry."""

from __future__ import annotations

import os

from .addresses import join_host_port
from .config import MirrorRegistry, parse_host_port

PLUGIN_NAME = "cs-p2p"  # the content proxy plugin
DIFF_PLUGIN_NAME = "cs-p2p-diff"  # the layer applier (containerd 2.x)
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_CONTAINERD_CONFIG = "/etc/containerd/config.toml"
# "2": the newest 2.x.  2.0 and 2.1 have no parallel unpack; 2.3 reads `version = 4` configs.
RELEASES = ("1.6", "1.7", "2.0", "2.1", "2.2", "2.3", "2")
NEWEST_MINOR = 99


def detect_release(containerd: str = "containerd") -> str:
    """"1.6", "1.7" or "2.MINOR" from `containerd --version` ("2" for a later major)."""
    import re
    import subprocess

    try:
        out = subprocess.run([containerd, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"cannot run {containerd} --version ({exc}): pass --containerd-version") from None
    m = re.search(r"\bv?(\d+)\.(\d+)\.\d+", out)
    if not m:
        raise ValueError(f"cannot read a version from {out.strip()!r}: pass --containerd-version")
    major, minor = int(m.group(1)), int(m.group(2))
    if major > 2:
        return "2"
    if major == 2:
        return f"2.{minor}"
    if (major, minor) in ((1, 6), (1, 7)):
        return f"{major}.{minor}"
    raise ValueError(f"containerd {major}.{minor} is not supported (1.6, 1.7 or 2.x)")


def is_v2(release: str) -> bool:
    """containerd 2.x: proxy diff plugins (cs-p2p applies layers), the CRI images plugin."""
    return release == "2" or release.startswith("2.")


def _minor_of_2(release: str) -> int:
    return NEWEST_MINOR if release == "2" else int(release.split(".")[1])


def config_version_of(path: str) -> int | None:
    """The `version` of a containerd config file; None if it is absent or names none (then
    containerd 2.x takes a drop-in of any version)."""
    import tomllib

    try:
        with open(path, "rb") as f:
            version = tomllib.load(f).get("version")
        return None if version is None else int(version)
    except FileNotFoundError:
        return None
    except (tomllib.TOMLDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot read containerd's config {path}: {exc}") from None


def native_config_version(release: str) -> int:
    """The config `version` a release writes itself: 2 for 1.x, 3 for 2.0-2.2, 4 from 2.3."""
    if not is_v2(release):
        return 2
    return 4 if _minor_of_2(release) >= 3 else 3


def _fragment_version(release: str, root_version: int | None) -> int:
    """The drop-in's `version`: containerd 2.x refuses a drop-in newer than the main config
    and migrates an older one, so the fragment takes the main config's version where it is
    one this release reads (2, 3, and 4 from 2.3 on), else 3 (2.x's own; 2 for 1.x)."""
    if not is_v2(release):
        return 2
    newest = native_config_version(release)
    if root_version is None:
        return 3
    if root_version < 2 or root_version > newest:
        raise ValueError(f"containerd {release} with a `version = {root_version}` config.toml: "
                         "run `containerd config migrate` first")
    return root_version


def _platform() -> str:
    import platform

    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return f"linux/{arch}"


def containerd_config(socket: str, release: str = "2", hosts_dir: str | None = None,
                      max_concurrent_unpacks: int | None = None, snapshotter: str = "overlayfs",
                      applier: bool = True, root_version: int | None = None) -> str:
    """The config.toml fragment that makes cs-p2p the node's content store and, on
    containerd 2.x, its layer applier; with `hosts_dir`, the CRI plugin resolves registries
    through the hosts.toml files there (the mirror).

    The builtin store must be disabled: with both enabled containerd 1.6/1.7 picks one of
    the two at random on each start, and 2.x refuses to start its metadata plugin.

    On 2.x every pull path uses cs-p2p's applier: the transfer service (`ctr image pull`,
    CRI by default) through its unpack configuration, which then uses that differ alone;
    client-side unpacks (`ctr image pull --local`, CRI's local pull) through the diff
    service's order, which falls back to containerd's walking differ for what cs-p2p leaves
    (encrypted layers, making diffs). `max_concurrent_unpacks` > 1 lets containerd 2.2+
    apply the layers of one image at once on a snapshotter with the `rebase` capability
    (2.0 and 2.1 do not know the setting: it is left out).  `applier=False` leaves the layers
    to containerd's own applier (a baseline).  `root_version`: the node's config.toml's
    `version`, which a drop-in must not exceed (`_fragment_version`).
    """
    if release not in RELEASES:
        raise ValueError(f"containerd release must be one of {', '.join(RELEASES)}, got {release!r}")
    v2 = is_v2(release)
    applies = v2 and applier
    version = _fragment_version(release, root_version)
    lines = [
        "# cs-p2p: containerd's content store is served by cs-p2p over a unix socket"
        + (" and cs-p2p applies layers." if applies else "."),
        f"version = {version}",
        'disabled_plugins = ["io.containerd.content.v1.content"]',
        "",
        f'[proxy_plugins."{PLUGIN_NAME}"]',
        '  type = "content"',
        f'  address = "{socket}"',
    ]
    if applies:
        unpacks = max_concurrent_unpacks or max(2, os.cpu_count() or 1)
        lines += [
            "",
            f'[proxy_plugins."{DIFF_PLUGIN_NAME}"]',
            '  type = "diff"',
            f'  address = "{socket}"',
            "",
            '[plugins."io.containerd.service.v1.diff-service"]',
            f'  default = ["{DIFF_PLUGIN_NAME}", "walking"]',
        ]
        if _minor_of_2(release) >= 2:
            lines += [
                "",
                '[plugins."io.containerd.transfer.v1.local"]',
                f"  max_concurrent_unpacks = {unpacks}",
            ]
        lines += [
            "",
            '[[plugins."io.containerd.transfer.v1.local".unpack_config]]',
            f'  platform = "{_platform()}"',
            f'  snapshotter = "{snapshotter}"',
            f'  differ = "{DIFF_PLUGIN_NAME}"',
        ]
    if hosts_dir:
        cri = '"io.containerd.cri.v1.images"' if v2 and version >= 3 else '"io.containerd.grpc.v1.cri"'
        lines += [
            "",
            "# cs-p2p: registries are resolved through the node's mirror (hosts.toml per registry).",
            f"[plugins.{cri}.registry]",
            f'  config_path = "{hosts_dir}"',
        ]
    return "\n".join(lines) + "\n"


def check_mirror_address(release: str, mirror_addr: str) -> None:
    """containerd 1.6 and 1.7 cannot read an IPv6 literal in hosts.toml (their TOML parser
    refuses the `[host."http://[::1]:5080"]` table key: "table key cannot contain ']'"), and
    would then ignore the mirror: say so instead."""
    host, _ = parse_host_port(mirror_addr, "mirror-listen")
    if ":" in host and not is_v2(release):
        raise ValueError(f"containerd {release} cannot read an IPv6 address in hosts.toml (mirror-listen "
                         f"{mirror_addr}): let the mirror listen on 127.0.0.1 (it serves this node's containerd "
                         "only), or use containerd 2.x")


def hosts_toml(registry: MirrorRegistry, mirror_addr: str) -> str:
    """The mirror first (pull + resolve), the registry itself kept as the next host.  An IPv6
    mirror address is written in brackets, as a URL needs."""
    mirror_addr = join_host_port(*parse_host_port(mirror_addr, "mirror-listen"))
    return (
        "# cs-p2p: pull and resolve through this node's mirror; the registry stays the fallback.\n"
        f'server = "{registry.base_url}"\n'
        "\n"
        f'[host."http://{mirror_addr}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )


def write_hosts_dir(hosts_dir: str, registries: list[MirrorRegistry], mirror_addr: str) -> list[str]:
    """Write `<hosts_dir>/<registry host>/hosts.toml` for each registry; returns the paths."""
    paths = []
    for reg in registries:
        d = os.path.join(hosts_dir, reg.host)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "hosts.toml")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(hosts_toml(reg, mirror_addr))
        os.replace(tmp, path)
        paths.append(path)
    return paths
