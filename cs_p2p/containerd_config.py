"""The containerd config.toml fragment that makes cs-p2p the node's content store."""

from __future__ import annotations

PLUGIN_NAME = "cs-p2p"


def containerd_config(socket: str, plugin_name: str = PLUGIN_NAME) -> str:
    """Version 2 config: register the proxy plugin and disable the builtin store.

    The builtin must be disabled: with both enabled containerd 1.6/1.7 picks one of the
    two at random on each start, and 2.x refuses to start its metadata plugin.
    """
    return (
        "# cs-p2p: containerd's content store is served by cs-p2p over a unix socket.\n"
        "version = 2\n"
        'disabled_plugins = ["io.containerd.content.v1.content"]\n'
        "\n"
        f'[proxy_plugins."{plugin_name}"]\n'
        '  type = "content"\n'
        f'  address = "{socket}"\n'
    )
