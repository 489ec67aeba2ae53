"""One typed configuration object, loaded from TOML and overridden by flags.

TOML keys are the flag names (`root`, `socket`, `log-level`, ...; `_` and `-` are the same),
so what an operator writes in a file and on a command line never diverges.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

from .addresses import is_unspecified, join_host_port

DEFAULT_SOCKET = "/run/cs-p2p/content.sock"
DEFAULT_ROOT = "/var/lib/cs-p2p"


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MirrorRegistry:
    """An upstream registry the mirror serves for, as image references name it."""

    host: str  # registry.example.com[:port]
    plain_http: bool = False
    timeout: float = 3.0  # seconds to wait for it before answering from peers
    ca_file: str = ""  # CA certificate(s) its TLS certificate is checked against; empty: the system's
    # A file holding USER:PASSWORD for a private registry (Basic, or a Bearer realm's token
    # service); read at start, never logged, never published.  Empty: anonymous, or what
    # containerd sends with each request.
    credentials_file: str = ""

    @property
    def base_url(self) -> str:
        """Where the registry API is: image references say docker.io, its API is elsewhere."""
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        return f"{'http' if self.plain_http else 'https'}://{host}"

    @classmethod
    def parse(cls, value: object, default_timeout_ms: int, source: str) -> "MirrorRegistry":
        """`http://host:port` or `https://host` (a bare host means https), or a table
        `{url = ..., timeout-ms = ..., ca-file = ..., credentials-file = ...}`."""
        timeout_ms, ca_file, credentials_file = default_timeout_ms, "", ""
        if isinstance(value, dict):
            unknown = set(value) - {"url", "timeout-ms", "timeout_ms", "ca-file", "ca_file", "credentials-file",
                                    "credentials_file"}
            if unknown or "url" not in value:
                raise ConfigError(f"{source}: a mirror registry needs url (and optional timeout-ms, ca-file, "
                                  f"credentials-file), got {value!r}")
            timeout_ms = value.get("timeout-ms", value.get("timeout_ms", timeout_ms))
            ca_file = value.get("ca-file", value.get("ca_file", ""))
            credentials_file = value.get("credentials-file", value.get("credentials_file", ""))
            value = value["url"]
        if not isinstance(value, str) or not isinstance(timeout_ms, int) or timeout_ms <= 0 \
                or not isinstance(ca_file, str) or not isinstance(credentials_file, str):
            raise ConfigError(f"{source}: bad mirror registry {value!r}")
        if credentials_file:
            read_credentials(credentials_file)  # a missing or malformed file is refused at start
        scheme, sep, host = value.partition("://")
        if not sep:
            scheme, host = "https", value
        host = host.rstrip("/")
        if scheme not in ("http", "https") or not host or "/" in host:
            raise ConfigError(f"{source}: mirror registry must be http://HOST[:PORT] or https://HOST[:PORT], "
                              f"got {value!r}")
        if ca_file and scheme == "http":
            raise ConfigError(f"{source}: ca-file is for https registries, got {value!r}")
        return cls(host, scheme == "http", timeout_ms / 1000, ca_file, credentials_file)


def read_credentials(path: str) -> tuple[str, str]:
    """USER:PASSWORD from the first line of `path` (the password may contain ':')."""
    try:
        with open(path) as f:
            line = f.readline().strip()
    except OSError as exc:
        raise ConfigError(f"credentials-file {path}: {exc.strerror or exc}") from None
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"credentials-file {path}: the first line must be USER:PASSWORD")
    return user, password


@dataclass
class Config:
    root: str = DEFAULT_ROOT
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    socket_group: str = ""  # group (name or gid) that owns the socket, e.g. containerd's; empty: ours
    log_level: str = "info"
    log_format: str = "json"
    grpc_max_message_bytes: int = 16 << 20
    grpc_max_concurrent_streams: int = 256  # per containerd connection
    apply_workers: int = 0  # processes applying layers (containerd 2.x diff plugin); 0: one per core
    # start them with the daemon rather than at the first layer; off where containerd applies
    # layers itself (1.6, 1.7: the installer turns it off there)
    apply_prestart: bool = True
    ingest_max_bytes: int = 100 << 30  # disk used by unfinished ingests, together
    # Blobs kept after containerd's GC and copies for the replication floor (`store.cache`);
    # -1: 10 % of the root's file system; 0: no cache (and no copies for the floor).
    cache_max_bytes: int = -1
    peer_listen: str = ""  # HOST:PORT of the peer transfer server; empty: not started
    peer_max_uploads: int = 16
    peer_rate_limit: int = 0  # bytes per second over all uploads; 0: unlimited
    advertise_addr: str = ""  # host other nodes reach this one at; default: peer-listen's host
    dht_listen: str = ""  # HOST:PORT (UDP) of the DHT node; empty: no DHT
    bootstrap: list = dataclasses.field(default_factory=list)  # HOST:PORT contacts, names resolved
    # more contacts, one HOST:PORT a line, read at each join attempt: the Kubernetes installer
    # writes the bootstrap Service's addresses there (the host's own resolver cannot resolve it)
    bootstrap_file: str = ""
    dht_ttl: int = 3600  # seconds a provider record lives; re-announced at half of it
    replicas: int = 2  # holders every announced blob keeps (`placement`); 0: no floor
    replicas_max: int = 4  # holders a blob in demand may get (`dht.demand`)
    replica_check_interval: float = 10.0  # seconds between checks of the floor
    challenge_interval: float = 30.0  # seconds between rounds of proofs of storage; 0: none
    challenge_bytes_per_minute: int = 16 << 20  # challenged bytes per minute, over all holders
    cluster_token_file: str = ""  # shared join token: authenticates datagrams and peer requests
    node_key_file: str = ""  # key-pair mode: this node's Ed25519 key (PEM) ...
    node_cert_file: str = ""  # ... its certificate, issued by the cluster CA ...
    cluster_ca_file: str = ""  # ... and the CA certificate(s) members are issued by
    # no membership with peers or the DHT on a network address: refused unless this says the
    # operator wants an open cluster (any host that reaches the node reads every blob it holds)
    insecure_open_membership: bool = False
    mirror_listen: str = "127.0.0.1:5080"  # the registry mirror for the local containerd
    mirror_timeout_ms: int = 3000  # default wait for an upstream registry
    mirror_registry: list = dataclasses.field(default_factory=list)  # MirrorRegistry; empty: no mirror
    # seconds a registry's yes to (credentials, repository, digest) stands before it is asked again
    mirror_confirm_ttl: int = 60
    # seconds after which credentials (or anonymous reads) the registry accepted for a repository no
    # longer open it while the registry is unreachable (`mirror.access`)
    mirror_outage_window: int = 6 * 3600
    metrics_listen: str = ""  # HOST:PORT serving /metrics (Prometheus); empty: only on the admin socket

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def merged(self, values: Mapping[str, Any], source: str) -> "Config":
        """A copy with `values` applied; unknown keys and wrong types are errors, not ignored."""
        known = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        values = dict(values)
        table = values.pop("mirror", None)
        if table is not None:  # the TOML [mirror] section: listen, timeout-ms, registries
            allowed = {"listen", "timeout-ms", "timeout_ms", "registries", "confirm-ttl", "confirm_ttl",
                       "outage-window", "outage_window"}
            if not isinstance(table, dict) or set(table) - allowed:
                raise ConfigError(f"{source}: [mirror] takes listen, timeout-ms, registries, confirm-ttl and "
                                  f"outage-window, got {table!r}")
            for k, v in table.items():
                values["mirror_registry" if k == "registries" else f"mirror_{k}"] = v
        timeout_ms = next((v for k, v in values.items() if k.replace("-", "_") == "mirror_timeout_ms"
                           and v is not None), self.mirror_timeout_ms)
        for raw_key, value in values.items():
            if value is None:
                continue
            key = raw_key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"{source}: unknown setting {raw_key!r}")
            if key == "mirror_registry":
                if not isinstance(value, list):
                    raise ConfigError(f"{source}: {raw_key} must be a list, got {value!r}")
                changes[key] = [v if isinstance(v, MirrorRegistry) else MirrorRegistry.parse(v, timeout_ms, source)
                                for v in value]
                continue
            default = getattr(type(self)(), key)
            if isinstance(default, list):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: {raw_key} must be a list of strings, got {value!r}")
                changes[key] = list(value)
                continue
            if key == "socket_mode" and isinstance(value, str):
                value = int(value, 8)
            if not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
                raise ConfigError(f"{source}: {raw_key} must be {type(default).__name__}, got {value!r}")
            changes[key] = value
        return dataclasses.replace(self, **changes)


def load_config(path: str | None, flags: Mapping[str, Any]) -> Config:
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from None
        cfg = cfg.merged(data, path)
    cfg = cfg.merged(flags, "flags")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log-level must be debug, info, warning or error, got {cfg.log_level!r}")
    if cfg.peer_listen:
        parse_host_port(cfg.peer_listen, "peer-listen")
    if cfg.dht_listen:
        parse_host_port(cfg.dht_listen, "dht-listen")
        if not cfg.peer_listen:
            raise ConfigError("dht-listen needs peer-listen: provider records carry the peer address")
        peer_advertised(cfg)
    for addr in cfg.bootstrap:
        parse_host_port(addr, "bootstrap")
    if cfg.metrics_listen:
        parse_host_port(cfg.metrics_listen, "metrics-listen")
    if cfg.mirror_registry:
        parse_host_port(cfg.mirror_listen, "mirror-listen")
    elif cfg.mirror_listen != Config.mirror_listen:
        raise ConfigError("mirror-listen is set but no mirror-registry: the mirror serves only the registries "
                          "it is given; add mirror-registry http://HOST[:PORT] or https://HOST (repeatable)")
    if cfg.mirror_confirm_ttl < 0 or cfg.mirror_outage_window < 0:
        raise ConfigError("mirror-confirm-ttl and mirror-outage-window are seconds, 0 or more")
    if cfg.dht_ttl < 10:
        raise ConfigError("dht-ttl must be at least 10 seconds")
    if cfg.replicas < 0 or cfg.replica_check_interval <= 0 or cfg.replicas_max < 0:
        raise ConfigError("replicas and replicas-max must be >= 0 and replica-check-interval positive")
    if cfg.challenge_interval < 0 or cfg.challenge_bytes_per_minute < 0:
        raise ConfigError("challenge-interval and challenge-bytes-per-minute must be >= 0")
    if cfg.ingest_max_bytes < 1 or cfg.grpc_max_concurrent_streams < 1:
        raise ConfigError("ingest-max-bytes and grpc-max-concurrent-streams must be positive")
    if cfg.cache_max_bytes < -1:
        raise ConfigError("cache-max-bytes must be >= -1 (-1: 10 % of the root's file system; 0: no cache)")
    if cfg.apply_workers < 0:
        raise ConfigError("apply-workers must be >= 0 (0: one per core)")
    if cfg.peer_max_uploads < 1 or cfg.peer_rate_limit < 0:
        raise ConfigError("peer-max-uploads must be >= 1 and peer-rate-limit >= 0")
    if cfg.socket_group:
        socket_gid(cfg.socket_group)
    keys = [cfg.node_key_file, cfg.node_cert_file, cfg.cluster_ca_file]
    if any(keys) and not all(keys):
        raise ConfigError("key-pair membership needs node-key-file, node-cert-file and cluster-ca-file")
    if any(keys) and cfg.cluster_token_file:
        raise ConfigError("choose one membership: cluster-token-file, or node-key-file/node-cert-file/cluster-ca-file")
    if cfg.log_format not in ("json", "text"):
        raise ConfigError(f"log-format must be json or text, got {cfg.log_format!r}")
    exposed = open_listeners(cfg)
    if exposed and not cfg.insecure_open_membership:
        raise ConfigError(
            f"{' and '.join(exposed)} {'is not a loopback address' if len(exposed) == 1 else 'are not loopback addresses'}"
            ", and no membership is configured: any host that reaches this node could "
            "download every blob this node holds (private images' layers too) and join the DHT. Configure "
            "membership: cluster-token-file = FILE (a shared join token), or node-key-file, node-cert-file and "
            "cluster-ca-file (per-node keys from `cs-p2p ca`; docs/security.md). For a network you trust as a "
            "whole, insecure-open-membership = true (--insecure-open-membership) runs an open cluster.")
    return cfg


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses; a wildcard, another name or address is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_listeners(cfg: Config) -> list[str]:
    """The peer and DHT listeners (`key address`) reachable beyond this host while the node has
    no membership: an open cluster on the network."""
    if cfg.cluster_token_file or cfg.node_key_file:
        return []
    return [f"{key} {addr}" for key, addr in (("peer-listen", cfg.peer_listen), ("dht-listen", cfg.dht_listen))
            if addr and not is_loopback(parse_host_port(addr, key)[0])]


def bootstrap_contacts(cfg: Config) -> list[str]:
    """The bootstrap contacts: the configured ones and, now, those in `bootstrap-file` (a line
    that is not HOST:PORT is skipped; a missing file adds none)."""
    contacts = list(cfg.bootstrap)
    if cfg.bootstrap_file:
        try:
            with open(cfg.bootstrap_file) as f:
                lines = f.read().split()
        except OSError:
            lines = []
        for line in lines:
            try:
                parse_host_port(line, "bootstrap-file")
            except ConfigError:
                continue
            contacts.append(line)
    return contacts


def socket_gid(group: str) -> int:
    """The gid of `group`, a name or a number."""
    import grp

    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket-group: no group named {group!r}") from None


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """`HOST:PORT` or `[v6]:PORT`; port 0 lets the system choose.  An IPv6 literal must be in
    brackets: `fd00::1:5001` could be an address or an address and a port.  An IPv4 address in
    brackets is taken too (`[$(NODE_IP)]:5001` serves a manifest for both families)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} must be HOST:PORT or [IPV6]:PORT, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ConfigError(f"{what}: unbalanced brackets in {value!r}")
        return host[1:-1], int(port)
    if ":" in host:
        raise ConfigError(f"{what}: an IPv6 address goes in brackets, [IPV6]:PORT, got {value!r}")
    return host, int(port)


def peer_advertised(cfg: Config) -> str:
    """The `host:port` other nodes fetch from: advertise-addr, or peer-listen's own host."""
    host, port = parse_host_port(cfg.peer_listen, "peer-listen")
    host = (cfg.advertise_addr or host).strip("[]")
    if is_unspecified(host):
        raise ConfigError("peer-listen is a wildcard address: set advertise-addr to this node's address")
    return join_host_port(host, port)
