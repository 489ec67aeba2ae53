"""Test images built from scratch: OCI layouts of random layers, pushed with skopeo.

No image ever comes from the internet; each layer is a real tar (optionally gzip) holding
one file of random bytes, so containerd's unpacker and snapshotter do real work.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass

ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), platform.machine())

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_MEDIA_TYPES = {"gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD, "none": MT_LAYER_TAR}


@dataclass
class BuiltImage:
    layout: str
    tag: str
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    total_size: int  # manifest + config + layers, bytes

    @property
    def digests(self) -> list[str]:
        return [self.manifest_digest, self.config_digest, *self.layer_digests]

    def blob_bytes(self, digest: str) -> bytes:
        with open(os.path.join(self.layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as f:
            return f.read()


class _HashingWriter(io.RawIOBase):
    """A file that hashes what is written: layers are hashed in one pass, never held in memory."""

    def __init__(self, f) -> None:
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.f.write(b)
        self.h.update(b)
        self.n += len(b)
        return len(b)


def _put_blob(blobs: str, data: bytes) -> tuple[str, int]:
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)


def _write_layer(blobs: str, index: int, size: int, compress: bool) -> tuple[str, int, str]:
    """Write one layer; return (digest, size, diff_id)."""
    tmp = os.path.join(blobs, f".layer-{index}.tmp")
    with open(tmp, "wb") as raw:
        outer = _HashingWriter(raw)
        gz = gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=1, mtime=0) if compress else None
        inner = _HashingWriter(gz if gz else raw)
        with tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"layer{index}/data.bin")
            info.size = size
            info.mode = 0o644
            tar.addfile(info, _RandomReader(size))
        if gz:
            gz.close()
    digest = outer.h.hexdigest() if compress else inner.h.hexdigest()
    diff_id = "sha256:" + inner.h.hexdigest()
    os.rename(tmp, os.path.join(blobs, digest))
    return "sha256:" + digest, os.path.getsize(os.path.join(blobs, digest)), diff_id


class _RandomReader(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def _compress_tar(blobs: str, tar_path: str, compression: str) -> tuple[str, int, str]:
    """Compress a tar file into a layer blob; returns (digest, size, diff_id)."""
    tmp = os.path.join(blobs, ".layer.tmp")
    inner = hashlib.sha256()
    with open(tar_path, "rb") as src, open(tmp, "wb") as raw:
        outer = _HashingWriter(raw)
        if compression == "gzip":
            sink = gzip.GzipFile(fileobj=outer, mode="wb", compresslevel=1, mtime=0)
        elif compression == "zstd":
            import zstandard

            sink = zstandard.ZstdCompressor(level=3).stream_writer(outer, closefd=False)
        else:
            sink = outer
        while chunk := src.read(1 << 20):
            inner.update(chunk)
            sink.write(chunk)
        if sink is not outer:
            sink.close()
    digest = outer.h.hexdigest()
    os.rename(tmp, os.path.join(blobs, digest))
    return "sha256:" + digest, outer.n, "sha256:" + inner.hexdigest()


def build_image_from_tars(layout: str, tars: list[tuple[str, str]], tag: str = "v1",
                          diff_ids: list[str] | None = None, cmd: list[str] | None = None) -> BuiltImage:
    """An OCI layout with one image whose layers are the given tar files, each compressed
    with "gzip", "zstd" or "none". `diff_ids` replaces the true ones (a lying config)."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers, true_ids = [], []
    for path, compression in tars:
        digest, size, diff_id = _compress_tar(blobs, path, compression)
        layers.append({"mediaType": LAYER_MEDIA_TYPES[compression], "digest": digest, "size": size})
        true_ids.append(diff_id)
    return _write_image(layout, layers, diff_ids or true_ids, tag, ARCH, cmd or ["/bin/true"])


def build_image(layout: str, layer_sizes: list[int], tag: str = "v1", compress: bool = True,
                arch: str = ARCH) -> BuiltImage:
    """An OCI layout at `layout` with one image of random layers of the given sizes."""
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers, diff_ids = [], []
    for i, size in enumerate(layer_sizes):
        digest, blob_size, diff_id = _write_layer(blobs, i, size, compress)
        layers.append({"mediaType": MT_LAYER_GZIP if compress else MT_LAYER_TAR, "digest": digest, "size": blob_size})
        diff_ids.append(diff_id)
    return _write_image(layout, layers, diff_ids, tag, arch, ["/bin/true"])


def _write_image(layout: str, layers: list[dict], diff_ids: list[str], tag: str, arch: str,
                 cmd: list[str]) -> BuiltImage:
    blobs = os.path.join(layout, "blobs", "sha256")
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_digest, config_size = _put_blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    manifest_digest, manifest_size = _put_blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MT_MANIFEST, "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    total = manifest_size + config_size + sum(layer["size"] for layer in layers)
    return BuiltImage(layout, tag, manifest_digest, config_digest, [layer["digest"] for layer in layers], total)


def build_multiarch_image(layout: str, layer_sizes: list[int], tag: str = "v1") -> tuple[BuiltImage, str]:
    """An OCI layout whose `tag` is an image index: this machine's platform (the returned
    image) and one other architecture.  Returns (native image, index digest)."""
    other_arch = "arm64" if ARCH != "arm64" else "amd64"
    other = build_image(layout, [4096], tag="other", arch=other_arch)
    native = build_image(layout, layer_sizes, tag=tag)
    blobs = os.path.join(layout, "blobs", "sha256")
    entries = []
    for img, arch in ((native, ARCH), (other, other_arch)):
        size = os.path.getsize(os.path.join(blobs, img.manifest_digest.split(":")[1]))
        entries.append({"mediaType": MT_MANIFEST, "digest": img.manifest_digest, "size": size,
                        "platform": {"architecture": arch, "os": "linux"}})
    index_digest, index_size = _put_blob(blobs, json.dumps(
        {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode())
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": MT_INDEX, "digest": index_digest, "size": index_size,
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    return native, index_digest


def push_image(image: BuiltImage, registry_addr: str, name: str, creds: str = "") -> str:
    """Push with skopeo over plain HTTP (an index with all its platforms); returns `addr/name:tag`.
    `creds`: USER:PASSWORD for a registry that wants them."""
    ref = f"{registry_addr}/{name}:{image.tag}"
    subprocess.run(
        ["skopeo", "copy", "--all", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
         *([f"--dest-creds={creds}"] if creds else []), f"oci:{image.layout}:{image.tag}", f"docker://{ref}"],
        check=True, capture_output=True, timeout=600,
    )
    return ref


def build_small_files_image(layout: str, files: int = 50_000, layers: int = 4, tag: str = "v1") -> BuiltImage:
    """An image of many small files (100 B - 4 KiB of hex text, so gzip has work to do),
    spread over `layers` gzip layers of 50 files per directory: the unpack cost per entry."""
    tars = []
    per_layer = -(-files // layers)
    for n in range(layers):
        path = os.path.join(layout, f"files-{n}.tar")
        os.makedirs(layout, exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(n * per_layer, min(files, (n + 1) * per_layer)):
                if i % 50 == 0:
                    d = tarfile.TarInfo(f"l{n}/d{i // 50}")
                    d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
                    tar.addfile(d)
                data = os.urandom(50 + i % 2000).hex().encode()
                info = tarfile.TarInfo(f"l{n}/d{i // 50}/f{i}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
                tar.addfile(info, io.BytesIO(data))
        tars.append((path, "gzip"))
    img = build_image_from_tars(layout, tars, tag)
    for path, _ in tars:
        os.unlink(path)
    return img
