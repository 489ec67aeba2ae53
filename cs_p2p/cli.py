"""`cs-p2p` command line: `serve` runs the daemon, `containerd-config` prints the wiring."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import DEFAULT_SOCKET, Config, ConfigError, load_config
from .config import MirrorRegistry
from .containerd_config import (DEFAULT_CONTAINERD_CONFIG, DEFAULT_HOSTS_DIR, RELEASES, config_version_of,
                                check_mirror_address, containerd_config, detect_release, write_hosts_dir)
from .logs import setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cs-p2p", description="Peer-to-peer content store for containerd.")
    p.add_argument("--version", action="version", version=f"cs-p2p {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve containerd's content API on a unix socket",
                       description="Serve containerd's content API (and, for containerd 2.x, its layer applier) on a "
                                   "unix socket, from a store of its own; with --peer-listen and --dht-listen, share "
                                   "blobs with the other nodes; with --mirror-registry, be the node's registry "
                                   "mirror. Settings come from --config (TOML, keys are the flag names) and flags.")
    s.add_argument("--config", help="TOML file; keys are the flag names, flags win")
    s.add_argument("--root", help=f"store directory (default {Config.root})")
    s.add_argument("--socket", help=f"unix socket for containerd (default {DEFAULT_SOCKET})")
    s.add_argument("--socket-mode", help="permissions of the socket, octal (default 0660)")
    s.add_argument("--socket-group", help="group owning the socket, name or gid (default: the daemon's)")
    s.add_argument("--log-level", help="debug, info, warning or error (default info)")
    s.add_argument("--log-format", help="json or text (default json)")
    s.add_argument("--peer-listen", help="HOST:PORT for the peer transfer server (default: off)")
    s.add_argument("--peer-max-uploads", type=int, help="concurrent uploads to peers (default 16)")
    s.add_argument("--peer-rate-limit", type=int, help="upload bytes per second to peers, 0 = unlimited")
    s.add_argument("--advertise-addr", help="host other nodes reach this one at (default: peer-listen's host)")
    s.add_argument("--dht-listen", help="HOST:PORT (UDP) for the DHT node (default: off)")
    s.add_argument("--bootstrap", action="append", help="HOST:PORT of a DHT node to join through (repeatable)")
    s.add_argument("--bootstrap-file", help="a file of more HOST:PORT contacts, one a line, read at each join attempt")
    s.add_argument("--dht-ttl", type=int, help="provider record lifetime in seconds (default 3600)")
    s.add_argument("--replicas", type=int,
                   help="holders every blob announced in the cluster keeps; nodes close to a blob's DHT key "
                        "fetch copies into their cache when it has fewer (default 2; 0: off)")
    s.add_argument("--replicas-max", type=int,
                   help="holders a blob asked for often may get: one more than --replicas at 6 lookups a minute, "
                        "one more per doubling (default 4)")
    s.add_argument("--replica-check-interval", type=float,
                   help="seconds between checks of the replication floor (default 10)")
    s.add_argument("--challenge-interval", type=float,
                   help="seconds between rounds of proofs of storage asked of the holders this node keeps "
                        "records of (default 30; 0: none)")
    s.add_argument("--challenge-bytes-per-minute", type=int,
                   help="bytes of blobs challenged per minute, over all holders (default 16 MiB)")
    s.add_argument("--ingest-max-bytes", type=int, help="disk used by unfinished ingests, together (default 100 GiB)")
    s.add_argument("--cache-max-bytes", type=int,
                   help="disk for blobs containerd's GC deleted and copies the cluster needs, kept for peers "
                        "and re-pulls (default -1: 10 %% of the root's file system; 0: keep none)")
    s.add_argument("--grpc-max-concurrent-streams", type=int,
                   help="gRPC streams served at once per containerd connection (default 256); more wait")
    _membership_flags(s)
    s.add_argument("--insecure-open-membership", action="store_true", default=None,
                   help="run an open cluster (no token, no keys) with peer-listen or dht-listen on a network "
                        "address: any host that reaches them reads every blob this node holds; refused without "
                        "this flag")
    s.add_argument("--apply-workers", type=int,
                   help="processes applying layers for containerd 2.x (default 0: one per core)")
    s.add_argument("--no-apply-prestart", dest="apply_prestart", action="store_const", const=False, default=None,
                   help="start the apply workers at the first layer, not with the daemon (containerd 1.6 and 1.7 "
                        "apply layers themselves)")
    s.add_argument("--mirror-registry", action="append",
                   help="serve a registry mirror for http://HOST[:PORT] or https://HOST (repeatable)")
    s.add_argument("--mirror-listen", help="HOST:PORT of the registry mirror (default 127.0.0.1:5080)")
    s.add_argument("--mirror-timeout-ms", type=int, help="wait for an upstream registry (default 3000)")
    s.add_argument("--mirror-confirm-ttl", type=int,
                   help="seconds the registry's yes to a request's credentials for a repository and digest stands "
                        "(default 60)")
    s.add_argument("--mirror-outage-window", type=int,
                   help="seconds after which credentials the registry accepted for a private repository no longer "
                        "open it while the registry is unreachable (default 21600)")
    s.add_argument("--metrics-listen",
                   help="HOST:PORT serving Prometheus metrics at /metrics (default: off; they are always on the "
                        "admin socket, ROOT/admin.sock, with what `cs-p2p status` prints)")

    prs = sub.add_parser("peers", help="print the nodes of the DHT network",
                         description="Walk the DHT network as a client (leaving no trace in any routing table) "
                                     "and print every node that answered, with its DHT address.")
    prs.add_argument("--bootstrap", action="append", required=True, help="HOST:PORT of a DHT node (repeatable)")
    _membership_flags(prs)

    loc = sub.add_parser("locate", help="print the nodes that provide a digest",
                         description="Look a blob up in the DHT as a client and print its providers (held by "
                                     "containerd, cached, or being downloaded right now), how many hold it, and the "
                                     "demand the nodes near its key see.")
    loc.add_argument("digest", help="the blob, sha256:<64 hex digits>")
    loc.add_argument("--bootstrap", action="append", required=True, help="HOST:PORT of a DHT node (repeatable)")
    _membership_flags(loc)

    pre = sub.add_parser("preheat", help="bring every blob of an image into the cluster's caches before a rollout",
                         description="A node (through its mirror's listener) resolves REF, takes every blob it "
                                     "lacks from peers or the registry into its cache, and waits until each has "
                                     "the replication floor's number of holders; progress on the terminal.")
    pre.add_argument("ref", help="REGISTRY/REPOSITORY:TAG, REGISTRY/REPOSITORY@sha256:... (a registry the node "
                                 "mirrors) or a manifest digest some node holds")
    pre.add_argument("--platform", action="append", default=[],
                     help="os/arch[/variant] of an index to take (repeatable; default: every platform)")
    pre.add_argument("--mirror", default=Config.mirror_listen,
                     help=f"HOST:PORT of the node's mirror (default {Config.mirror_listen})")
    pre.add_argument("--json", action="store_true", help="print the node's progress events as JSON lines")

    st = sub.add_parser("status", help="print what the local daemon is doing: peers, blobs, fetches, bans",
                        description="Ask the local daemon (through its admin socket, ROOT/admin.sock) for its node "
                                    "id, membership mode, peers, blobs and cache, the fetches under way with their "
                                    "progress and sources, recent fetches with where their bytes came from, and "
                                    "recent bans; printed as tables, or as JSON with --json.")
    st.add_argument("--config", help="the daemon's TOML file, to find its root")
    st.add_argument("--root", help=f"the daemon's store directory (default {Config.root})")
    st.add_argument("--admin-socket", help="the admin socket itself (default ROOT/admin.sock)")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.add_argument("--timeline", type=float, metavar="SECONDS",
                    help="print what the node did and waited on in the last SECONDS instead: Info claims, each "
                         "fetch's sources with their first and last byte, applies, and every wait with its reason")

    pg = sub.add_parser("purge", help="stop the whole cluster sharing an image or blob (a leaked secret, a bad release)",
                        description="The local daemon (through its admin socket) purges TARGET from the cluster so that every "
                                    "node stops serving its blobs to peers and through its mirror, drops its cached "
                                    "copies and its provider records; a purged tag is resolved from the registry "
                                    "only. Blobs a node's containerd still references stay with that containerd, "
                                    "unshared. Reaches every live node within a minute; nodes that were down learn "
                                    "it when they rejoin.")
    pg.add_argument("target", help="REGISTRY/REPOSITORY:TAG (every digest nodes resolved it to), "
                                   "REGISTRY/REPOSITORY@sha256:... or sha256:... (a manifest or index with every "
                                   "blob it names, or one blob)")
    pg.add_argument("--config", help="the daemon's TOML file, to find its root")
    pg.add_argument("--root", help=f"the daemon's store directory (default {Config.root})")
    pg.add_argument("--admin-socket", help="the admin socket itself (default ROOT/admin.sock)")
    pg.add_argument("--json", action="store_true", help="print the result as JSON")

    ca = sub.add_parser("ca", help="key-pair membership: make a cluster CA and issue node certificates",
                        description="Key-pair membership: `ca init DIR` makes a cluster CA; `ca issue DIR` gives a "
                                    "node its key and a certificate from that CA (docs/security.md).")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser("init", help="create DIR/ca.key and DIR/ca.crt",
                             description="Create a cluster CA: DIR/ca.key (keep it off the nodes) and DIR/ca.crt "
                                         "(every node's --cluster-ca-file). Each CA gets a name of its own, so two "
                                         "can be trusted at once while rotating.")
    init.add_argument("dir", help="where ca.key and ca.crt are written")
    iss = ca_sub.add_parser("issue", help="create a node key (unless it exists) and a certificate for it",
                            description="Create a node's Ed25519 key (unless --key exists) and write a certificate "
                                        "for it from the CA in DIR; the node's DHT id is derived from its key.")
    iss.add_argument("dir", help="the CA's directory (ca.key, ca.crt)")
    iss.add_argument("--key", required=True, help="the node's key file (created if missing)")
    iss.add_argument("--cert", required=True, help="the certificate file to write")
    iss.add_argument("--days", type=int, default=365, help="validity (default 365)")

    ad = sub.add_parser("adopt", help="take every blob of containerd's builtin content store into cs-p2p's",
                        description="Before containerd restarts with cs-p2p as its content store: take every blob "
                                    "of containerd's builtin store (CONTAINERD_ROOT/io.containerd.content.v1.content) "
                                    "into cs-p2p's store, hard-linked where both are on one file system, copied "
                                    "otherwise; each is verified against its digest first, and one that does not "
                                    "match is left out and named. The builtin store keeps its files. Idempotent; "
                                    "safe to interrupt and run again.")
    rel = sub.add_parser("release", help="give every blob back to containerd's builtin content store",
                         description="Before containerd restarts without cs-p2p: give every blob containerd holds "
                                     "in cs-p2p's store back to containerd's builtin store (hard links, or copies), "
                                     "then remove the drop-in named by --drop-in, so that stock containerd has every "
                                     "image. Deletes nothing else; idempotent.")
    for h in (ad, rel):
        h.add_argument("--containerd-root", default="/var/lib/containerd",
                       help="containerd's root directory (default /var/lib/containerd)")
        h.add_argument("--config", help="cs-p2p's TOML file, to find its root")
        h.add_argument("--root", help=f"cs-p2p's store directory (default {Config.root})")
    rel.add_argument("--drop-in", help="containerd config fragment to remove once every blob is back")

    hi = sub.add_parser("host-install", help="install or upgrade cs-p2p on a host and make it containerd's store",
                        description="What the Kubernetes DaemonSet runs (the host's root at --host): copy this image's "
                                    "root file system to /opt/cs-p2p, write the systemd unit that runs it before "
                                    "containerd, adopt containerd's builtin store, wire containerd (drop-in, import, "
                                    "hosts.toml; originals kept) and restart it once; on a new build, restart only "
                                    "cs-p2p. Idempotent.")
    hu = sub.add_parser("host-uninstall", help="give containerd its store back and remove cs-p2p from a host",
                        description="Hand every blob back to containerd's builtin store, restore containerd's own "
                                    "configuration and restart it, then remove cs-p2p's unit and copy; the store "
                                    "(/var/lib/cs-p2p) is kept unless --purge.")
    for h in (hi, hu):
        h.add_argument("--host", default="/", help="where the host's root is mounted (default /; /host in the pod)")
        h.add_argument("--containerd-root", default="/var/lib/containerd",
                       help="containerd's root directory on the host (default /var/lib/containerd)")
        h.add_argument("--systemctl", default=None,
                       help="the host's systemctl command (default: systemctl with --host /, else entered through "
                            "PID 1's namespaces with nsenter: the pod needs hostPID and privileges)")
    hi.add_argument("--source", default="/", help="the cs-p2p image's root file system to copy (default /)")
    hi.add_argument("--config", required=True, help="cs-p2p's TOML settings for the host")
    hi.add_argument("--file", action="append", default=[],
                    help="a secret the settings name (token, key, certificate), or a directory of them (a mounted "
                         "Secret): copied to /etc/cs-p2p/ (repeatable)")
    hi.add_argument("--serve-arg", action="append", default=[],
                    help="a flag for `cs-p2p serve` on this host, e.g. --serve-arg=--peer-listen=10.0.0.5:5001")
    hi.add_argument("--containerd-version", choices=RELEASES, required=True, help="the host's containerd release")
    hi.add_argument("--mirror-registry", action="append", default=[],
                    help="registry the node's mirror serves (default: the settings' [mirror] registries)")
    hi.add_argument("--mirror-listen", help="the mirror's HOST:PORT (default: the settings')")
    hi.add_argument("--socket", help="cs-p2p's unix socket on the host (default: the settings')")
    hi.add_argument("--wait-seconds", type=float, default=60.0,
                    help="how long cs-p2p may take to answer on its socket after a start (0: do not wait)")
    hu.add_argument("--purge", action="store_true", help="also remove cs-p2p's store, /var/lib/cs-p2p")
    hc = sub.add_parser("host-contacts", help="keep the host's DHT bootstrap contacts resolved",
                        description="Resolve NAME:PORT (the bootstrap Service) where cluster names resolve and write "
                                    "the addresses to the host's /etc/cs-p2p/bootstrap (the daemon's bootstrap-file), "
                                    "now and every --every seconds: what the installer pod does while it runs.")
    hc.add_argument("--host", default="/", help="where the host's root is mounted (default /; /host in the pod)")
    hc.add_argument("--every", type=float, default=0, help="seconds between resolutions (default 0: once)")
    for h in (hi, hc):
        h.add_argument("--bootstrap-name", action="append", default=[],
                       help="NAME:PORT whose addresses are the host's bootstrap contacts (repeatable)")

    c = sub.add_parser("containerd-config", help="print the containerd config.toml fragment; with "
                       "--mirror-registry, write hosts.toml files that put the mirror in front",
                       description="Print the fragment of containerd's config.toml that makes cs-p2p the node's "
                                   "content store (and, on containerd 2.x, its layer applier), for the release "
                                   "installed or the one named; with --mirror-registry, also write the hosts.toml "
                                   "files that put the node's mirror in front of those registries.")
    c.add_argument("--socket", default=DEFAULT_SOCKET, help="cs-p2p's unix socket")
    c.add_argument("--mirror-registry", action="append", default=[],
                   help="registry to mirror: http://HOST[:PORT] or https://HOST (repeatable)")
    c.add_argument("--mirror-listen", default=Config.mirror_listen, help="the mirror's HOST:PORT")
    c.add_argument("--hosts-dir", default=DEFAULT_HOSTS_DIR,
                   help=f"containerd's registry config_path (default {DEFAULT_HOSTS_DIR})")
    c.add_argument("--containerd-version", choices=RELEASES,
                   help="the release to configure (default: from `containerd --version`); "
                        "2 also makes cs-p2p the layer applier")
    c.add_argument("--containerd-config", default=DEFAULT_CONTAINERD_CONFIG,
                   help="the node's own config.toml, whose `version` the fragment follows where containerd 2.x "
                        f"requires it (default {DEFAULT_CONTAINERD_CONFIG}, if it exists)")
    c.add_argument("--max-concurrent-unpacks", type=int,
                   help="containerd 2.x: layers of one image applied at once (default: cores, at least 2)")
    return p


def _membership_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-token-file",
                   help="membership by join token: the file holding it; peers without it are refused")
    p.add_argument("--node-key-file", help="membership by key pair: this node's Ed25519 key (PEM)")
    p.add_argument("--node-cert-file", help="membership by key pair: its certificate from the cluster CA")
    p.add_argument("--cluster-ca-file", help="membership by key pair: the cluster CA certificate(s)")


def _host(args: argparse.Namespace) -> int:
    from .install.host import DEFAULT_SYSTEMCTL, Host, InstallError, InstallOptions, Systemctl, install, uninstall

    if args.command == "host-contacts":
        from .install.contacts import CONTACTS_FILE, keep_contacts, resolve, write_contacts

        path = Host(args.host).path(CONTACTS_FILE)
        if args.every > 0:
            keep_contacts(path, args.bootstrap_name, args.every)
        else:
            write_contacts(path, resolve(args.bootstrap_name))
        return 0
    systemctl = Systemctl(args.systemctl or ("systemctl" if args.host == "/" else DEFAULT_SYSTEMCTL))
    try:
        if args.command == "host-uninstall":
            uninstall(Host(args.host), systemctl, args.containerd_root, args.purge)
            return 0
        # what the daemon will run with, checked before anything is written on the host
        serve = vars(_parser().parse_args(["serve", *args.serve_arg]))
        settings = load_config(args.config, {k: v for k, v in serve.items() if k not in ("command", "config")})
        registries = ([MirrorRegistry.parse(r, 3000, "--mirror-registry") for r in args.mirror_registry]
                      or settings.mirror_registry)
        install(Host(args.host), InstallOptions(
            source=args.source, config=args.config, release=args.containerd_version, files=args.file,
            serve_args=args.serve_arg, registries=registries,
            mirror_listen=args.mirror_listen or settings.mirror_listen, socket=args.socket or settings.socket,
            containerd_root=args.containerd_root, wait_seconds=args.wait_seconds,
            bootstrap_names=args.bootstrap_name), systemctl)
    except (InstallError, ConfigError, ValueError, OSError) as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 1
    return 0


def _hand_over(args: argparse.Namespace) -> int:
    """`adopt` and `release`: a report on stderr as it goes, a summary on stdout."""
    import os

    from .store import handover

    try:
        root = load_config(args.config, {"root": args.root}).root
    except (ConfigError, ValueError) as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.containerd_root):
        print(f"cs-p2p: containerd root {args.containerd_root} is not a directory", file=sys.stderr)
        return 2

    def progress(done: int, total: int, r: handover.Report) -> None:
        print(f"cs-p2p {args.command}: {done}/{total} blobs, {r.bytes / 2**20:.1f} MiB taken", file=sys.stderr)

    if args.command == "adopt":
        report = handover.adopt(args.containerd_root, root, progress)
        print(f"adopted {report.taken} blobs ({report.linked} linked, {report.copied} copied, "
              f"{report.bytes} bytes), {report.present} already held")
        for digest in report.corrupt:
            print(f"not adopted, its bytes do not match its digest: {digest}")
        return 0
    report = handover.release(root, args.containerd_root, progress)
    print(f"released {report.taken} blobs ({report.linked} linked, {report.copied} copied, "
          f"{report.bytes} bytes), {report.present} already in containerd's store")
    if args.drop_in:
        try:
            os.unlink(args.drop_in)
            print(f"removed {args.drop_in}")
        except FileNotFoundError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ca":
        from .identity import IdentityError, ca_command

        try:
            print(ca_command(args))
        except IdentityError as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "containerd-config":
        try:
            registries = [MirrorRegistry.parse(r, 3000, "--mirror-registry") for r in args.mirror_registry]
        except ConfigError as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        try:
            release = args.containerd_version or detect_release()
            if registries:
                check_mirror_address(release, args.mirror_listen)
            fragment = containerd_config(args.socket, release, args.hosts_dir if registries else None,
                                         args.max_concurrent_unpacks,
                                         root_version=config_version_of(args.containerd_config))
        except ValueError as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        if registries:
            for path in write_hosts_dir(args.hosts_dir, registries, args.mirror_listen):
                print(f"# wrote {path}", file=sys.stderr)
        sys.stdout.write(fragment)
        return 0
    if args.command in ("host-install", "host-uninstall", "host-contacts"):
        return _host(args)
    if args.command in ("adopt", "release"):
        return _hand_over(args)
    if args.command in ("status", "purge"):
        from .admin import admin_socket
        from .status_client import purge, status

        path = args.admin_socket
        if not path:
            try:
                path = admin_socket(load_config(args.config, {"root": args.root}).root)
            except (ConfigError, ValueError) as exc:
                print(f"cs-p2p: {exc}", file=sys.stderr)
                return 2
        if args.command == "purge":
            return purge(path, args.target, args.json)
        return status(path, args.json, timeline=args.timeline)
    if args.command == "preheat":
        from .placement.preheat_client import preheat

        return preheat(args.ref, args.platform, args.mirror, args.json)
    if args.command in ("locate", "peers"):
        from .auth import AuthError
        from .dht.operator import locate, peers
        from .identity import IdentityError
        from .membership import membership

        try:
            member = membership(args.cluster_token_file, args.node_key_file, args.node_cert_file, args.cluster_ca_file)
        except (AuthError, IdentityError) as exc:
            print(f"cs-p2p: {exc}", file=sys.stderr)
            return 2
        if args.command == "locate":
            return asyncio.run(locate(args.digest, args.bootstrap, member))
        return asyncio.run(peers(args.bootstrap, member))
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        cfg = load_config(args.config, flags)
    except (ConfigError, ValueError) as exc:
        print(f"cs-p2p: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    from .auth import AuthError
    from .identity import IdentityError
    from .daemon import RootBusy, serve

    try:
        asyncio.run(serve(cfg))
    except (AuthError, IdentityError) as exc:
        logging.getLogger("cs_p2p").error(str(exc))
        return 2
    except RootBusy as exc:
        logging.getLogger("cs_p2p").error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
