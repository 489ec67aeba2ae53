"""Private images stay private (docs/security.md, the tenant model): with peers holding a private
image, a node's mirror serves it only to a request the registry lets read it in that
repository; during a registry outage only to credentials accepted before (public images to
anyone); and a rollout costs the registry a few authorization requests per node, not one per
blob.  Real containerd, docker-registry with htpasswd (users alice and bob), and no registry
credentials configured in cs-p2p: credentials come with each pull, as kubelet passes a pod's."""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from cs_p2p.config import MirrorRegistry
from cs_p2p.containerd_config import write_hosts_dir
from cs_p2p.mirror.server import DEFAULT_ACCEPT
from cs_p2p_dev.images import build_image, push_image
from cs_p2p_dev.processes import Containerd, CsP2P, Registry, free_port, wait_for
from tests.conftest import requires_containerd
from tests.integration.test_containerd import assert_unpacked
from tests.integration.test_p2p_pull import located

pytestmark = requires_containerd

ALICE, BOB = "alice:al1ce-Pa55", "bob:b0b-Pa55"
REPO = "team-a/secret"


def basic(creds: str) -> str:
    return "Basic " + base64.b64encode(creds.encode()).decode()


class TenantNode:
    """containerd + cs-p2p (peers, DHT, mirror for every registry given, none of their credentials)."""

    def __init__(self, workdir: str, registries: list[Registry], bootstrap: str | None) -> None:
        self.peer, self.dht, self.mirror = (f"127.0.0.1:{free_port()}" for _ in range(3))
        args = ["--peer-listen", self.peer, "--dht-listen", self.dht, "--mirror-listen", self.mirror,
                "--mirror-timeout-ms", "1000"]
        for reg in registries:
            args += ["--mirror-registry", f"http://{reg.addr}"]
        self.cs = CsP2P(os.path.join(workdir, "cs"), args + (["--bootstrap", bootstrap] if bootstrap else [])).start()
        hosts = os.path.join(workdir, "hosts")
        write_hosts_dir(hosts, [MirrorRegistry(r.addr, plain_http=True) for r in registries], self.mirror)
        self.containerd = Containerd(os.path.join(workdir, "ctd"), self.cs.socket, hosts_dir=hosts).start()

    def pull(self, ref: str, creds: str | None = None) -> subprocess.CompletedProcess:
        args = self.containerd.pull_args(ref)
        user = ["--user", creds] if creds else []
        return self.containerd.ctr(*args[:-1], *user, args[-1], check=False, timeout=180)

    def forget(self, ref: str) -> None:
        """Remove the image and let containerd's GC delete its content (cs-p2p caches it)."""
        self.containerd.ctr("image", "rm", "--sync", ref)

    def ask(self, registry: Registry, path: str, authorization: str | None = None) -> int:
        """The status of GET <mirror>/v2/<path> for `registry`, as containerd would send it."""
        req = urllib.request.Request(f"http://{self.mirror}/v2/{path}?ns={registry.addr}",
                                     headers={"Accept": DEFAULT_ACCEPT, **({"Authorization": authorization}
                                                                           if authorization else {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def status(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "status", "--root", self.cs.root, "--json"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return json.loads(out)

    def log(self) -> str:
        with open(self.cs.proc.log_path) as f:
            return f.read()

    def stop(self) -> None:
        self.containerd.stop()
        self.cs.stop()


@pytest.fixture
def private(workdir):
    reg = Registry(os.path.join(workdir, "private"), users=dict(c.split(":") for c in (ALICE, BOB))).start()
    yield reg
    reg.stop()


@pytest.fixture
def public(workdir):
    reg = Registry(os.path.join(workdir, "public")).start()
    yield reg
    reg.stop()


@pytest.fixture
def make_nodes(workdir):
    made: list[TenantNode] = []

    def make(n: int, registries: list[Registry]) -> list[TenantNode]:
        for i in range(n):
            made.append(TenantNode(os.path.join(workdir, f"n{len(made) + 1}"), registries,
                                   made[0].dht if made else None))
        return made

    yield make
    for node in made:
        node.stop()


def wait_shared(node: TenantNode, digests: list[str]) -> None:
    for d in digests:
        wait_for(lambda: located(d, node.dht), 30, f"{d} to be announced")


def test_a_private_image_peers_hold_is_served_only_to_requests_the_registry_allows(private, make_nodes, tmp_path):
    img = build_image(str(tmp_path / "oci"), [2 << 20, 1 << 20])
    ref = push_image(img, private.addr, REPO, creds=ALICE)
    n1, n2 = make_nodes(2, [private])
    res = n1.pull(ref, ALICE)
    assert res.returncode == 0, res.stderr.decode()
    wait_shared(n2, img.digests)
    layer = img.layer_digests[0]

    # The table of issue 19: without credentials, with wrong ones, and under another repository.
    for node in (n1, n2):
        for auth in (None, basic("alice:wrong")):
            assert node.ask(private, f"{REPO}/manifests/{img.tag}", auth) == 401
            assert node.ask(private, f"{REPO}/manifests/{img.manifest_digest}", auth) == 401
            assert node.ask(private, f"team-b/app/manifests/{img.manifest_digest}", auth) == 401
            assert node.ask(private, f"{REPO}/blobs/{layer}", auth) == 401
        assert node.ask(private, f"team-b/app/manifests/{img.manifest_digest}", basic(ALICE)) == 404
        assert node.ask(private, f"team-b/app/blobs/{layer}", basic(ALICE)) == 404

    by_digest = f"{private.addr}/{REPO}@{img.manifest_digest}"
    res = n2.pull(by_digest)
    assert res.returncode != 0
    assert re.search(r"401|unauthorized|no basic auth credentials", res.stderr.decode(), re.I), res.stderr
    before = private.blob_bytes_served()
    res = n2.pull(by_digest, ALICE)
    assert res.returncode == 0, res.stderr.decode()
    after = private.blob_bytes_served()
    assert all(after.get(d) == before.get(d) for d in img.layer_digests)  # every layer from node 1
    assert {*img.layer_digests, img.config_digest} <= n2.cs.blob_digests()
    # bob is a user of this registry too (htpasswd gives every user every repository)
    assert n2.ask(private, f"{REPO}/blobs/{layer}", basic(BOB)) == 200

    refusals = n2.status()["mirror_refusals"]
    assert refusals.get("unauthorized", 0) >= 8 and refusals.get("not_in_repository", 0) >= 2
    log = n1.log() + n2.log()
    for secret in ("al1ce-Pa55", "b0b-Pa55", basic(ALICE), basic(BOB)):
        assert secret not in log


def test_in_a_registry_outage_only_credentials_accepted_before_or_public_images_are_served(
        private, public, make_nodes, tmp_path, workdir):
    img = build_image(str(tmp_path / "private"), [2 << 20, 1 << 20])
    ref = push_image(img, private.addr, REPO, creds=ALICE)
    pub = build_image(str(tmp_path / "public"), [1 << 20])
    pub_ref = push_image(pub, public.addr, "pub/app")
    n1, n2 = make_nodes(2, [private, public])
    assert n1.pull(ref, ALICE).returncode == 0
    assert n1.pull(pub_ref).returncode == 0  # anonymously: the repository is public
    wait_shared(n2, img.digests + pub.digests)
    assert n2.pull(ref, ALICE).returncode == 0  # node 2's registry accepts alice for the repository
    n2.forget(ref)
    private.stop()
    public.stop()

    res = n2.pull(ref, ALICE)
    assert res.returncode == 0, res.stderr.decode()
    assert_unpacked(n2.containerd, img, ref, os.path.join(workdir, "mnt-outage"))
    n2.forget(ref)
    for creds in (BOB, None):  # bob never pulled it through node 2; nobody's credentials
        res = n2.pull(ref, creds)
        assert res.returncode != 0
    reasons = n2.status()["mirror_refusals"]
    assert reasons.get("outage_unknown_credentials", 0) >= 2
    assert "refused during registry outage: credentials not accepted for this repository before" in n2.log()

    res = n2.pull(pub_ref)  # never pulled on node 2, no credentials: public, from peers
    assert res.returncode == 0, res.stderr.decode()


def registry_requests(reg: Registry) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request a puller (not skopeo) sent the registry."""
    pattern = re.compile(r'"(GET|HEAD) (/v2/\S*) HTTP/[0-9.]+" (\d+) \d+ "[^"]*" "(?!skopeo)')
    with open(reg.proc.log_path, errors="replace") as f:
        return [(m.group(1), m.group(2), int(m.group(3))) for m in map(pattern.search, f) if m]


def test_a_rollout_of_a_private_image_costs_the_registry_a_few_authorization_requests_per_node(
        private, make_nodes, tmp_path):
    img = build_image(str(tmp_path / "oci"), [128 << 10] * 20)
    ref = push_image(img, private.addr, REPO, creds=ALICE)
    nodes = make_nodes(8, [private])
    start = len(registry_requests(private))
    assert nodes[0].pull(ref, ALICE).returncode == 0
    wait_shared(nodes[-1], img.digests)
    with ThreadPoolExecutor(len(nodes) - 1) as pool:
        results = list(pool.map(lambda n: n.pull(ref, ALICE), nodes[1:]))
    assert all(r.returncode == 0 for r in results), [r.stderr.decode() for r in results if r.returncode]

    requests = registry_requests(private)[start:]
    manifests = [r for r in requests if "/manifests/" in r[1]]
    transfers = [r for r in requests if r[0] == "GET" and "/blobs/" in r[1] and r[2] in (200, 206)]
    authorization = [r for r in requests if r not in manifests and r not in transfers and r[1] != "/v2/"]
    print(f"registry requests: {len(manifests)} for manifests, {len(transfers)} blob transfers, "
          f"{len(authorization)} more for authorization", file=sys.stderr)
    sent = collections.Counter(path.rsplit("/", 1)[1] for _, path, _ in transfers)
    assert all(sent[d] <= 1 for d in img.layer_digests)  # each layer left the registry once
    assert sent[img.config_digest] <= len(nodes)  # the config, read before any layer: to each node
    assert len(transfers) <= len(img.digests) + len(nodes)
    assert len(authorization) <= 2 * len(nodes), authorization  # not one per blob and node (168)
    assert len(manifests) <= 6 * len(nodes)
