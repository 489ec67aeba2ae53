"""A private registry (distribution with htpasswd Basic auth) behind the node's mirror: pulls
work with the credentials configured for it, or with those containerd itself sends (passed
upstream for that request only), and fail clearly without any; the password is never logged."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request

import pytest

from cs_p2p.config import MirrorRegistry
from cs_p2p.containerd_config import write_hosts_dir
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import Containerd, CsP2P, Registry, free_port
from cs_p2p.mirror.server import DEFAULT_ACCEPT
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked

pytestmark = requires_containerd

USER, PASSWORD = "puller", "s3cret-Pa55:with-colon"


class PrivateMirrorNode:
    """containerd whose hosts.toml puts the node's mirror in front of the private registry;
    the mirror has the registry's credentials if `credentials` is set.  `upstream`: the
    registry's address as nodes reach it (a front to it, `faults.FlakyRegistry`); `extra`:
    more `cs-p2p serve` flags."""

    def __init__(self, workdir: str, registry: Registry, credentials: str | None, extra: list[str] | None = None,
                 upstream: str | None = None) -> None:
        upstream = upstream or registry.addr
        self.mirror = f"127.0.0.1:{free_port()}"
        os.makedirs(workdir, exist_ok=True)
        entry = f'url = "http://{upstream}"'
        if credentials is not None:
            cred = os.path.join(workdir, "registry.cred")
            with open(cred, "w") as f:
                f.write(credentials + "\n")
            os.chmod(cred, 0o600)
            entry += f', credentials-file = "{cred}"'
        config = os.path.join(workdir, "cs-p2p.toml")
        with open(config, "w") as f:
            f.write(f'[mirror]\nlisten = "{self.mirror}"\nregistries = [{{{entry}}}]\n')
        self.cs = CsP2P(os.path.join(workdir, "cs"), ["--config", config, *(extra or [])]).start()
        hosts = os.path.join(workdir, "hosts")
        write_hosts_dir(hosts, [MirrorRegistry(upstream, plain_http=True)], self.mirror)
        self.containerd = Containerd(os.path.join(workdir, "ctd"), self.cs.socket, hosts_dir=hosts).start()

    def pull(self, ref: str, *extra: str):
        args = self.containerd.pull_args(ref)
        return self.containerd.ctr(*args[:-1], *extra, args[-1], check=False, timeout=120)

    def ctr(self, *args: str, **kw):
        return self.containerd.ctr(*args, **kw)

    def log(self) -> str:
        with open(self.cs.proc.log_path) as f:
            return f.read()

    def stop(self) -> None:
        self.containerd.stop()
        self.cs.stop()


@pytest.fixture
def private_registry(workdir):
    reg = Registry(os.path.join(workdir, "private"), users={USER: PASSWORD}).start()
    yield reg
    reg.stop()


@pytest.fixture
def image(private_registry, tmp_path):
    img = build_image(str(tmp_path / "oci"), [3 << 20, 1 << 20])
    return img, push_image(img, private_registry.addr, "private/app", creds=f"{USER}:{PASSWORD}")


@pytest.fixture
def make_node(workdir, private_registry):
    made: list[PrivateMirrorNode] = []

    def make(name: str, credentials: str | None) -> PrivateMirrorNode:
        made.append(PrivateMirrorNode(os.path.join(workdir, name), private_registry, credentials))
        return made[-1]

    yield make
    for n in made:
        n.stop()


def mirror_manifest(node: PrivateMirrorNode, registry: Registry, ref: str, authorization: str | None) -> int:
    name, tag = ref.split("/", 1)[1].rsplit(":", 1)
    req = urllib.request.Request(f"http://{node.mirror}/v2/{name}/manifests/{tag}?ns={registry.addr}",
                                 headers={"Accept": DEFAULT_ACCEPT})
    if authorization:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        assert exc.code != 401 or exc.headers.get("WWW-Authenticate", "").startswith("Basic")
        return exc.code


def test_the_mirror_pulls_from_a_private_registry_with_its_configured_credentials(make_node, private_registry,
                                                                                   image, workdir):
    img, ref = image
    node = make_node("with-creds", f"{USER}:{PASSWORD}")
    out = node.pull(ref)
    assert out.returncode == 0, out.stderr.decode()
    assert node.cs.blob_digests() == set(img.digests)
    assert_unpacked(node, img, ref, os.path.join(workdir, "mnt-private"))
    log = node.log()
    assert log.count('"from": "registry"') >= len(img.layer_digests)  # the layers came through the mirror
    assert PASSWORD not in log and "s3cret" not in log


def test_without_credentials_the_pull_fails_clearly_and_says_why(make_node, image):
    img, ref = image
    node = make_node("no-creds", None)
    out = node.pull(ref)
    assert out.returncode != 0
    # containerd's words differ by release: "401 Unauthorized", "no basic auth credentials"
    assert re.search(r"401|unauthorized|no basic auth credentials", out.stderr.decode(), re.I), out.stderr
    assert node.cs.blob_digests() == set()
    assert "upstream registry wants credentials" in node.log() and "credentials-file" in node.log()

    wrong = make_node("wrong-creds", f"{USER}:not-the-password")
    assert wrong.pull(ref).returncode != 0
    assert "with the credentials in" in wrong.log() and "not-the-password" not in wrong.log()


def test_the_credentials_containerd_sends_go_upstream_for_that_request_only(make_node, private_registry, image):
    img, ref = image
    node = make_node("containerd-creds", None)
    out = node.pull(ref, "--user", f"{USER}:{PASSWORD}")  # containerd answers the mirror's challenge
    assert out.returncode == 0, out.stderr.decode()
    assert node.cs.blob_digests() == set(img.digests)
    assert node.log().count('"from": "registry"') >= len(img.layer_digests)  # through the mirror, not around it

    import base64
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert mirror_manifest(node, private_registry, ref, basic) == 200
    assert mirror_manifest(node, private_registry, ref, None) == 401  # nothing was kept from it
    assert PASSWORD not in node.log()
