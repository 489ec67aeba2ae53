"""`cs-p2p` command line: `serve` runs the daemon, `containerd-config` prints the wiring."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import DEFAULT_SOCKET, Config, ConfigError, load_config
from .config import MirrorRegistry
from .containerd_config import DEFAULT_HOSTS_DIR, containerd_config, write_hosts_dir
from .logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cs-p2p", description="Peer-to-peer content store for containerd.")
    p.add_argument("--version", action="version", version=f"cs-p2p {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve containerd's content API on a unix socket")
    s.add_argument("--config", help="TOML file; keys are the flag names, flags win")
    s.add_argument("--root", help=f"store directory (default {Config.root})")
    s.add_argument("--socket", help=f"unix socket for containerd (default {DEFAULT_SOCKET})")
    s.add_argument("--socket-mode", help="permissions of the socket, octal (default 0660)")
    s.add_argument("--log-level", help="debug, info, warning or error (default info)")
    s.add_argument("--log-format", help="json or text (default json)")
    s.add_argument("--peer-listen", help="HOST:PORT for the peer transfer server (default: off)")
    s.add_argument("--peer-max-uploads", type=int, help="concurrent uploads to peers (default 16)")
    s.add_argument("--peer-rate-limit", type=int, help="upload bytes per second to peers, 0 = unlimited")
    s.add_argument("--advertise-addr", help="host other nodes reach this one at (default: peer-listen's host)")
    s.add_argument("--dht-listen", help="HOST:PORT (UDP) for the DHT node (default: off)")
    s.add_argument("--bootstrap", action="append", help="HOST:PORT of a DHT node to join through (repeatable)")
    s.add_argument("--dht-ttl", type=int, help="provider record lifetime in seconds (default 3600)")
    s.add_argument("--cluster-token-file",
                   help="file holding the cluster's join token; peers without it are refused (default: off)")
    s.add_argument("--mirror-registry", action="append",
                   help="serve a registry mirror for http://HOST[:PORT] or https://HOST (repeatable)")
    s.add_argument("--mirror-listen", help="HOST:PORT of the registry mirror (default 127.0.0.1:5080)")
    s.add_argument("--mirror-timeout-ms", type=int, help="wait for an upstream registry (default 3000)")

    prs = sub.add_parser("peers", help="print the nodes of the DHT network")
    prs.add_argument("--bootstrap", action="append", required=True, help="HOST:PORT of a DHT node (repeatable)")
    prs.add_argument("--cluster-token-file", help="the cluster's join token, if it has one")

    loc = sub.add_parser("locate", help="print the nodes that provide a digest")
    loc.add_argument("digest")
    loc.add_argument("--bootstrap", action="append", required=True, help="HOST:PORT of a DHT node (repeatable)")
    loc.add_argument("--cluster-token-file", help="the cluster's join token, if it has one")

    c = sub.add_parser("containerd-config", help="print the containerd config.toml fragment; with "
                       "--mirror-registry, write hosts.toml files that put the mirror in front")
    c.add_argument("--socket", default=DEFAULT_SOCKET, help="cs-p2p's unix socket")
    c.add_argument("--mirror-registry", action="append", default=[],
                   help="registry to mirror: http://HOST[:PORT] or https://HOST (repeatable)")
    c.add_argument("--mirror-listen", default=Config.mirror_listen, help="the mirror's HOST:PORT")
    c.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR,
                   help=f"containerd's registry config_path (default {DEFAULT_HOSTS_DIR})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "containerd-config":
        try:
            registries = [MirrorRegistry.parse(r, 3000, "--mirror-registry") for r in args.mirror_registry]
        except ConfigError as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        if registries:
            for path in write_hosts_dir(args.hosts_dir, registries, args.mirror_listen):
                print(f"# wrote {path}", file=sys.stderr)
        sys.stdout.write(containerd_config(args.socket, hosts_dir=args.hosts_dir if registries else None))
        return 0
    if args.command == "locate":
        from .dht.operator import locate

        return asyncio.run(locate(args.digest, args.bootstrap, args.cluster_token_file))
    if args.command == "peers":
        from .dht.operator import peers

        return asyncio.run(peers(args.bootstrap, args.cluster_token_file))
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        cfg = load_config(args.config, flags)
    except (ConfigError, ValueError) as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    from .auth import AuthError
    from .service import RootBusy, serve

    try:
        asyncio.run(serve(cfg))
    except AuthError as exc:
        logging.getLogger("cs_p2p").error(str(exc))
        return 2
    except RootBusy as exc:
        logging.getLogger("cs_p2p").error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
