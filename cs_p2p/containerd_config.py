"""containerd wiring: the config.toml fragment that makes cs-p2p the node's content store,
and the `hosts.toml` files that put the node's registry mirror in front of each registry."""

from __future__ import annotations

import os

from .config import MirrorRegistry

PLUGIN_NAME = "cs-p2p"
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"


def containerd_config(socket: str, plugin_name: str = PLUGIN_NAME, hosts_dir: str | None = None) -> str:
    """Version 2 config: register the proxy plugin and disable the builtin store; with
    `hosts_dir`, also point the CRI plugin's registry config at it (the mirror's hosts.toml).

    The builtin must be disabled: with both enabled containerd 1.6/1.7 picks one of the
    two at random on each start, and 2.x refuses to start its metadata plugin.
    """
    text = (
        "# cs-p2p: containerd's content store is served by cs-p2p over a unix socket.\n"
        "version = 2\n"
        'disabled_plugins = ["io.containerd.content.v1.content"]\n'
        "\n"
        f'[proxy_plugins."{plugin_name}"]\n'
        '  type = "content"\n'
        f'  address = "{socket}"\n'
    )
    if hosts_dir:
        text += (
            "\n# cs-p2p: registries are resolved through the node's mirror (hosts.toml per registry).\n"
            '[plugins."io.containerd.grpc.v1.cri".registry]\n'
            f'  config_path = "{hosts_dir}"\n'
        )
    return text


def hosts_toml(registry: MirrorRegistry, mirror_addr: str) -> str:
    """The mirror first (pull + resolve), the registry itself kept as the next host."""
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
