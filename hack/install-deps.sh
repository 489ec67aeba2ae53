#!/usr/bin/env bash
# Installs everything cs-p2p's demo, tests and benchmarks need on a fresh Debian machine:
# containerd + runc, the distribution registry, skopeo, containerd's .proto files (for the
# wire-compatibility test), iproute2 (network namespaces for benchmarks), busybox-static (a
# binary for the containers the tests run), kubectl (renders the Kubernetes manifests),
# htpasswd (a registry with basic auth for the private-registry tests), mmdebstrap (the product
# image's Debian root filesystem, built offline from Debian's packages), and the package
# itself with its dev extras.  Idempotent; needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

PKGS=(containerd runc docker-registry skopeo golang-github-containerd-containerd-dev iproute2 busybox-static
      apache2-utils mmdebstrap util-linux)
# kubectl renders the Kubernetes manifests (`kubectl kustomize`, offline); any kubectl will do.
command -v kubectl >/dev/null || PKGS+=(kubernetes-client)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: apt packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's packages start their services where systemd runs; the tests start their own
# instances on private sockets and ports, so the system ones are not needed.

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import cs_p2p, aiohttp, grpc_tools, pytest_asyncio, pytest_timeout, zstandard, prometheus_client, msgpack' 2>/dev/null; then
  echo "install-deps: pip install -e .[dev]"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
fi
echo "install-deps: ok ($(containerd --version | awk '{print $3}'), $("$PY" --version))"
