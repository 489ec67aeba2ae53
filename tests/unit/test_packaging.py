"""What the package declares matches what it is: every dependency is imported, and every
command explains itself in its --help."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"grpcio": "grpc", "protobuf": "google", "prometheus-client": "prometheus_client"}  # distribution -> the module it provides


def imported_modules() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "cs_p2p").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_declared_dependency_is_imported():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=!~ \[]", d, maxsplit=1)[0] for d in deps]
    unused = [n for n in names if IMPORT_NAMES.get(n, n) not in imported_modules()]
    assert unused == []


def subcommands() -> list[list[str]]:
    out = subprocess.run([sys.executable, "-m", "cs_p2p.cli", "--help"], capture_output=True, text=True).stdout
    commands = re.search(r"\{([a-z,-]+)\}", out).group(1).split(",")
    return [[c] for c in commands] + [["ca", "init"], ["ca", "issue"]]


@pytest.mark.parametrize("command", subcommands(), ids=" ".join)
def test_every_command_explains_itself(command):
    res = subprocess.run([sys.executable, "-m", "cs_p2p.cli", *command, "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    usage, description, options = parse_help(res.stdout)
    assert usage.startswith("usage: cs-p2p " + " ".join(command))
    assert len(description.split()) >= 8, "no description of what the command does"
    assert options and all(text for _, text in options), [flag for flag, text in options if not text]


def parse_help(out: str) -> tuple[str, str, list[tuple[str, str]]]:
    """(usage, description, [(argument, its help)]) of argparse's --help output."""
    blocks = out.split("\n\n")
    usage, description = blocks[0], blocks[1] if not blocks[1].endswith(":") and ":\n" not in blocks[1] else ""
    entries: list[tuple[str, str]] = []
    for block in blocks[1:]:
        if not re.match(r"^(positional arguments|options):", block):
            continue
        for line in block.splitlines()[1:]:
            if re.match(r"^  \S", line):  # an argument, maybe with its help after two spaces or more
                flag, _, text = line.strip().partition("  ")
                entries.append((flag, text.strip()))
            elif entries and line.startswith(" " * 6):  # help on the next lines
                entries[-1] = (entries[-1][0], (entries[-1][1] + " " + line.strip()).strip())
    return usage, description, [(f, t) for f, t in entries if not f.startswith("{")]


def unit_sections(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = sections.setdefault(line, {})
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            current[key] = value
    return sections


def test_the_packaged_unit_and_the_installers_unit_start_and_stop_alike():
    """Installed by hand (packaging/systemd) or by the DaemonSet (`cs-p2p host-install`),
    cs-p2p comes up before containerd without needing it, and its restart (an upgrade)
    does not take containerd down with it (no Requires/BindsTo/RequiredBy)."""
    from cs_p2p.install.unit import render_unit

    packaged = unit_sections((ROOT / "packaging" / "systemd" / "cs-p2p.service").read_text())
    installed = unit_sections(render_unit(["--peer-listen=10.0.0.7:5001"]))
    for unit in (packaged, installed):
        assert unit["[Unit]"]["Before"] == "containerd.service"
        assert "containerd" not in unit["[Unit]"].get("After", "") + unit["[Unit]"].get("Requires", "")
        assert "RequiredBy" not in unit["[Install]"] and "BindsTo" not in unit["[Unit]"]
    assert packaged["[Unit]"] | {"Documentation": ""} == installed["[Unit]"] | {"Documentation": ""}
    assert packaged["[Install]"] == installed["[Install]"]
    host_only = {"RootDirectory", "MountAPIVFS", "BindPaths", "BindReadOnlyPaths", "ExecStart"}
    assert {k: v for k, v in packaged["[Service]"].items() if k not in host_only} == \
        {k: v for k, v in installed["[Service]"].items() if k not in host_only}


def test_the_package_installs_the_product_and_not_the_development_harness():
    """`pip install .` on a node: cs_p2p and its subpackages; cs_p2p_dev (clusters, images, the
    simulation) stays in the checkout."""
    from setuptools import find_packages

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "cs_p2p" in packages and "cs_p2p.install" in packages and "cs_p2p.dht" in packages
    assert not [p for p in packages if p.startswith("cs_p2p_dev") or p.startswith("tests")]
    assert (ROOT / "cs_p2p_dev" / "__init__.py").exists()
    # and the product imports nothing of it
    assert "cs_p2p_dev" not in imported_modules()


def test_the_installers_unit_starts_apply_workers_early_only_where_cs_p2p_applies_layers():
    """containerd 2.x hands layers to cs-p2p's applier: its workers start with the daemon. 1.6
    and 1.7 apply layers themselves: no idle workers there."""
    from cs_p2p.install.host import InstallOptions

    for release in ("1.6", "1.7"):
        assert InstallOptions("/", "c.toml", release, serve_args=["--peer-listen=10.0.0.7:5001"]).unit_args() == \
            ["--peer-listen=10.0.0.7:5001", "--no-apply-prestart"]
    for release in ("2.0", "2.3", "2"):
        assert "--no-apply-prestart" not in InstallOptions("/", "c.toml", release).unit_args()
