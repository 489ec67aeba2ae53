"""`hack/demo`: a local cluster showing a peer-to-peer pull.

One registry and N nodes, each a containerd whose content store is a cs-p2p daemon (builtin
store disabled), joined in one DHT, with its registry mirror in front of the registry
(hosts.toml).  A random multi-layer image is built and pushed; node 1 pulls it from the
registry; then the registry is stopped, and every other node still pulls it by tag — the
tag resolved and every blob fetched from peers.  The table shows, per node, where the bytes
came from and how long the pull took.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from cs_p2p.admin import admin_socket
from cs_p2p.config import MirrorRegistry
from cs_p2p.containerd_config import write_hosts_dir
from cs_p2p.status_client import fetch_status
from .images import build_image, push_image
from .processes import Containerd, CsP2P, Registry, free_port, wait_for
from .progress import Progress
from .releases import release


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def peer_bytes(cs: CsP2P) -> int:
    """Bytes this node fetched from peers, from its structured log."""
    total = 0
    with open(cs.proc.log_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "fetched from peers":
                total += int(rec.get("size", 0))
    return total


@dataclass
class Node:
    name: str
    cs: CsP2P
    containerd: Containerd
    peer: str
    dht: str
    mirror: str


def start_nodes(work: str, count: int, reg: Registry, procs: list) -> list[Node]:
    """`count` containerd + cs-p2p pairs in one DHT (node 1 is everyone's bootstrap contact).
    Every process is appended to `procs` as it starts, for the caller to stop."""
    nodes: list[Node] = []
    for i in range(1, count + 1):
        peer, dht, mirror = (f"127.0.0.1:{free_port()}" for _ in range(3))
        flags = ["--peer-listen", peer, "--dht-listen", dht, "--mirror-listen", mirror,
                 "--mirror-registry", f"http://{reg.addr}"] + (["--bootstrap", nodes[0].dht] if nodes else [])
        cs = CsP2P(os.path.join(work, f"node{i}", "cs-p2p"), flags).start()
        procs.append(cs)
        hosts = os.path.join(work, f"node{i}", "hosts")
        write_hosts_dir(hosts, [MirrorRegistry(reg.addr, plain_http=True)], mirror)
        ctd = Containerd(os.path.join(work, f"node{i}", "containerd"), cs.socket, hosts_dir=hosts).start()
        procs.append(ctd)
        nodes.append(Node(f"node{i}", cs, ctd, peer, dht, mirror))
    return nodes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/demo", description=__doc__)
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    p.add_argument("--layer-mib", type=int, default=8, help="size of each layer in MiB (default 8)")
    p.add_argument("--keep", action="store_true", help="keep the work directory for inspection")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="csp-demo-", dir="/tmp")
    procs: list = []
    try:
        rel = release()
        print(f"work dir: {work}   containerd {rel.name}"
              + (" (cs-p2p is its content store and layer applier)" if rel.applies_layers else
                 " (cs-p2p is its content store; this release takes no layer applier plugin)"))
        reg = Registry(os.path.join(work, "registry")).start()
        procs.append(reg)
        step = Progress(f"building and pushing a {args.layers}-layer image")
        img = build_image(os.path.join(work, "image"), [args.layer_mib << 20] * args.layers)
        ref = push_image(img, reg.addr, "demo/app")
        step.done()
        print(f"registry: http://{reg.addr}   image: {ref} ({args.layers} layers, {_mib(img.total_size)})")

        step = Progress(f"starting {args.nodes} nodes (containerd + cs-p2p)")
        nodes = start_nodes(work, args.nodes, reg, procs)
        step.done()
        first_dht = nodes[0].dht
        for n in nodes:
            print(f"{n.name}:    containerd -> cs-p2p {n.cs.socket} (peer {n.peer}, dht {n.dht}, mirror {n.mirror})")

        rows = []
        ok = True
        for node in nodes:
            name, cs, ctd = node.name, node.cs, node.containerd
            before = sum(reg.blob_bytes_served().values())
            t0 = time.monotonic()
            pull_with_progress(node, ref, img.total_size)
            took = time.monotonic() - t0
            from_registry = sum(reg.blob_bytes_served().values()) - before
            applied = cs.applied_layers()
            rows.append((name, took, from_registry, peer_bytes(cs),
                         f"{len(applied)} by cs-p2p ({sum(r['from'] == 'peers' for r in applied)} as they streamed)"
                         if applied else "by containerd"))
            ok &= cs.blob_digests() == set(img.digests)
            if name == "node1" and len(nodes) > 1:
                _wait_announced(first_dht, img.digests)
                reg.stop()
                print(f"registry stopped after node1's pull: the other nodes resolve {ref} and fetch it from peers")

        print()
        print(f"{'node':<8} {'pull':>8} {'from registry':>15} {'from peers':>12}   layers applied")
        for name, took, reg_bytes, peer, applied in rows:
            print(f"{name:<8} {took:>7.2f}s {_mib(reg_bytes):>15} {_mib(peer):>12}   {applied}")
        total_registry = sum(r[2] for r in rows)
        print(f"\nregistry served {_mib(total_registry)} for {args.nodes} pulls of a "
              f"{_mib(img.total_size)} image ({total_registry / img.total_size:.2f}x the image)")
        ok &= all(r[2] == 0 for r in rows[1:])
        print("\ndemo:", "OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def pull_with_progress(node: Node, ref: str, total: int) -> None:
    """`ctr image pull`, with the bytes the node has so far (held, downloading, fetching from
    peers, as its `cs-p2p status` says) on one progress line."""
    ctd = node.containerd
    proc = subprocess.Popen(ctd.ctr_argv(*ctd.pull_args(ref)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = Progress(f"{node.name}: pulling {ref}", total, "MiB")
    admin = admin_socket(node.cs.root)
    try:
        while proc.poll() is None:
            try:
                st = fetch_status(admin, timeout=2)
            except (OSError, ValueError):
                st = None
            if st:
                have = st["blobs"]["bytes"] + st["ingests_bytes"] + sum(f["done_bytes"] for f in st["fetches"])
                peers = {a for f in st["fetches"] for a in f["sources"]}
                progress.update(have, f"fetching from {len(peers)} peer(s)" if peers else "")
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        proc.wait()
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, stderr=err)
    progress.done()


def _wait_announced(dht: str, digests: list[str], timeout: float = 30) -> None:
    """Node 1 announces in the background after each commit: wait until the DHT has them all."""
    for digest in digests:
        wait_for(lambda: subprocess.run([sys.executable, "-m", "cs_p2p.cli", "locate", digest, "--bootstrap", dht],
                                        capture_output=True, timeout=60).returncode == 0,
                 timeout, f"{digest} to be announced")


if __name__ == "__main__":
    sys.exit(main())
