"""`hack/demo`: one node of a local cluster, showing containerd pulling through cs-p2p.

Starts a registry, cs-p2p and a containerd wired to it (builtin content store disabled),
builds and pushes a random multi-layer image, pulls it with `ctr image pull`, and prints
where the blobs went and what containerd sees.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from .images import build_image, push_image
from .processes import Containerd, CsP2P, Registry


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hack/demo", description=__doc__)
    p.add_argument("--layers", type=int, default=4, help="number of layers (default 4)")
    p.add_argument("--layer-mib", type=int, default=8, help="size of each layer in MiB (default 8)")
    p.add_argument("--keep", action="store_true", help="keep the work directory for inspection")
    args = p.parse_args(argv)

    work = tempfile.mkdtemp(prefix="csp-demo-", dir="/tmp")
    procs: list = []
    try:
        print(f"work dir: {work}")
        reg = Registry(os.path.join(work, "registry")).start()
        procs.append(reg)
        print(f"registry: http://{reg.addr}")
        img = build_image(os.path.join(work, "image"), [args.layer_mib << 20] * args.layers)
        ref = push_image(img, reg.addr, "demo/app")
        print(f"image:    {ref} ({args.layers} layers, {_mib(img.total_size)})")

        cs = CsP2P(os.path.join(work, "node1", "cs-p2p")).start()
        procs.append(cs)
        ctd = Containerd(os.path.join(work, "node1", "containerd"), cs.socket, [reg.addr]).start()
        procs.append(ctd)
        print(f"node1:    containerd {ctd.socket} -> cs-p2p {cs.socket}")

        t0 = time.monotonic()
        ctd.ctr("image", "pull", "--plain-http", ref)
        took = time.monotonic() - t0
        listed = ctd.ctr("content", "ls", "-q").stdout.decode().split()
        held = cs.blob_digests()
        print()
        print(f"pulled {ref} in {took:.2f}s through cs-p2p")
        print(f"  blobs in cs-p2p root ({cs.root}/blobs/sha256): {len(held)} of {len(img.digests)}")
        print(f"  containerd's `ctr content ls`:                 {len(listed)} blobs, all served by cs-p2p: "
              f"{set(listed) == held}")
        ok = held == set(img.digests) and set(listed) == held
        print("\ndemo:", "OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
