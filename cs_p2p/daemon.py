"""The daemon: one store, the peer server, the DHT node, the mirror, the placement loops, the
admin endpoint (status, metrics) and the gRPC server on containerd's socket, started in that
order and stopped in reverse.
`cs-p2p serve` runs `serve`; everything it starts lives in its own package."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import signal

import grpc

from . import metrics
from .admin import AdminServer, NodeView, admin_socket, membership_mode
from .api import diff_pb2_grpc
from .apply.pool import ApplyPool
from .config import Config, bootstrap_contacts, open_listeners, parse_host_port, peer_advertised, socket_gid
from .digests import format_digest, parse_digest
from .dht.node import DhtNode, load_or_create_node_id
from .dht.providers import provider_key
from .fetch.fetcher import Fetcher
from .fetch.source import PeerSource
from .membership import membership
from .mirror.server import Mirror
from .peer.ledger import Ledger
from .peer.server import PeerServer
from .placement.challenger import Challenger
from .placement.floor import ReplicaFloor
from .placement.preheat import PATH as PREHEAT_PATH
from .placement.preheat import Preheater, floor_wait
from .placement.purge import Purger
from .purges import PurgeList, PurgeRecord
from .service import content_handler
from .service.content import ContentService
from .service.diff import DiffService
from .store import LocalStore
from .store.cache import default_budget

log = logging.getLogger("cs_p2p.serve")


def _bind_unix(server: grpc.aio.Server, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # stale socket of a previous run; a live daemon would hold the root lock
    server.add_insecure_port("unix:" + path)


def _source_host(peer_listen: str) -> str:
    """The address to fetch from peers with: the one the peer server listens on, if it is one
    address (peers account what they give and get by it, `peer.ledger`); none for a wildcard."""
    if not peer_listen:
        return ""
    host, _ = parse_host_port(peer_listen, "peer-listen")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ""
    return "" if ip.is_unspecified else host


class RootBusy(RuntimeError):
    pass


def _lock_root(root: str) -> int:
    """Two daemons on one root would corrupt each other's ingests: hold an exclusive lock."""
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RootBusy(f"root {root} is in use by another cs-p2p process") from None
    return fd


async def measure_loop_lag(interval: float = 0.02) -> None:
    """Sample how late the loop wakes a timer (`metrics.LOOP_LAG`): anything that blocks it
    (a large unlink, a stat per file) delays every call containerd makes meanwhile."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + interval
        await asyncio.sleep(interval)
        metrics.LOOP_LAG.observe(max(0.0, loop.time() - due))


def _drop_purged(store: LocalStore, rec: PurgeRecord) -> None:
    """A purge reached this node: its cached copies go; containerd's own blobs stay, unshared."""
    dropped = sum(store.cache.drop(parse_digest(digest)) for digest in rec.digests)
    kept = sum(os.path.exists(store.blobs.blob_path(parse_digest(digest))) for digest in rec.digests)
    log.warning("purge applied", extra={"reference": rec.reference, "cached_copies_dropped": dropped,
                                        "kept_for_containerd_unshared": kept})


async def serve(cfg: Config) -> None:
    """Run until SIGTERM/SIGINT; ingests in flight stay on disk and resume on the next start."""
    os.makedirs(cfg.root, exist_ok=True)
    cache_max = default_budget(cfg.root) if cfg.cache_max_bytes < 0 else cfg.cache_max_bytes
    store = LocalStore(cfg.root, cfg.ingest_max_bytes, cache_max)
    lock = _lock_root(store.root)
    member = membership(cfg.cluster_token_file, cfg.node_key_file, cfg.node_cert_file, cfg.cluster_ca_file,
                        os.path.join(store.root, "tls"))
    dht = peers = fetcher = None
    purges = PurgeList(os.path.join(store.root, "purges.jsonl"))
    purges.listeners.append(lambda rec: _drop_purged(store, rec))
    ledger = Ledger()  # what each peer gave and took: the fetcher and the peer server keep it
    background: list[asyncio.Task] = [asyncio.get_running_loop().create_task(measure_loop_lag())]
    if cfg.dht_listen:
        node_id = member.identity.node_id if member.identity else load_or_create_node_id(store.root)
        dht = DhtNode(node_id, peer_advertised(cfg), ttl=cfg.dht_ttl, sealer=member.dht_sealer)
        fetcher = Fetcher(store, on_committed=dht.committed, sealer=member.peer_sealer, tls=member.client_tls,
                          ledger=ledger, local_host=_source_host(cfg.peer_listen))
        peers = PeerSource(dht, fetcher)
    opts = [
        ("grpc.max_receive_message_length", cfg.grpc_max_message_bytes),
        ("grpc.max_send_message_length", cfg.grpc_max_message_bytes),
        ("grpc.max_concurrent_streams", cfg.grpc_max_concurrent_streams),
    ]
    # The network side starts first: once the socket answers, every listener is up.
    peer = None
    if cfg.peer_listen:
        host, port = parse_host_port(cfg.peer_listen, "peer-listen")
        peer = PeerServer(store, cfg.peer_max_uploads, cfg.peer_rate_limit, fetcher, member.peer_sealer,
                          member.server_tls, signer=member.identity.sign if member.identity else None,
                          on_served=(lambda digest: dht.protocol.demand.hit(provider_key(digest))) if dht else None,
                          ledger=ledger, purged=purges.purged)
        port = await peer.start(host, port)
        log.info("peer server listening", extra={"host": host, "port": port})
    if dht:
        host, port = parse_host_port(cfg.dht_listen, "dht-listen")
        port = await dht.listen(host, port)
        dht.keep_purges(purges)
        log.info("dht listening", extra={"host": host, "port": port, "node_id": dht.node_id.hex()})
        # The cache keeps what the cluster asks for most (lookups answered here, pieces served).
        store.cache.value = lambda hex_: dht.protocol.demand.per_minute(provider_key(format_digest(hex_)))
        cached = store.cache.digests()
        held = [(info.digest, info.size) for info in store.blobs.walk()] + cached
        dht.join_and_announce(lambda: bootstrap_contacts(cfg), held, [digest for digest, _ in cached])
        challenger = None
        if cfg.challenge_interval and cfg.challenge_bytes_per_minute:
            challenger = Challenger(dht, store, fetcher, cfg.challenge_interval, cfg.challenge_bytes_per_minute)
            background.append(asyncio.get_running_loop().create_task(challenger.run()))
        if cfg.replicas and store.cache.max_bytes > 0:  # copies go into the cache: no cache, no copies
            floor = ReplicaFloor(dht, store, peers, cfg.replicas, cfg.replica_check_interval, dht,
                                 challenger.in_doubt if challenger else None, cfg.replicas_max)
            if challenger:
                challenger.on_record_dropped = floor.recheck
                floor.prove = challenger.check_now
            dht.protocol.on_check = floor.asked
            background.append(asyncio.get_running_loop().create_task(floor.run()))

    mirror = None
    if cfg.mirror_registry:
        host, port = parse_host_port(cfg.mirror_listen, "mirror-listen")
        mirror = Mirror(store, cfg.mirror_registry, dht, peers, cfg.mirror_confirm_ttl, cfg.mirror_outage_window,
                        purges)
        if fetcher and dht and peers:
            fetcher.origin = mirror.origin_for  # a fetch peers cannot finish ends at the registry
            peers.origin_claim = mirror.claim  # what the mirror resolved, cs-p2p fetches itself
            preheater = Preheater(mirror, peers, dht, store, cfg.replicas, floor_wait(cfg.replica_check_interval),
                                  dht)
            mirror.app.router.add_post(PREHEAT_PATH, preheater.handle)
        port = await mirror.start(host, port)
        log.info("registry mirror listening", extra={"host": host, "port": port,
                                                     "registries": [r.host for r in cfg.mirror_registry]})

    listeners = {"socket": cfg.socket, "peer": cfg.peer_listen, "dht": cfg.dht_listen,
                 "mirror": cfg.mirror_listen if mirror else "", "metrics": cfg.metrics_listen}
    exposed = open_listeners(cfg)  # allowed only with insecure-open-membership (config.py)
    if exposed:
        log.warning("open membership on the network: any host that reaches this node can download every blob it "
                    "holds and join the DHT (configure cluster-token-file or per-node keys)",
                    extra={"listeners": exposed})
    view = NodeView(store, member, dht, fetcher, {k: v for k, v in listeners.items() if v}, exposed,
                    purges=lambda: len(purges))
    if mirror:
        view.refusals = mirror.refusals
    if dht and peers:
        view.purge = Purger(dht, store, peers).purge
    admin = AdminServer(view)
    collector = metrics.register_node(store.usage, lambda: store.cache.max_bytes,
                                      lambda: len(dht.contacts()) if dht else 0,
                                      lambda: len(fetcher.inflight) if fetcher else 0, membership_mode(member),
                                      lambda: bool(dht and dht.alone))
    try:
        await admin.start_socket(admin_socket(store.root))
    except OSError as exc:  # e.g. a root whose path is too long for a unix socket: serve without
        log.warning("admin socket not started: `cs-p2p status` will not reach this node",
                    extra={"path": admin_socket(store.root), "error": str(exc)})
    if cfg.metrics_listen:
        host, port = parse_host_port(cfg.metrics_listen, "metrics-listen")
        port = await admin.start_metrics(host, port)
        log.info("metrics listening", extra={"host": host, "port": port, "path": "/metrics"})

    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers((content_handler(ContentService(store, dht, peers)),))
    # The layer applier (containerd 2.x proxy plugin of type "diff") shares the socket.
    pool = ApplyPool(cfg.apply_workers or os.cpu_count() or 1, os.path.join(store.root, "apply"),
                     lambda digest: store.blobs.blob_path(parse_digest(digest)))
    diff_pb2_grpc.add_DiffServicer_to_server(DiffService(store, pool, peers), server)
    umask = os.umask(0o077)  # no moment in which the socket is open to everyone
    try:
        _bind_unix(server, cfg.socket)
        await server.start()
    finally:
        os.umask(umask)
    os.chmod(cfg.socket, cfg.socket_mode)
    if cfg.socket_group:
        os.chown(cfg.socket, -1, socket_gid(cfg.socket_group))
    log.info("serving", extra={"socket": cfg.socket, "root": store.root})
    if cfg.apply_prestart:
        pool.prestart()  # off the first pull's path: each worker takes ~0.1 s to start

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    for task in background:
        task.cancel()
    await admin.stop()
    metrics.REGISTRY.unregister(collector)
    if mirror:
        await mirror.stop()
    if fetcher:
        await fetcher.close()
    if dht:
        dht.stop()
    if peer:
        await peer.stop()
    await server.stop(grace=5)
    pool.close()
    try:
        os.unlink(cfg.socket)
    except FileNotFoundError:
        pass
    log.info("stopped")
    os.close(lock)
