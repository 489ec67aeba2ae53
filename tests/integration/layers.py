"""Layer tars with every kind of entry an applier must get right, and a precise description
of the trees applied snapshots hold, so that two appliers' results can be compared."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time

OLD = 1_600_000_000  # every explicit time in these layers is in 2020


class TarBuilder:
    """`add(name, kind, ...)` entries into a PAX tar file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644, uid: int = 0,
            gid: int = 0, linkname: str = "", dev: tuple[int, int] = (0, 0), xattrs: dict[str, bytes] | None = None,
            mtime: str | None = None, atime: str | None = None) -> "TarBuilder":
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.uid, ti.gid, ti.linkname = kind, mode, uid, gid, linkname
        ti.devmajor, ti.devminor = dev
        ti.mtime = OLD
        pax: dict[str, str] = {}
        for k, v in (xattrs or {}).items():
            pax["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
        if mtime:
            pax["mtime"] = mtime
        if atime:
            pax["atime"] = atime
        ti.pax_headers = pax
        ti.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
        self.tar.addfile(ti, io.BytesIO(data) if ti.size else None)
        return self

    def dir(self, name: str, mode: int = 0o755, **kw) -> "TarBuilder":
        return self.add(name.rstrip("/") + "/", tarfile.DIRTYPE, mode=mode, **kw)

    def close(self) -> str:
        self.tar.close()
        return self.path


def tricky_layers(workdir: str, busybox: str | None = "/bin/busybox") -> list[tuple[str, str]]:
    """Three layers (gzip, zstd, plain tar) covering whiteouts, opaque dirs, hard and soft
    links, devices, fifos, owners, setuid/setgid/sticky modes, xattrs, PAX times, long names,
    replaced entries, missing parents and a few thousand small files."""
    os.makedirs(workdir, exist_ok=True)
    base = TarBuilder(os.path.join(workdir, "base.tar"))
    for d, mode, owner in (("etc", 0o755, 0), ("bin", 0o755, 0), ("usr", 0o755, 0), ("usr/bin", 0o755, 0),
                           ("tmp", 0o1777, 0), ("home", 0o755, 0), ("home/user", 0o700, 1000), ("data", 0o755, 0),
                           ("dev", 0o755, 0), ("run", 0o755, 0), ("gone", 0o755, 0), ("opaque", 0o755, 0),
                           ("opaque/sub", 0o755, 0), ("dir-to-sym", 0o755, 0), ("lowerattr", 0o711, 7),
                           ("long", 0o755, 0)):
        base.dir(d, mode, uid=owner, gid=owner)
    base.add("etc/conf", data=b"base config\n")
    if busybox and os.path.exists(busybox):
        with open(busybox, "rb") as f:
            base.add("bin/busybox", data=f.read(), mode=0o755)
        base.add("bin/sh", tarfile.SYMTYPE, linkname="busybox")
    base.add("usr/bin/suid", data=b"#!/bin/sh\n", mode=0o4755)
    base.add("usr/bin/sgid", data=b"#!/bin/sh\n", mode=0o2755, gid=50)
    base.add("home/user/.profile", data=b"export A=1\n", mode=0o600, uid=1000, gid=1000)
    base.add("data/link-target", data=b"shared inode\n", mode=0o640, uid=3, gid=4)
    base.add("data/hard", tarfile.LNKTYPE, linkname="data/link-target")
    base.add("data/sym-rel", tarfile.SYMTYPE, linkname="link-target")
    base.add("data/sym-abs", tarfile.SYMTYPE, linkname="/etc/conf")
    base.add("data/sym-dangling", tarfile.SYMTYPE, linkname="../nowhere/at/all")
    base.add("data/xattr-file", data=b"x", xattrs={"user.comment": b"hello", "user.bin": b"\x00\xff\x01"})
    base.dir("data/xdir", xattrs={"user.dir": b"1"})
    base.add("data/times", data=b"t", mtime="1600000000.123456789", atime="1700000000.5")
    base.add("dev/null2", tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
    base.add("dev/loop9", tarfile.BLKTYPE, mode=0o660, dev=(7, 9), gid=6)
    base.add("run/fifo", tarfile.FIFOTYPE, mode=0o622)
    base.add("long/" + "n" * 250, data=b"long name\n")
    deep = "long/" + "/".join(["d" * 60] * 5) + "/file-at-depth"
    for i in range(1, 6):
        base.dir("long/" + "/".join(["d" * 60] * i))
    base.add(deep, data=b"deep\n")
    base.add("gone/file", data=b"1")
    base.add("gone-file", data=b"2")
    base.add("opaque/old1", data=b"3")
    base.add("opaque/sub/old2", data=b"4")
    base.add("replace-me", data=b"a file, later a directory")
    base.add("dir-to-sym/inside", data=b"5")
    base.add("lowerattr/own", data=b"6")
    base.close()

    upper = TarBuilder(os.path.join(workdir, "upper.tar"))
    upper.add(".wh.gone-file")
    upper.add(".wh.gone")
    upper.add("opaque/.wh..wh..opq")
    upper.add("opaque/new", data=b"7")
    upper.dir("replace-me", 0o750)
    upper.add("replace-me/inside", data=b"8")
    upper.add("dir-to-sym", tarfile.SYMTYPE, linkname="etc")
    upper.add("lowerattr/new", data=b"9")  # no directory entry: its parent comes from below
    upper.add("missing/parent/chain/file", data=b"10")  # no directory entries at all
    upper.dir("home/user", 0o750, uid=1000, gid=1000)  # merged with the lower directory
    upper.add("etc/conf", data=b"upper config\n", mode=0o600)
    upper.dir("many")
    for i in range(3000):
        upper.add(f"many/f{i:04d}", data=b"%d\n" % i, mode=0o644 if i % 2 else 0o600, uid=i % 7)
    upper.add("many/hl", tarfile.LNKTYPE, linkname="many/f0001")
    upper.close()

    top = TarBuilder(os.path.join(workdir, "top.tar"))
    top.dir(".", 0o700)  # the root's attributes never change
    top.add("data/.wh.sym-abs")
    top.add("tmp/x", data=b"11", uid=100_000, gid=100_000)
    top.add("trusted-xattr", data=b"12", xattrs={"trusted.evil": b"1", "user.fine": b"2"})
    top.dir("setgid-dir", 0o2775, gid=50)
    top.close()
    return [(base.path, "gzip"), (upper.path, "zstd"), (top.path, "none")]


def describe_tree(root: str) -> dict[str, tuple]:
    """Every entry below `root` (not the root itself): type, mode, owner, size, content hash,
    link target, device, xattrs (trusted ones included: whiteouts and opaque markers), and
    the paths that share its inode. Times are compared unless the entry was made just now
    (a parent created on the fly, a whiteout device), which no tar entry asked for."""
    out: dict[str, tuple] = {}
    inodes: dict[int, list[str]] = {}
    recent = time.time() - 86_400
    stats = {}
    for top, dirs, files in os.walk(root):  # every lstat first: reading content moves atimes
        for name in dirs + files:
            path = os.path.join(top, name)
            stats[path] = os.lstat(path)
    for path, st in stats.items():
        rel = os.path.relpath(path, root)
        content = ""
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
            inodes.setdefault(st.st_ino, []).append(rel)
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        dev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(
            st.st_mode) else None
        xattrs = tuple(sorted((k, os.getxattr(path, k, follow_symlinks=False))
                              for k in os.listxattr(path, follow_symlinks=False)))
        # a directory's or symlink's atime is moved by the walk itself
        times = None if st.st_mtime > recent else (
            st.st_mtime_ns, None if stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode) else st.st_atime_ns)
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    st.st_size if stat.S_ISREG(st.st_mode) else None, content, link, dev, xattrs, times)
    for group in inodes.values():
        for rel in group:
            out[rel] += (tuple(sorted(group)),)
    return out


def snapshot_dirs(containerd_root: str) -> list[str]:
    """The overlayfs snapshotter's snapshot directories, in the order they were made."""
    base = os.path.join(containerd_root, "io.containerd.snapshotter.v1.overlayfs", "snapshots")
    # Skips the snapshotter's `new-*` directories: snapshots being created, renamed a moment later.
    ids = sorted(int(n) for n in os.listdir(base) if n.isdigit()) if os.path.isdir(base) else []
    return [os.path.join(base, str(i), "fs") for i in ids]
