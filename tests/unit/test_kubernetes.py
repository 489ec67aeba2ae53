"""The Kubernetes install (packaging/kubernetes, a kustomize base with an overlay per
membership mode) renders with `kubectl kustomize` and describes a daemon that would start:
images pinned, the store and socket directories mounted where the config puts them,
probes that reach the daemon, every Secret it mounts rendered, and flags plus config that
`cs-p2p serve` accepts."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
import yaml

from cs_p2p.cli import _parser
from cs_p2p.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "packaging" / "kubernetes" / "overlays"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl renders the manifests (hack/install-deps.sh installs it)")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(OVERLAYS / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def serve_config(docs: list[dict], container: dict, tmp_path: pathlib.Path):
    """The daemon's Config from the container's flags and the ConfigMap's TOML, with the files
    its flags name (Secrets, node keys) stood in for by files in `tmp_path`."""
    args = [a.replace("$(NODE_IP)", "10.0.0.7") for a in container["args"]]
    flags = vars(_parser().parse_args(args))
    assert flags.pop("command") == "serve"
    config_path = flags.pop("config")
    cm = one(docs, "ConfigMap")
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    assert next(v for v in pod_spec(docs)["volumes"] if v["name"] == mount["name"])["configMap"]["name"] == \
        cm["metadata"]["name"]
    toml = tmp_path / "cs-p2p.toml"
    toml.write_text(cm["data"][os.path.basename(config_path)])
    for key in ("cluster_token_file", "node_key_file", "node_cert_file", "cluster_ca_file"):
        if flags.get(key):
            flags[key] = None  # files checked against the Secrets separately; membership loads them at start
    return load_config(str(toml), flags)


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def mounted_from(spec: dict, container: dict, path: str) -> dict:
    """The volume the file or directory `path` in `container` comes from."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    assert mounts, f"{path} is not on any volume of {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    return next(v for v in spec["volumes"] if v["name"] == mount["name"]) | {"_mount": mount}


@pytest.mark.parametrize("overlay", ["token", "key-pair"])
def test_every_overlay_renders_a_daemonset_that_would_start(overlay, tmp_path):
    docs = render(overlay)
    spec = pod_spec(docs)
    main = next(c for c in spec["containers"] if c["name"] == "cs-p2p")
    init = next(c for c in spec["initContainers"] if c["name"] == "containerd-config")

    # Images: one image, pinned to a tag, for the daemon and its init container.
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1 and ":" in next(iter(images)).rsplit("/", 1)[-1]
    assert not next(iter(images)).endswith(":latest")

    # Flags and config are what `cs-p2p serve` accepts; node-local addresses on the host network.
    assert spec["hostNetwork"] is True
    cfg = serve_config(docs, main, tmp_path)
    assert cfg.peer_listen == "10.0.0.7:5001" and cfg.dht_listen == "10.0.0.7:5002"
    assert cfg.metrics_listen == "10.0.0.7:5003" and cfg.mirror_registry

    # The store and containerd's socket directory are host directories, where the config says.
    root = mounted_from(spec, main, cfg.root)
    assert root["hostPath"]["path"] == root["_mount"]["mountPath"] == cfg.root
    sock = mounted_from(spec, main, cfg.socket)
    assert sock["hostPath"]["path"] == os.path.dirname(cfg.socket)
    # The init container writes containerd's drop-in and hosts.toml on the host.
    assert mounted_from(spec, init, "/etc/containerd/conf.d")["hostPath"]["path"] == "/etc/containerd"
    script = init["command"][-1]
    assert "cs-p2p containerd-config" in script and f"--socket {cfg.socket}" in script
    assert "--hosts-dir /etc/containerd/certs.d" in script
    cm = one(docs, "ConfigMap")
    for env in init["env"]:
        ref = env["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == cm["metadata"]["name"] and ref["key"] in cm["data"]
    assert cm["data"]["mirror-registries"].split() == [r.base_url for r in cfg.mirror_registry]

    # Probes: readiness scrapes the metrics port; liveness asks the daemon through its admin socket.
    ready = main["readinessProbe"]["httpGet"]
    assert ready["path"] == "/metrics" and str(ready["port"]) == cfg.metrics_listen.rsplit(":", 1)[1]
    live = main["livenessProbe"]["exec"]["command"]
    assert live[:2] == ["cs-p2p", "status"] and live[live.index("--root") + 1] == cfg.root

    # Services: the headless bootstrap on the DHT port (every node, ready or not) and the metrics one.
    labels = spec.get("labels") or one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    boot = one(docs, "Service", "cs-p2p-bootstrap")
    assert boot["spec"]["clusterIP"] == "None" and boot["spec"]["publishNotReadyAddresses"] is True
    assert boot["spec"]["ports"][0]["port"] == int(cfg.dht_listen.rsplit(":", 1)[1])
    assert boot["spec"]["ports"][0]["protocol"] == "UDP"
    assert any(b.startswith(f"cs-p2p-bootstrap.{boot['metadata']['namespace']}.svc") for b in cfg.bootstrap)
    metrics = one(docs, "Service", "cs-p2p-metrics")
    assert metrics["spec"]["ports"][0]["port"] == int(cfg.metrics_listen.rsplit(":", 1)[1])
    for svc in (boot, metrics):
        assert svc["spec"]["selector"].items() <= labels.items()

    # Membership: every file the flags name is in a Secret that is rendered, under that key.
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    flags = vars(_parser().parse_args([a.replace("$(NODE_IP)", "10.0.0.7") for a in main["args"]]))
    files = [flags[k] for k in ("cluster_token_file", "cluster_ca_file") if flags.get(k)]
    assert files, "no membership: peers would not authenticate"
    for path in files:
        volume = mounted_from(spec, main, path)
        secret = secrets[volume["secret"]["secretName"]]
        assert os.path.basename(path) in secret["data"]
    if overlay == "key-pair":  # each node's own key and certificate are the node's, on the host
        for key in ("node_key_file", "node_cert_file"):
            assert "hostPath" in mounted_from(spec, main, flags[key])
    assert all(d["metadata"].get("namespace") == "kube-system" for d in docs)


def test_the_containerd_drop_in_the_init_container_writes_is_valid(tmp_path):
    """Run the init container's script with the rendered ConfigMap's values (containerd-config
    into a scratch /etc/containerd)."""
    docs = render("token")
    spec = pod_spec(docs)
    init = next(c for c in spec["initContainers"] if c["name"] == "containerd-config")
    cm = one(docs, "ConfigMap")
    script = init["command"][-1].replace("/etc/containerd", str(tmp_path))
    script = script.replace("cs-p2p containerd-config", f"{shlex.quote(os.sys.executable)} -m cs_p2p.cli containerd-config")
    env = dict(os.environ, MIRROR_REGISTRIES=cm["data"]["mirror-registries"],
               CONTAINERD_VERSION=cm["data"]["containerd-version"])
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    drop_in = (tmp_path / "conf.d" / "cs-p2p.toml").read_text()
    assert 'address = "/run/cs-p2p/content.sock"' in drop_in
    assert (tmp_path / "certs.d" / "registry.internal" / "hosts.toml").exists()
