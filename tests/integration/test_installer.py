"""The installer the DaemonSet runs, on a host that already has images: install, run twice,
upgrade, cold boot, uninstall — with the real image's root file system, real containerd and
real cs-p2p processes (started the way the unit the installer wrote says), on a fake host
whose services see its directories as the real ones (`fakehost.py`)."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import free_port, wait_for
from cs_p2p_dev.product_image import build_rootfs, pack
from cs_p2p_dev.releases import release
from cs_p2p.install.host import BUILD_FILE
from cs_p2p.store.handover import builtin_blob_dir
from tests.conftest import HAVE_CONTAINERD, requires_containerd
from tests.integration.fakehost import FakeHost
from tests.integration.test_lifecycle import busybox_archive

pytestmark = [
    requires_containerd,
    pytest.mark.skipif(not shutil.which("mmdebstrap") or not shutil.which("unshare"),
                       reason="needs mmdebstrap and unshare (hack/install-deps.sh)"),
    pytest.mark.skipif(not HAVE_CONTAINERD or not release().v2,
                       reason="the installer is tested on containerd 2.x (1.6 and 1.7 are out of support)"),
]

NODE_CONFIG = """\
version = 2

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"""


@pytest.fixture(scope="session")
def product_rootfs(tmp_path_factory) -> str:
    """The image's root file system, built once per session (hack/build-image's first half)."""
    rootfs = str(tmp_path_factory.mktemp("image") / "rootfs")
    build_rootfs(rootfs, log=lambda m: None)
    return rootfs


@pytest.fixture
def fake_host(workdir):
    host = FakeHost(os.path.join(workdir, "host"))
    yield host
    if host.pid("containerd.service"):
        for task in ctr(host, "task", "ls", "-q", check=False).stdout.split():
            ctr(host, "task", "kill", "-s", "SIGKILL", task, check=False)
            wait_for(lambda: ctr(host, "task", "delete", task, check=False).returncode == 0, 30, "the task to go")
    host.stop_all()
    subprocess.run(["umount", "-R", host.path("/var/lib/containerd")], capture_output=True)


def ctr(host: FakeHost, *args: str, check: bool = True, text: bool = True) -> subprocess.CompletedProcess:
    """ctr on the host (in its namespace: `ctr run` mounts snapshots by their host paths)."""
    return subprocess.run(host.wrap(shlex.join(["exec", release().bin("ctr"), *args])), capture_output=True,
                          text=text, check=check, timeout=300)


def image_check(host: FakeHost) -> dict[str, str]:
    out = ctr(host, "image", "check").stdout.splitlines()[1:]
    return {line.split()[0]: line.split()[3] for line in out if line.strip()}


def run_busybox(host: FakeHost) -> str:
    name = "c" + uuid.uuid4().hex[:8]
    return ctr(host, "run", "--rm", "localhost/lifecycle/busybox:v1", name, "/bin/busybox", "echo", "ran").stdout.strip()


def installer(host: FakeHost, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", *args, "--host", host.root, "--systemctl",
                          host.systemctl], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_install_upgrade_cold_boot_and_uninstall_lose_no_image(fake_host, own_registry, product_rootfs, workdir):
    host = fake_host
    hosts_dir = host.path("/etc/containerd/certs.d")
    own_hosts = os.path.join(hosts_dir, own_registry.addr, "hosts.toml")
    os.makedirs(os.path.dirname(own_hosts))
    with open(own_hosts, "w") as f:
        f.write(f'server = "http://{own_registry.addr}"\n')
    with open(host.path("/etc/containerd/config.toml"), "w") as f:
        f.write(NODE_CONFIG)
    originals = {p: read(p) for p in (host.path("/etc/containerd/config.toml"), own_hosts)}
    before_ref = push_image(build_image(os.path.join(workdir, "oci0"), [1 << 20]), own_registry.addr, "inst/before")
    after_img = build_image(os.path.join(workdir, "oci1"), [1 << 20, 50_000])
    after_ref = push_image(after_img, own_registry.addr, "inst/after")

    # a node with images: one pulled, one imported from a tar
    host.start("containerd.service")
    wait_for(lambda: os.path.exists(host.containerd_socket), 60, "the host's containerd")
    ctr(host, "image", "pull", "--hosts-dir", hosts_dir, before_ref)
    ctr(host, "image", "import", "--base-name", "localhost/lifecycle/busybox",
        busybox_archive(workdir, "localhost/lifecycle/busybox"))
    assert run_busybox(host) == "ran"
    images = image_check(host)

    config = os.path.join(workdir, "cs-p2p.toml")
    mirror = f"127.0.0.1:{free_port()}"
    with open(config, "w") as f:
        f.write('root = "/var/lib/cs-p2p"\nsocket = "/run/cs-p2p/content.sock"\n'
                'cluster-token-file = "/etc/cs-p2p/cluster-token"\nbootstrap-file = "/etc/cs-p2p/bootstrap"\n'
                f'[mirror]\nlisten = "{mirror}"\nregistries = ["http://{own_registry.addr}"]\n')
    secret = os.path.join(workdir, "secret")  # laid out as Kubernetes mounts a Secret
    os.makedirs(os.path.join(secret, "..data"))
    with open(os.path.join(secret, "..data", "cluster-token"), "w") as f:
        f.write("a-token-for-the-test-cluster-0123456789\n")
    os.symlink("..data/cluster-token", os.path.join(secret, "cluster-token"))
    os.makedirs(host.path("/etc/cs-p2p/pki"))  # the operator's own files (key-pair membership) stay
    with open(host.path("/etc/cs-p2p/pki/node.key"), "w") as f:
        f.write("the node's key\n")
    dht_port = free_port()
    install = ["host-install", "--source", product_rootfs, "--config", config, "--file", secret,
               f"--serve-arg=--peer-listen=127.0.0.1:{free_port()}", f"--serve-arg=--dht-listen=127.0.0.1:{dht_port}",
               "--containerd-version", release().series, f"--bootstrap-name=localhost:{dht_port}"]
    out = installer(host, *install).stdout
    assert f"127.0.0.1:{dht_port}" in read(host.path("/etc/cs-p2p/bootstrap")).decode().split()
    build = read(os.path.join(product_rootfs, BUILD_FILE)).decode().strip()
    assert os.readlink(host.path("/opt/cs-p2p/current")) == build
    assert os.path.exists(host.path(f"/opt/cs-p2p/{build}/usr/local/bin/cs-p2p"))
    assert "RootDirectory=/opt/cs-p2p/current" in read(host.path("/etc/systemd/system/cs-p2p.service")).decode()
    assert os.stat(host.path("/etc/cs-p2p/cluster-token")).st_mode & 0o777 == 0o600
    assert read(host.path("/etc/containerd/config.toml.cs-p2p-orig")) == originals[host.path("/etc/containerd/config.toml")]
    assert b"/etc/containerd/conf.d/cs-p2p.toml" in read(host.path("/etc/containerd/config.toml"))
    assert os.path.exists(host.path("/etc/containerd/conf.d/cs-p2p.toml"))
    assert mirror.encode() in read(own_hosts) and read(own_hosts + ".cs-p2p-orig") == originals[own_hosts]
    assert "adopted" in out
    adopted = os.listdir(builtin_blob_dir(host.path("/var/lib/containerd")))
    for hex_ in adopted:  # hard links: the same files, no space taken
        assert os.stat(host.path(f"/var/lib/cs-p2p/blobs/sha256/{hex_}")).st_ino == \
            os.stat(os.path.join(builtin_blob_dir(host.path("/var/lib/containerd")), hex_)).st_ino
    assert host.systemctl_log() == ["daemon-reload", "enable cs-p2p.service", "stop containerd.service",
                                    "restart cs-p2p.service", "start containerd.service"]
    wait_for(lambda: os.path.exists(host.containerd_socket), 60, "containerd after the install")
    assert image_check(host) == images  # from cs-p2p's store now
    assert run_busybox(host) == "ran"
    ctr(host, "image", "pull", "--hosts-dir", hosts_dir, after_ref)  # through cs-p2p and its mirror
    assert set(os.listdir(host.path("/var/lib/cs-p2p/blobs/sha256"))) >= {d.split(":")[1] for d in after_img.digests}
    images = image_check(host)

    # again: nothing to do, containerd untouched
    os.unlink(host.path("/systemctl.log"))
    installer(host, *install)
    assert host.systemctl_log() == ["enable cs-p2p.service", "start cs-p2p.service"]

    # upgrade: a new build restarts cs-p2p only
    upgraded = os.path.join(workdir, "rootfs-next")
    subprocess.run(["cp", "-al", product_rootfs, upgraded], check=True)
    os.unlink(os.path.join(upgraded, BUILD_FILE))
    with open(os.path.join(upgraded, BUILD_FILE), "w") as f:
        f.write(build + "-next\n")
    os.unlink(host.path("/systemctl.log"))
    out = installer(host, *[upgraded if a == product_rootfs else a for a in install]).stdout
    assert f"upgrade: {build} -> {build}-next" in out
    assert os.readlink(host.path("/opt/cs-p2p/current")) == build + "-next"
    assert os.path.isdir(host.path(f"/opt/cs-p2p/{build}"))  # kept for a rollback
    assert host.systemctl_log() == ["daemon-reload", "enable cs-p2p.service", "restart cs-p2p.service"]
    assert image_check(host) == images

    # cold boot, registry gone: cs-p2p first (from the installed copy, as the unit says), then containerd
    own_registry.stop()
    host.stop_all()
    host.start("cs-p2p.service")
    wait_for(lambda: os.path.exists(host.path("/run/cs-p2p/content.sock")), 60, "cs-p2p after the boot")
    host.start("containerd.service")
    wait_for(lambda: ctr(host, "version", check=False).returncode == 0, 60, "containerd after the boot")
    assert image_check(host) == images
    assert run_busybox(host) == "ran"

    # uninstall: containerd's own configuration and store, every image complete
    os.unlink(host.path("/systemctl.log"))
    installer(host, "host-uninstall")
    assert host.systemctl_log() == ["stop containerd.service", "start containerd.service",
                                    "disable --now cs-p2p.service", "daemon-reload"]
    for path, data in originals.items():
        assert read(path) == data
    assert not os.path.exists(host.path("/etc/containerd/conf.d/cs-p2p.toml"))
    assert not os.path.exists(host.path("/etc/containerd/config.toml.cs-p2p-orig"))
    assert not os.path.exists(host.path("/etc/systemd/system/cs-p2p.service"))
    assert not os.path.exists(host.path("/opt/cs-p2p/current"))
    assert sorted(os.listdir(host.path("/etc/cs-p2p"))) == ["pki"]
    assert host.pid("cs-p2p.service") is None
    wait_for(lambda: ctr(host, "version", check=False).returncode == 0, 60, "stock containerd")
    assert image_check(host) == images
    assert run_busybox(host) == "ran"
    for digest in after_img.digests:  # pulled through cs-p2p, now in containerd's own store
        got = ctr(host, "content", "get", digest, text=False).stdout
        assert hashlib.sha256(got).hexdigest() == digest.split(":")[1]


def test_the_image_pulls_runs_and_installs_itself_from_its_own_root(node, registry, product_rootfs, workdir):
    """The image hack/build-image makes, pushed and pulled through cs-p2p, run by containerd as
    the DaemonSet's init container runs it: `host-install --source /` copies the container's own
    root file system to the host (bind-mounted at /host), and the copy runs there."""
    img = pack(product_rootfs, os.path.join(workdir, "image"), "test")
    ref = push_image(img, registry.addr, "cs-p2p/installer")
    node.ctr(*node.containerd.pull_args(ref), timeout=300)
    host, settings = os.path.join(workdir, "host"), os.path.join(workdir, "settings")
    os.makedirs(host)
    os.makedirs(settings)
    with open(os.path.join(settings, "cs-p2p.toml"), "w") as f:
        f.write('root = "/var/lib/cs-p2p"\n')
    name = "i" + uuid.uuid4().hex[:8]
    out = node.ctr("run", "--rm", "--mount", f"type=bind,src={host},dst=/host,options=rbind:rw",
                   "--mount", f"type=bind,src={settings},dst=/config,options=rbind:ro", ref, name,
                   "/usr/local/bin/cs-p2p", "host-install", "--host=/host", "--config=/config/cs-p2p.toml",
                   "--containerd-version", release().series, "--systemctl=true", "--wait-seconds=0",
                   timeout=300).stdout.decode()
    build = read(os.path.join(product_rootfs, BUILD_FILE)).decode().strip()
    assert f"cs-p2p {build} installed" in out
    assert os.readlink(os.path.join(host, "opt/cs-p2p/current")) == build
    copy = os.path.join(host, "opt/cs-p2p", build)
    assert not os.path.exists(os.path.join(copy, "host"))  # the container's mounts stay behind
    version = subprocess.run(["chroot", copy, "/usr/local/bin/cs-p2p", "--version"], capture_output=True,
                             text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
