"""Which containerd release the demo, tests and benchmarks run.

`../shared/containerd/` (beside the repository) keeps containerd 2.3.4, 2.0.11 and 1.7.34
builds; Debian's package is 1.6.20. `CS_P2P_CONTAINERD` picks one: `2.3.4` (the default where
the shared builds exist), `2.0.11`, `1.7.34`, or `system` (the containerd on PATH: Debian's 1.6 here, a
user's own elsewhere, and the default where `../shared/containerd` is absent).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from cs_p2p.containerd_config import detect_release, is_v2

ENV = "CS_P2P_CONTAINERD"
DEFAULT = "2.3.4"
SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "containerd")


@dataclass(frozen=True)
class Release:
    name: str  # as asked: "2.3.4", "1.7.34" or "system"
    bin_dir: str  # holds containerd and ctr (the shim too, for the shared builds)
    series: str  # "1.6", "1.7" or "2.MINOR": what containerd-config writes for it

    def bin(self, name: str) -> str:
        return os.path.join(self.bin_dir, name)

    @property
    def applies_layers(self) -> bool:
        """containerd 2.x takes proxy plugins of type "diff": cs-p2p applies the layers."""
        return self.v2

    @property
    def v2(self) -> bool:
        return is_v2(self.series)

    def env(self) -> dict[str, str]:
        """The environment for containerd: its own shim first on PATH."""
        return {**os.environ, "PATH": self.bin_dir + os.pathsep + os.environ.get("PATH", "")}


def shared_install_script() -> str | None:
    path = os.path.normpath(os.path.join(SHARED, "install.sh"))
    return path if os.path.exists(path) else None


@functools.cache
def release(name: str | None = None) -> Release:
    name = name or os.environ.get(ENV) or (DEFAULT if shared_install_script() else "system")
    if name == "system":
        found = shutil.which("containerd")
        if not found:
            raise RuntimeError("no containerd on PATH (hack/install-deps.sh installs Debian's)")
        bin_dir = os.path.dirname(found)
    else:
        script = shared_install_script()
        if script is None:
            raise RuntimeError(f"{ENV}={name}: ../shared/containerd is not beside this checkout; use {ENV}=system")
        bin_dir = subprocess.run(["bash", script, name], check=True, capture_output=True, text=True,
                                 timeout=300).stdout.strip().splitlines()[-1]
    return Release(name, bin_dir, detect_release(os.path.join(bin_dir, "containerd")))
