"""Secure by default: a node with no membership does not listen for peers or the DHT beyond
loopback unless the operator asks for an open cluster, and then it says so — at start, in
`cs-p2p status`, and as a metric."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from cs_p2p.admin import METRICS_PATH
from cs_p2p_dev.processes import CsP2P, free_port
from cs_p2p.status_client import _UnixConnection, fetch_status

ADDR = "10.99.0.1"  # a non-loopback address that exists only inside the test's network namespace


def serve(workdir: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cs_p2p.cli", "serve", "--root", os.path.join(workdir, "root"),
                           "--socket", os.path.join(workdir, "cs.sock"), *flags],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flags", [
    ["--peer-listen", f"{ADDR}:5001"],
    ["--peer-listen", "0.0.0.0:5001", "--advertise-addr", ADDR, "--dht-listen", "0.0.0.0:5002"],
], ids=["address", "wildcard"])
def test_an_open_cluster_on_a_network_address_is_refused_naming_both_memberships(workdir, flags):
    res = serve(workdir, *flags)
    assert res.returncode == 2
    for words in ("no membership is configured", "cluster-token-file", "node-key-file", "cluster-ca-file",
                  "--insecure-open-membership", flags[1]):
        assert words in res.stderr, res.stderr
    assert not os.path.exists(os.path.join(workdir, "cs.sock"))


def admin_metrics(root: str) -> str:
    conn = _UnixConnection(os.path.join(root, "admin.sock"), 10)
    try:
        conn.request("GET", METRICS_PATH)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_loopback_without_membership_starts_quietly(workdir):
    cs = CsP2P(os.path.join(workdir, "cs"), ["--peer-listen", f"127.0.0.1:{free_port()}",
                                             "--dht-listen", f"127.0.0.1:{free_port()}"]).start()
    try:
        st = fetch_status(os.path.join(cs.root, "admin.sock"))
        assert st["membership"] == "open" and st["open_on_network"] == []
        assert "open membership" not in open(cs.proc.log_path).read()
        assert 'cs_p2p_membership{mode="open"} 1.0' in admin_metrics(cs.root)
    finally:
        cs.stop()


@pytest.fixture
def private_netns():
    """A network namespace whose loopback device also carries ADDR: a network address that no
    other host can reach."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (hack/install-deps.sh)")
    name = f"csp-open-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{ADDR}/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_an_open_cluster_the_operator_asked_for_starts_and_says_so(workdir, private_netns):
    cs = CsP2P(os.path.join(workdir, "cs"), ["--peer-listen", f"{ADDR}:5001", "--dht-listen", f"{ADDR}:5002",
                                             "--insecure-open-membership"], netns=private_netns).start()
    try:
        log = open(cs.proc.log_path).read()
        assert "open membership on the network" in log and f"peer-listen {ADDR}:5001" in log
        st = fetch_status(os.path.join(cs.root, "admin.sock"))
        assert st["open_on_network"] == [f"peer-listen {ADDR}:5001", f"dht-listen {ADDR}:5002"]
        out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", cs.root],
                             capture_output=True, text=True, timeout=30).stdout
        assert "WARNING    open membership on the network" in out
        assert 'cs_p2p_membership{mode="open"} 1.0' in admin_metrics(cs.root)
    finally:
        cs.stop()


def test_a_token_cluster_on_a_network_address_starts_without_a_warning(workdir, private_netns):
    token = os.path.join(workdir, "token")
    with open(token, "w") as f:
        f.write("a-token-for-the-test-cluster-0123456789\n")
    cs = CsP2P(os.path.join(workdir, "cs"), ["--peer-listen", f"{ADDR}:5001", "--dht-listen", f"{ADDR}:5002",
                                             "--cluster-token-file", token], netns=private_netns).start()
    try:
        assert "open membership" not in open(cs.proc.log_path).read()
        assert fetch_status(os.path.join(cs.root, "admin.sock"))["open_on_network"] == []
        assert 'cs_p2p_membership{mode="token"} 1.0' in admin_metrics(cs.root)
    finally:
        cs.stop()


def test_the_installer_refuses_an_open_cluster_before_it_touches_the_host(workdir):
    config = os.path.join(workdir, "config.toml")
    with open(config, "w") as f:
        f.write('root = "/var/lib/cs-p2p"\n')
    host = os.path.join(workdir, "host")
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "host-install", "--host", host, "--config", config,
                          "--containerd-version", "2.3", f"--serve-arg=--peer-listen={ADDR}:5001",
                          "--systemctl", "true"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "--insecure-open-membership" in res.stderr
    assert not os.path.exists(host)
