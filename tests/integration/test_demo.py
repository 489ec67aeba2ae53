"""The README's demo command works end to end (a small image, to keep it quick)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import requires_containerd


@requires_containerd
def test_demo_pulls_through_cs_p2p():
    res = subprocess.run([sys.executable, "-m", "cs_p2p.devcluster.demo", "--layers", "2", "--layer-mib", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "blobs in cs-p2p root" in res.stdout and "4 of 4" in res.stdout
    assert res.stdout.rstrip().endswith("demo: OK")
