"""cs-p2p's own image, built offline from Debian's packages and the package's wheel.

The same image as `packaging/image/Containerfile` makes, without a container engine: a Debian
root file system by `mmdebstrap` (python3, CA certificates, util-linux for nsenter), completed
by `packaging/image/finish-rootfs.sh` (the wheel and its dependencies, the `cs-p2p` command,
the build's name), packed as a one-layer OCI image.  The tests install from it; operators
without a container engine push it with skopeo.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from .images import BuiltImage, build_image_from_tars

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SUITE = "bookworm"  # the Debian release whose python3 the wheels are built for (3.11)
PACKAGES = ("python3", "ca-certificates", "util-linux")
EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def build_rootfs(dest: str, log=print) -> str:
    """A complete root file system for the image at `dest` (made anew); returns its build name."""
    if sys.version_info[:2] != (3, 11):
        raise RuntimeError(f"the image's Python is Debian {SUITE}'s 3.11; build it with a Python 3.11, "
                           f"not {sys.version.split()[0]}")
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    log(f"debian {SUITE} root file system (mmdebstrap)")
    dpkgopts = [f"--dpkgopt=path-exclude={p}" for p in EXCLUDES]
    subprocess.run(["mmdebstrap", "--quiet", "--mode=root", "--variant=minbase", *dpkgopts,
                    "--include=" + ",".join(PACKAGES), SUITE, dest], check=True, timeout=1200)
    for leftover in ("var/cache/apt", "var/lib/apt/lists"):
        shutil.rmtree(os.path.join(dest, leftover), ignore_errors=True)
    with tempfile.TemporaryDirectory() as wheels:
        log("cs-p2p wheel")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, REPO], check=True,
                       timeout=600)
        wheel = os.path.join(wheels, os.listdir(wheels)[0])
        log("the wheel and its dependencies into the root file system")
        out = subprocess.run(["sh", os.path.join(REPO, "packaging", "image", "finish-rootfs.sh"), dest, wheel],
                             check=True, capture_output=True, text=True, timeout=1200,
                             env={**os.environ, "PYTHON": sys.executable}).stdout
    return out.strip().splitlines()[-1].split()[-1]


def pack(rootfs: str, layout: str, tag: str) -> BuiltImage:
    """The root file system as a one-layer OCI image in the layout `layout`."""
    os.makedirs(layout, exist_ok=True)
    layer = os.path.join(layout, ".rootfs.tar")
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(rootfs)):
            tar.add(os.path.join(rootfs, name), arcname=name)
    try:
        return build_image_from_tars(layout, [(layer, "gzip")], tag=tag, cmd=["/usr/local/bin/cs-p2p", "--help"])
    finally:
        os.unlink(layer)
