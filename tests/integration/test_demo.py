"""The README's demo command works end to end (a small cluster and image, to keep it quick)."""

from __future__ import annotations

import subprocess
import sys

from cs_p2p_dev.releases import release
from tests.conftest import requires_containerd


@requires_containerd
def test_demo_pulls_from_the_registry_once_then_from_peers_with_the_registry_down():
    res = subprocess.run([sys.executable, "-m", "cs_p2p_dev.demo", "--nodes", "2", "--layers", "2",
                          "--layer-mib", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith("node") and "MiB" in line}
    assert "registry stopped after node1's pull" in res.stdout  # node 2 pulled with the registry down
    assert rows["node2"][2:4] == ["0.0", "MiB"]  # nothing from the registry
    assert "(1.00x the image)" in res.stdout
    assert res.stdout.rstrip().endswith("demo: OK")
    # Its long steps are not silent: progress on stderr, each step with how it ended.
    assert "building and pushing a 2-layer image: done in" in res.stderr
    assert all(f"node{i}: pulling {ref}: done in" in res.stderr for i in (1, 2)
               for ref in [res.stdout.split("image: ", 1)[1].split()[0]]), res.stderr
    if release().applies_layers:  # containerd 2.x: every node's layers were applied by its cs-p2p
        assert all(" ".join(row).count("2 by cs-p2p") == 1 for row in rows.values()), res.stdout
