"""The Kubernetes install (packaging/kubernetes: a kustomize base with an overlay per
membership mode, and the uninstall) renders with `kubectl kustomize` and describes an
installer that would work: one pinned image, commands and settings that cs-p2p accepts, the
host access the installer needs (hostPID for the host's systemd, the host directories it
writes) and nothing more, and every Secret it copies rendered."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from cs_p2p.cli import _parser
from cs_p2p.config import load_config, parse_host_port, peer_advertised
from cs_p2p.install.contacts import CONTACTS_FILE
from cs_p2p.install.host import BUILD_FILE

ROOT = pathlib.Path(__file__).resolve().parents[2]
KUBE = ROOT / "packaging" / "kubernetes"
NODE_IP = "10.0.0.7"
# what the installer writes on the host, by the host directory it is under
INSTALL_HOST_DIRS = {"/etc", "/var/lib", "/opt", "/run/cs-p2p"}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl renders the manifests (hack/install-deps.sh installs it)")


def render(path: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(KUBE / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]


def container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


def expand(argv: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a command."""
    out = []
    for arg in argv:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        out.append(arg)
    return out


def pod_env(docs: list[dict], c: dict, node_ip: str = NODE_IP) -> dict[str, str]:
    cm = one(docs, "ConfigMap")
    env = {}
    for e in c.get("env", []):
        src = e["valueFrom"]
        if "fieldRef" in src:
            assert src["fieldRef"]["fieldPath"] == "status.hostIP"
            env[e["name"]] = node_ip
        else:
            ref = src["configMapKeyRef"]
            assert ref["name"] == cm["metadata"]["name"] and ref["key"] in cm["data"]
            env[e["name"]] = cm["data"][ref["key"]]
    return env


def host_mounts(spec: dict, c: dict) -> dict[str, str]:
    """mountPath -> host path of every hostPath volume the container mounts."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"] for m in c.get("volumeMounts", [])
            if "hostPath" in volumes[m["name"]]}


def install_args(docs: list[dict], node_ip: str = NODE_IP):
    """The installer's parsed command and the daemon's Config it installs (ConfigMap TOML plus
    the serve flags), the files its flags name stood in for."""
    spec = pod_spec(docs)
    init = container(spec, "install")
    args = _parser().parse_args(expand(init["command"][1:], pod_env(docs, init, node_ip)))
    assert init["command"][0] == "cs-p2p" and args.command == "host-install"
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    cm_volume = next(v for v in spec["volumes"] if v["name"] == mounts[os.path.dirname(args.config)])
    assert cm_volume["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    return args, init


def daemon_config(docs: list[dict], args, tmp_path: pathlib.Path):
    toml = tmp_path / "cs-p2p.toml"
    toml.write_text(one(docs, "ConfigMap")["data"][os.path.basename(args.config)])
    serve = vars(_parser().parse_args(["serve", *args.serve_arg]))
    serve.pop("command")
    serve.pop("config")
    files = {k: serve[k] for k in ("cluster_token_file", "node_key_file", "node_cert_file", "cluster_ca_file")}
    return load_config(str(toml), serve), files  # (the files are read when the daemon starts)


def test_on_an_ipv6_node_the_daemon_listens_and_advertises_its_ipv6_address(tmp_path):
    docs = render("overlays/token")
    args, _ = install_args(docs, node_ip="fd00:10::7")
    cfg, _ = daemon_config(docs, args, tmp_path)
    assert parse_host_port(cfg.peer_listen, "peer-listen") == ("fd00:10::7", 5001)
    assert parse_host_port(cfg.dht_listen, "dht-listen") == ("fd00:10::7", 5002)
    assert parse_host_port(cfg.metrics_listen, "metrics-listen") == ("fd00:10::7", 5003)
    assert peer_advertised(cfg) == "[fd00:10::7]:5001"  # what provider records carry


@pytest.mark.parametrize("overlay", ["token", "key-pair"])
def test_every_overlay_renders_an_installer_that_would_install(overlay, tmp_path):
    docs = render(f"overlays/{overlay}")
    spec = pod_spec(docs)

    # One image, pinned to a tag, for every container.
    images = {c["image"] for c in spec["containers"] + spec["initContainers"]}
    assert len(images) == 1 and ":" in next(iter(images)).rsplit("/", 1)[-1]
    assert not next(iter(images)).endswith(":latest")

    # The host access the installer needs, and nothing more: the host's PID namespace (systemctl
    # through PID 1), privileges for the installer only, and the host directories it writes,
    # /var/lib as one mount so that adoption hard-links containerd's blobs into cs-p2p's store.
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert not spec.get("hostIPC") and not spec.get("shareProcessNamespace")
    args, init = install_args(docs)
    assert init["securityContext"] == {"privileged": True}
    assert host_mounts(spec, init) == {f"/host{d}": d for d in INSTALL_HOST_DIRS} and args.host == "/host"
    contacts = container(spec, "contacts")
    assert not contacts.get("securityContext", {}).get("privileged")
    assert host_mounts(spec, contacts) == {f"/host{os.path.dirname(CONTACTS_FILE)}": os.path.dirname(CONTACTS_FILE)}
    assert all(m["mountPath"].startswith("/host/") for m in contacts["volumeMounts"])

    # The daemon the installer sets up: settings and flags `cs-p2p serve` accepts, node-local
    # addresses, the store and socket where the installer's mounts put them.
    cfg, files = daemon_config(docs, args, tmp_path)
    assert cfg.peer_listen == f"[{NODE_IP}]:5001" and cfg.dht_listen == f"[{NODE_IP}]:5002"
    assert cfg.metrics_listen == f"[{NODE_IP}]:5003" and cfg.mirror_registry
    assert peer_advertised(cfg) == f"{NODE_IP}:5001"
    assert cfg.root.startswith("/var/lib/") and os.path.dirname(cfg.socket) == "/run/cs-p2p"
    assert args.containerd_root.startswith("/var/lib/")

    # Bootstrap: the host reads contacts the pod resolves from the headless Service's name.
    assert cfg.bootstrap_file == CONTACTS_FILE and not cfg.bootstrap
    kept = _parser().parse_args(contacts["command"][1:])
    assert kept.command == "host-contacts" and kept.every > 0 and kept.host == "/host"
    assert kept.bootstrap_name == args.bootstrap_name
    boot = one(docs, "Service", "cs-p2p-bootstrap")
    assert boot["spec"]["clusterIP"] == "None" and boot["spec"]["publishNotReadyAddresses"] is True
    assert boot["spec"]["ports"][0]["port"] == int(cfg.dht_listen.rsplit(":", 1)[1])
    assert boot["spec"]["ports"][0]["protocol"] == "UDP"
    assert args.bootstrap_name == [f"cs-p2p-bootstrap.{boot['metadata']['namespace']}.svc.cluster.local:"
                                   f"{boot['spec']['ports'][0]['port']}"]

    # Readiness is the host's cs-p2p serving its metrics; the metrics Service selects these pods.
    ready = contacts["readinessProbe"]["httpGet"]
    assert ready["path"] == "/metrics" and str(ready["port"]) == cfg.metrics_listen.rsplit(":", 1)[1]
    labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    metrics = one(docs, "Service", "cs-p2p-metrics")
    assert metrics["spec"]["ports"][0]["port"] == int(cfg.metrics_listen.rsplit(":", 1)[1])
    for svc in (boot, metrics):
        assert svc["spec"]["selector"].items() <= labels.items()

    # Membership: every file the daemon is told to read is copied from a rendered Secret to
    # /etc/cs-p2p, except each node's own key and certificate, which the node has under pki/.
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    secret_volume = next(v for v in spec["volumes"]
                         if v["name"] == next(m["name"] for m in init["volumeMounts"] if m["mountPath"] in args.file))
    secret = secrets[secret_volume["secret"]["secretName"]]
    named = [p for p in files.values() if p]
    assert named, "no membership: peers would not authenticate"
    for path in named:
        if path.startswith("/etc/cs-p2p/pki/"):
            assert overlay == "key-pair"
        else:
            assert os.path.dirname(path) == "/etc/cs-p2p" and os.path.basename(path) in secret["data"]
    assert all(d["metadata"].get("namespace") == "kube-system" for d in docs)


def test_the_installer_puts_the_rendered_settings_on_a_host(tmp_path):
    """`cs-p2p host-install` with the rendered command, on a scratch host root (systemctl a
    no-op): the unit runs the daemon with the node's flags, containerd is wired to the socket,
    the mirrored registries get a hosts.toml, the Secret's token is installed."""
    docs = render("overlays/token")
    args, init = install_args(docs)
    argv = expand(init["command"][1:], pod_env(docs, init))
    source = tmp_path / "image"
    (source / os.path.dirname(BUILD_FILE)).mkdir(parents=True)
    (source / BUILD_FILE).write_text("0.1.0-test\n")
    config = tmp_path / "config.toml"
    config.write_text(one(docs, "ConfigMap")["data"][os.path.basename(args.config)])
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "cluster-token").write_text("a-token-for-the-test-cluster-0123456789\n")
    host = tmp_path / "host"
    replace = {"--host=/host": f"--host={host}", f"--config={args.config}": f"--config={config}",
               f"--file={args.file[0]}": f"--file={secrets}"}
    argv = [replace.get(a, a) for a in argv] + [f"--source={source}", "--systemctl=true", "--wait-seconds=0"]
    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", *argv], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    unit = (host / "etc/systemd/system/cs-p2p.service").read_text()
    assert f"--peer-listen=[{NODE_IP}]:5001" in unit and "--cluster-token-file=/etc/cs-p2p/cluster-token" in unit
    drop_in = (host / "etc/containerd/conf.d/cs-p2p.toml").read_text()
    assert 'address = "/run/cs-p2p/content.sock"' in drop_in
    assert (host / "etc/containerd/certs.d/registry.internal/hosts.toml").exists()
    assert (host / "etc/cs-p2p/cluster-token").read_text().startswith("a-token")
    assert os.readlink(host / "opt/cs-p2p/current") == "0.1.0-test"


def test_the_uninstall_renders_an_uninstaller_with_the_same_host_access():
    docs = render("uninstall")
    spec = pod_spec(docs)
    init = container(spec, "uninstall")
    args = _parser().parse_args(init["command"][1:])
    assert args.command == "host-uninstall" and args.host == "/host" and not args.purge
    assert spec["hostPID"] is True and init["securityContext"] == {"privileged": True}
    assert set(host_mounts(spec, init).items()) <= {(f"/host{d}", d) for d in INSTALL_HOST_DIRS}
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == \
        {c["image"] for c in pod_spec(render("overlays/token"))["containers"]}
