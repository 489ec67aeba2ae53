#!/bin/sh
# Completes a Debian root file system (python3 installed) into cs-p2p's image: the package and
# its dependencies under /usr/lib/cs-p2p/python, the `cs-p2p` command, and the build's name,
# which the installer uses to tell one build from the next.  Used by the Containerfile (inside
# the image: ROOT=/) and by hack/build-image (from outside, with the build machine's Python 3.11).
#   finish-rootfs.sh ROOT PIP-SPEC...   (PIP-SPEC: a wheel, or the source tree)
set -eu
root="$1"; shift
PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check --no-compile --target "$root/usr/lib/cs-p2p/python" "$@"
mkdir -p "$root/usr/local/bin"
cat > "$root/usr/local/bin/cs-p2p" <<'LAUNCH'
#!/bin/sh
export PYTHONPATH=/usr/lib/cs-p2p/python
exec /usr/bin/python3 -m cs_p2p.cli "$@"
LAUNCH
chmod 0755 "$root/usr/local/bin/cs-p2p"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$root/usr/lib/cs-p2p/python/cs_p2p/__init__.py")
build=$(cd "$root/usr/lib/cs-p2p/python" && find . -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum \
        | sha256sum | cut -c1-12)
echo "$version-$build" > "$root/usr/lib/cs-p2p/BUILD"
echo "cs-p2p $version-$build"
