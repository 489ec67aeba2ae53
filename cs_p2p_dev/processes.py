"""Real processes for a local cluster: registry, containerd, cs-p2p.

Used by the tests' fixtures, the demo and the benchmarks, so that all three exercise the
same wiring an operator would: containerd with the builtin content plugin disabled and
cs-p2p registered as a content proxy plugin.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from cs_p2p.addresses import dual_stack_socket
from cs_p2p.containerd_config import config_version_of, containerd_config
from cs_p2p.install.host import socket_answers
from .releases import Release
from .releases import release as default_release


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 and ::1 alike (tests bind either), and never the same
    twice in one process: ports asked for one after another (a node's peer, DHT and mirror)
    could come back equal, and the node then failed to start with "address already in use"."""
    while True:
        try:
            s = dual_stack_socket(socket.SOCK_STREAM, 0)
        except OSError:  # no IPv6 here
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
        with s:
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _socket_ready(path: str) -> bool:
    return os.path.exists(path) and socket_answers(path)


@dataclass
class Proc:
    """A child process with its output in a log file; stopped by `stop()` whatever happens."""

    name: str
    argv: list[str]
    log_path: str
    env: dict[str, str] | None = None
    netns: str | None = None  # run inside this network namespace (the cluster benchmark)
    popen: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> "Proc":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(
            in_netns(self.netns, self.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_alive(self) -> bool:
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}; log:\n{self.log_tail()}")
        return True

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the process can tell."""
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait()

    def stop(self, timeout: float = 15) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


class Registry:
    """Debian's docker-registry (distribution v2) on 127.0.0.1 with its own storage."""

    def __init__(self, workdir: str, port: int | None = None, host: str = "127.0.0.1",
                 netns: str | None = None, tls: tuple[str, str] | None = None,
                 users: dict[str, str] | None = None) -> None:
        """`users`: name -> password; pulls and pushes then need one of them (Basic auth)."""
        self.dir = workdir
        self.tls = tls  # (certificate, key) files: serve https
        self.port = port or free_port()
        self.addr = f"{host}:{self.port}"
        os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
        auth = ""
        if users:
            htpasswd = os.path.join(workdir, "htpasswd")
            with open(htpasswd, "w") as f:
                for user, password in users.items():
                    f.write(subprocess.run(["htpasswd", "-nbB", user, password], check=True, capture_output=True,
                                           text=True).stdout.strip() + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: cs-p2p-test\n    path: {htpasswd}\n"
        self.config = os.path.join(workdir, "config.yml")
        with open(self.config, "w") as f:
            f.write(
                "version: 0.1\n"
                "log:\n  level: info\n  accesslog:\n    disabled: false\n"
                f"storage:\n  filesystem:\n    rootdirectory: {workdir}/data\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.addr}\n"
                + (f"  tls:\n    certificate: {tls[0]}\n    key: {tls[1]}\n" if tls else "")
                + auth
            )
        self.proc = Proc("registry", [shutil.which("docker-registry") or "docker-registry", "serve", self.config],
                         os.path.join(workdir, "registry.log"), netns=netns)

    def _ready(self) -> bool:
        self.proc.check_alive()
        try:
            if self.tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                url, kw = f"https://{self.addr}/v2/", {"context": ctx}
            else:
                url, kw = f"http://{self.addr}/v2/", {}
            with urllib.request.urlopen(url, timeout=1, **kw) as r:
                return r.status == 200
        except urllib.error.HTTPError as exc:
            return exc.code == 401  # answering, and asking for credentials
        except OSError:
            return False

    def start(self) -> "Registry":
        self.proc.start()
        wait_for(self._ready, 30, "registry to answer /v2/")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def blob_bytes_served(self) -> dict[str, int]:
        """Bytes of each blob the registry sent to pulling clients (containerd, or a node's
        mirror on its behalf; not skopeo pushing test images), from its access log."""
        served: dict[str, int] = {}
        pattern = re.compile(r'"GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d+) (\d+) "[^"]*" "(?!skopeo)')
        with open(self.proc.log_path, errors="replace") as f:
            for line in f:
                m = pattern.search(line)
                if m and m.group(2) in ("200", "206"):
                    served[m.group(1)] = served.get(m.group(1), 0) + int(m.group(3))
        return served


class CsP2P:
    """One cs-p2p daemon (`python -m cs_p2p.cli serve`) with its own root and socket."""

    def __init__(self, workdir: str, extra_args: list[str] | None = None, netns: str | None = None) -> None:
        self.dir = workdir
        self.netns = netns
        self.root = os.path.join(workdir, "root")
        self.socket = os.path.join(workdir, "cs.sock")
        self.extra_args = extra_args or []
        os.makedirs(workdir, exist_ok=True)
        self.proc = self._new_proc()

    def _new_proc(self) -> Proc:
        argv = [sys.executable, "-m", "cs_p2p.cli", "serve", "--root", self.root, "--socket", self.socket,
                *self.extra_args]
        return Proc("cs-p2p", argv, os.path.join(self.dir, "cs-p2p.log"), netns=self.netns)

    def start(self) -> "CsP2P":
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = self._new_proc().start()
        wait_for(lambda: self.proc.check_alive() and _socket_ready(self.socket), 30, "cs-p2p socket")
        return self

    def kill(self) -> None:
        self.proc.kill()

    def stop(self) -> int | None:
        return self.proc.stop()

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", digest.split(":", 1)[1])

    def blob_digests(self) -> set[str]:
        d = os.path.join(self.root, "blobs", "sha256")
        return {"sha256:" + n for n in os.listdir(d)} if os.path.isdir(d) else set()

    def cached_digests(self) -> set[str]:
        """Blobs containerd's GC deleted that the daemon keeps in its cache."""
        d = os.path.join(self.root, "cache", "sha256")
        return {"sha256:" + n for n in os.listdir(d)} if os.path.isdir(d) else set()

    def applied_layers(self) -> list[dict]:
        """The daemon's "layer applied" log records (containerd 2.x: cs-p2p applies layers)."""
        with open(self.proc.log_path) as f:
            records = [json.loads(line) for line in f if line.startswith("{")]
        return [r for r in records if r.get("msg") == "layer applied"]

    def ingest_dirs(self) -> list[str]:
        d = os.path.join(self.root, "ingest")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []


class Containerd:
    """A containerd with its own root/state/socket; content from `content_socket` or builtin.

    `content_socket=None` runs containerd's builtin content store: the benchmarks' baseline.
    With cs-p2p as the content store on containerd 2.x, cs-p2p also applies the layers
    (`applier=False` keeps containerd's own applier). With `hosts_dir`, registries are
    configured by hosts.toml files there (the mirror), for the CRI plugin and for `pull()`.
    The release is `releases.release()` unless given.  `drop_in=True` wires cs-p2p as an
    operator would: the main config imports `conf.d/*.toml`, where `cs-p2p containerd-config`'s
    fragment goes; on 2.3+ the main config is first migrated to 2.3's own format (`version = 4`).
    """

    def __init__(self, workdir: str, content_socket: str | None, registry_hosts: list[str] | None = None,
                 auto_gc: bool = True, netns: str | None = None, hosts_dir: str | None = None,
                 release: Release | None = None, applier: bool = True,
                 max_concurrent_unpacks: int | None = None, drop_in: bool = False) -> None:
        self.dir = workdir
        self.netns = netns
        self.release = release or default_release()
        self.socket = os.path.join(workdir, "containerd.sock")
        self.root = os.path.join(workdir, "root")
        self.state = os.path.join(workdir, "state")
        os.makedirs(workdir, exist_ok=True)
        if hosts_dir is None and registry_hosts and self.release.v2:
            # 2.x: plain-HTTP registries by hosts.toml (the old mirrors table forces CRI's local pull)
            hosts_dir = os.path.join(workdir, "certs.d")
            for host in registry_hosts:
                os.makedirs(os.path.join(hosts_dir, host), exist_ok=True)
                with open(os.path.join(hosts_dir, host, "hosts.toml"), "w") as f:
                    f.write(f'server = "http://{host}"\n')
        self.hosts_dir = hosts_dir
        self.cs_applies = bool(content_socket) and applier and self.release.applies_layers
        self.config = os.path.join(workdir, "config.toml")
        conf_d = os.path.join(workdir, "conf.d")
        with open(self.config, "w") as f:
            f.write(self._config_toml(None if drop_in else content_socket, registry_hosts or [], auto_gc,
                                      max_concurrent_unpacks, conf_d if drop_in else None))
        if drop_in and content_socket:
            self._write_drop_in(conf_d, content_socket, max_concurrent_unpacks)
        self.proc = Proc("containerd", [self.release.bin("containerd"), "--config", self.config],
                         os.path.join(workdir, "containerd.log"), env=self.release.env(), netns=netns)

    def _write_drop_in(self, conf_d: str, content_socket: str, max_concurrent_unpacks: int | None) -> None:
        if self.release.v2 and self.release.series not in ("2.0", "2.1", "2.2"):
            migrated = subprocess.run([self.release.bin("containerd"), "--config", self.config, "config", "migrate"],
                                      check=True, capture_output=True, text=True, timeout=60).stdout
            with open(self.config, "w") as f:
                f.write(migrated)
        os.makedirs(conf_d, exist_ok=True)
        with open(os.path.join(conf_d, "cs-p2p.toml"), "w") as f:
            f.write(containerd_config(content_socket, self.release.series, self.hosts_dir if self.release.v2 else None,
                                      max_concurrent_unpacks, applier=self.cs_applies,
                                      root_version=config_version_of(self.config)))

    def _config_toml(self, content_socket: str | None, registry_hosts: list[str], auto_gc: bool,
                     max_concurrent_unpacks: int | None, imports: str | None = None) -> str:
        v2 = self.release.v2
        lines = [f'root = "{self.root}"', f'state = "{self.state}"']
        if imports:
            lines.append(f'imports = ["{imports}/*.toml"]')
        if content_socket:
            lines.append(containerd_config(content_socket, self.release.series, self.hosts_dir if v2 else None,
                                           max_concurrent_unpacks, applier=self.cs_applies))
        else:
            lines.insert(0, f"version = {3 if v2 else 2}")
            if max_concurrent_unpacks and v2:
                lines += ['[plugins."io.containerd.transfer.v1.local"]',
                          f"  max_concurrent_unpacks = {max_concurrent_unpacks}"]
        lines += [
            "[grpc]", f'  address = "{self.socket}"',
            "[ttrpc]", f'  address = "{self.socket}.ttrpc"',
            "[debug]", '  level = "info"',
        ]
        runtime = '"io.containerd.cri.v1.runtime"' if v2 else '"io.containerd.grpc.v1.cri"'
        lines += [
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  stream_server_port = "0"',
        ]
        if v2:
            lines += [f"[plugins.{runtime}]"]
        lines += [
            '  disable_cgroup = true',
            '  disable_apparmor = true',
            '  restrict_oom_score_adj = true',
            f"[plugins.{runtime}.cni]",
            f'  bin_dirs = ["{self.dir}/cni-bin"]' if v2 else f'  bin_dir = "{self.dir}/cni-bin"',
            f'  conf_dir = "{self.dir}/cni-conf"',
        ]
        if not auto_gc:
            # Benchmarks ingest unreferenced blobs; only an explicit `--sync` delete collects them.
            lines += ['[plugins."io.containerd.gc.v1.scheduler"]', "  mutation_threshold = 1000000000",
                      "  deletion_threshold = 1000000000", "  startup_delay = \"0s\""]
        if v2:
            if self.hosts_dir and not content_socket:
                lines += ['[plugins."io.containerd.cri.v1.images".registry]', f'  config_path = "{self.hosts_dir}"']
        elif self.hosts_dir:
            lines += ['[plugins."io.containerd.grpc.v1.cri".registry]', f'  config_path = "{self.hosts_dir}"']
        else:
            for host in registry_hosts:
                lines += [
                    f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{host}"]',
                    f'  endpoint = ["http://{host}"]',
                ]
        return "\n".join(lines) + "\n"

    def start(self) -> "Containerd":
        self.proc.start()
        wait_for(lambda: self.proc.check_alive() and _socket_ready(self.socket), 60, "containerd socket")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def pull_args(self, ref: str) -> list[str]:
        """`ctr` arguments that pull `ref` the way this containerd is configured."""
        hosts = ["--hosts-dir", self.hosts_dir] if self.hosts_dir else []
        return ["image", "pull", "--plain-http", *hosts, ref]

    def ctr_argv(self, *args: str, namespace: str = "default") -> list[str]:
        """This release's `ctr` talking to this containerd."""
        return in_netns(self.netns, [self.release.bin("ctr"), "--address", self.socket, "--namespace", namespace,
                                     *args])

    def ctr(self, *args: str, check: bool = True, input: bytes | None = None, timeout: float = 300,
            namespace: str = "default") -> subprocess.CompletedProcess:
        argv = self.ctr_argv(*args, namespace=namespace)
        res = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res
