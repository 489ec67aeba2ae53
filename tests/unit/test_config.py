"""Configuration: TOML keys are flag names, flags win, mistakes are errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cs_p2p.config import Config, ConfigError, load_config


def test_toml_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('root = "/data/cs"\nsocket = "/run/a.sock"\nlog-level = "debug"\nsocket-mode = "0600"\n')
    cfg = load_config(str(f), {"socket": "/run/b.sock", "root": None, "apply_workers": 3})
    assert cfg == Config(root="/data/cs", socket="/run/b.sock", log_level="debug", socket_mode=0o600,
                         apply_workers=3)


@pytest.mark.parametrize("body", ['bogus = 1\n', 'root = 5\n', 'log-level = "loud"\n', "root = \n",
                                  'node-key-file = "/k"\n',  # key-pair membership needs all three files
                                  'cluster-token-file = "/t"\nnode-key-file = "/k"\nnode-cert-file = "/c"\n'
                                  'cluster-ca-file = "/ca"\n',  # and is not mixed with a token
                                  'socket-group = "no such group here"\n', 'ingest-max-bytes = 0\n', 'apply-workers = -1\n'])
def test_bad_config_is_an_error(tmp_path, body):
    f = tmp_path / "c.toml"
    f.write_text(body)
    with pytest.raises(ConfigError):
        load_config(str(f), {})


def test_cli_reports_bad_config_with_exit_2(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("bogus = 1\n")
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "serve", "--config", str(f)], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown setting 'bogus'" in res.stderr


def test_containerd_config_disables_builtin_and_registers_proxy():
    import tomllib

    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--socket", "/run/x.sock",
                          "--containerd-config", "/nonexistent/config.toml"],
                         capture_output=True, text=True, check=True).stdout
    cfg = tomllib.loads(out)
    assert cfg["version"] == 2
    assert cfg["disabled_plugins"] == ["io.containerd.content.v1.content"]
    assert cfg["proxy_plugins"]["cs-p2p"] == {"type": "content", "address": "/run/x.sock"}
    with open("packaging/containerd/config.toml", "rb") as f:
        shipped = tomllib.load(f)
    assert shipped["proxy_plugins"]["cs-p2p"]["type"] == "content"
    assert shipped["disabled_plugins"] == cfg["disabled_plugins"]


def fragment(*args: str, main: str = "/nonexistent/config.toml") -> dict:
    """`cs-p2p containerd-config` for a node whose own config.toml is `main`, parsed."""
    import tomllib

    return tomllib.loads(subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--socket",
                                         "/run/x.sock", "--containerd-config", main, *args],
                                        capture_output=True, text=True, check=True).stdout)


def test_containerd_config_for_2x_makes_cs_p2p_the_applier_of_every_pull_path():
    import tomllib

    cfg = fragment("--containerd-version", "2", "--max-concurrent-unpacks", "3")
    assert cfg["version"] == 3
    assert cfg["disabled_plugins"] == ["io.containerd.content.v1.content"]
    assert cfg["proxy_plugins"] == {"cs-p2p": {"type": "content", "address": "/run/x.sock"},
                                    "cs-p2p-diff": {"type": "diff", "address": "/run/x.sock"}}
    assert cfg["plugins"]["io.containerd.service.v1.diff-service"]["default"] == ["cs-p2p-diff", "walking"]
    transfer = cfg["plugins"]["io.containerd.transfer.v1.local"]
    assert transfer["max_concurrent_unpacks"] == 3
    assert transfer["unpack_config"] == [{"platform": transfer["unpack_config"][0]["platform"],
                                          "snapshotter": "overlayfs", "differ": "cs-p2p-diff"}]
    for old in ("1.6", "1.7"):  # their proxy plugins cannot apply layers: content only
        cfg = fragment("--containerd-version", old)
        assert cfg["version"] == 2 and set(cfg["proxy_plugins"]) == {"cs-p2p"} and "plugins" not in cfg
    with open("packaging/containerd/config.toml", "rb") as f:
        shipped = tomllib.load(f)
    assert shipped["version"] == 3 and shipped["proxy_plugins"]["cs-p2p-diff"]["type"] == "diff"
    with open("packaging/containerd/config-1.6-1.7.toml", "rb") as f:
        assert set(tomllib.load(f)["proxy_plugins"]) == {"cs-p2p"}


def test_the_fragment_follows_each_release_and_the_nodes_own_config_version(tmp_path):
    main = tmp_path / "config.toml"
    # 2.0 and 2.1 know no parallel unpack: the setting is left out, the applier stays
    for old in ("2.0", "2.1"):
        cfg = fragment("--containerd-version", old)
        assert "max_concurrent_unpacks" not in cfg["plugins"].get("io.containerd.transfer.v1.local", {})
        assert cfg["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"][0]["differ"] == "cs-p2p-diff"
    assert fragment("--containerd-version", "2.2")["plugins"]["io.containerd.transfer.v1.local"][
        "max_concurrent_unpacks"] >= 2
    # a drop-in newer than the main config is refused by containerd: follow the main config
    for version, release, want in ((4, "2.3", 4), (3, "2.3", 3), (2, "2.3", 2), (3, "2.0", 3)):
        main.write_text(f"version = {version}\n")
        cfg = fragment("--containerd-version", release, "--mirror-registry", "http://r.example:5000",
                       "--hosts-dir", str(tmp_path / "certs.d"), main=str(main))
        assert cfg["version"] == want
        # version 2 names the CRI plugin's registry settings the old way (containerd migrates them)
        cri = "io.containerd.grpc.v1.cri" if want == 2 else "io.containerd.cri.v1.images"
        assert cfg["plugins"][cri]["registry"]["config_path"] == str(tmp_path / "certs.d")
    main.write_text("# no version: containerd takes a drop-in of any version\n")
    assert fragment("--containerd-version", "2.3", main=str(main))["version"] == 3
    main.write_text("version = 4\n")  # 2.0 reads no version 4 config: say so
    bad = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--containerd-version", "2.0",
                          "--containerd-config", str(main)], capture_output=True, text=True)
    assert bad.returncode == 2 and "config migrate" in bad.stderr


def test_containerd_release_is_read_from_its_version(tmp_path):
    from cs_p2p.containerd_config import detect_release

    for printed, want in (("containerd github.com/containerd/containerd/v2 v2.3.4 abc", "2.3"),
                          ("containerd github.com/containerd/containerd/v2 v2.0.11 abc", "2.0"),
                          ("containerd github.com/containerd/containerd/v3 v3.0.0 abc", "2"),
                          ("containerd containerd.io 1.7.34 abc", "1.7"), ("containerd 1.6.20~ds1 1.6.20~ds1", "1.6")):
        fake = tmp_path / "containerd"
        fake.write_text(f"#!/bin/sh\necho '{printed}'\n")
        fake.chmod(0o755)
        assert detect_release(str(fake)) == want
    fake.write_text("#!/bin/sh\necho 'containerd v1.5.0'\n")
    with pytest.raises(ValueError):
        detect_release(str(fake))
    bad = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--containerd-version", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_mirror_section_and_flags(tmp_path):
    from cs_p2p.config import MirrorRegistry

    path = tmp_path / "c.toml"
    path.write_text('[mirror]\nlisten = "127.0.0.1:6000"\ntimeout-ms = 500\n'
                    'registries = ["http://reg.local:5000", {url = "https://ghcr.io", timeout-ms = 2000}]\n')
    cfg = load_config(str(path), {})
    assert cfg.mirror_listen == "127.0.0.1:6000"
    assert cfg.mirror_registry == [MirrorRegistry("reg.local:5000", True, 0.5), MirrorRegistry("ghcr.io", False, 2.0)]
    path.write_text('[mirror]\nregistries = [{url = "https://reg.local", ca-file = "/etc/reg-ca.crt"}]\n')
    assert load_config(str(path), {}).mirror_registry[0].ca_file == "/etc/reg-ca.crt"
    cfg = load_config(None, {"mirror_registry": ["docker.io"], "mirror_timeout_ms": None})
    assert cfg.mirror_registry[0].base_url == "https://registry-1.docker.io"
    for bad in ('[mirror]\nregistries = ["ftp://x"]\n', '[mirror]\nport = 1\n',
                '[mirror]\nregistries = [{url = "http://x", timeout-ms = -1}]\n',
                '[mirror]\nregistries = [{url = "http://x", ca-file = "/ca.crt"}]\n'):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(str(path), {})


def test_containerd_config_writes_hosts_toml_for_the_mirror(tmp_path):
    import tomllib

    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--mirror-registry",
                          "http://reg.local:5000", "--mirror-listen", "127.0.0.1:6000", "--hosts-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    assert tomllib.loads(out)["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == str(tmp_path)
    hosts = tomllib.loads((tmp_path / "reg.local:5000" / "hosts.toml").read_text())
    assert hosts == {"server": "http://reg.local:5000",
                     "host": {"http://127.0.0.1:6000": {"capabilities": ["pull", "resolve"]}}}
    with open("packaging/containerd/certs.d/registry.internal:5000/hosts.toml", "rb") as f:
        shipped = tomllib.load(f)
    assert shipped["host"]["http://127.0.0.1:5080"]["capabilities"] == ["pull", "resolve"]
    bad = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "containerd-config", "--mirror-registry", "ftp://x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "mirror registry" in bad.stderr


def test_a_mirror_listen_address_without_registries_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="no mirror-registry"):
        load_config(None, {"mirror_listen": "127.0.0.1:6000"})
    assert load_config(None, {"mirror_listen": "127.0.0.1:6000", "mirror_registry": ["http://r:5000"]}).mirror_listen


def test_registry_credentials_come_from_a_file_that_is_checked_at_start_and_never_echoed(tmp_path):
    cred = tmp_path / "registry.cred"
    cred.write_text("puller:pa:ss\n")
    toml = tmp_path / "c.toml"
    toml.write_text(f'[mirror]\nregistries = [{{url = "https://r.example", credentials-file = "{cred}"}}]\n')
    reg = load_config(str(toml), {}).mirror_registry[0]
    assert reg.credentials_file == str(cred) and "pa:ss" not in repr(reg)
    from cs_p2p.config import read_credentials
    assert read_credentials(str(cred)) == ("puller", "pa:ss")  # the password may hold ':'
    cred.write_text("no-colon-secret\n")
    with pytest.raises(ConfigError, match="USER:PASSWORD") as bad:
        load_config(str(toml), {})
    assert "no-colon-secret" not in str(bad.value)
    cred.unlink()
    with pytest.raises(ConfigError, match="credentials-file"):
        load_config(str(toml), {})


def test_bootstrap_contacts_come_from_the_settings_and_the_file_as_it_is_now(tmp_path):
    """The installer rewrites bootstrap-file as nodes come and go; the daemon reads it at each
    join attempt (a missing file or a line that is no address adds nothing)."""
    from cs_p2p.config import bootstrap_contacts

    path = tmp_path / "bootstrap"
    cfg = load_config(None, {"bootstrap": ["10.0.0.1:5002"], "bootstrap_file": str(path)})
    assert bootstrap_contacts(cfg) == ["10.0.0.1:5002"]
    path.write_text("10.0.0.2:5002\nnot-an-address\n[fd00::3]:5002\n")
    assert bootstrap_contacts(cfg) == ["10.0.0.1:5002", "10.0.0.2:5002", "[fd00::3]:5002"]
    path.write_text("10.0.0.4:5002\n")
    assert bootstrap_contacts(cfg) == ["10.0.0.1:5002", "10.0.0.4:5002"]


@pytest.mark.parametrize("listen", [{"peer_listen": "10.0.0.5:5001"},
                                    {"peer_listen": "127.0.0.1:5001", "dht_listen": "[fd00::5]:5002"},
                                    {"peer_listen": "node-a.cluster:5001"}])
def test_no_membership_beyond_loopback_is_refused_unless_asked_for(listen, tmp_path):
    with pytest.raises(ConfigError, match="cluster-token-file.*node-key-file.*insecure-open-membership"):
        load_config(None, listen)
    assert load_config(None, {**listen, "insecure_open_membership": True}).insecure_open_membership
    token = tmp_path / "token"
    token.write_text("a-token-for-the-test-cluster-0123456789\n")
    load_config(None, {**listen, "cluster_token_file": str(token)})


@pytest.mark.parametrize("addr", ["127.0.0.1:5001", "127.0.0.2:5001", "localhost:5001", "[::1]:5001"])
def test_no_membership_on_loopback_starts_as_before(addr):
    assert load_config(None, {"peer_listen": addr}).peer_listen == addr
