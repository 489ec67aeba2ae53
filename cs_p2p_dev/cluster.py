"""`hack/cluster`: a local cluster that stays up for hands-on use, until Ctrl-C.

One registry and N containerd + cs-p2p pairs in one DHT, each with its own directories,
sockets and ports; prints the commands to drive each node with `ctr` and `cs-p2p`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile

from .demo import start_nodes
from .images import build_image, push_image
from .processes import Registry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/cluster", description=__doc__)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", help="work directory (default: a new one under /tmp, removed at exit)")
    args = p.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="csp-cluster-", dir="/tmp")
    procs: list = []
    try:
        reg = Registry(os.path.join(work, "registry")).start()
        procs.append(reg)
        img = build_image(os.path.join(work, "image"), [4 << 20] * 3)
        ref = push_image(img, reg.addr, "demo/app")
        nodes = start_nodes(work, args.nodes, reg, procs)
        print(f"registry  http://{reg.addr}   sample image: {ref}")
        for n in nodes:
            print(f"{n.name}  ctr --address {n.containerd.socket} {' '.join(n.containerd.pull_args(ref))}")
        print(f"dht       cs-p2p peers --bootstrap {nodes[0].dht}")
        print(f"          cs-p2p locate {img.layer_digests[0]} --bootstrap {nodes[0].dht}")
        print(f"logs      {work}/node*/cs-p2p/cs-p2p.log   (Ctrl-C stops everything)", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
