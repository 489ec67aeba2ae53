"""Apply one OCI layer tar stream to a directory, making the tree containerd's applier makes.

This follows containerd's `pkg/archive` (`Apply` with `applyNaive`, `createTarFile`,
`mkparent`) and `OverlayConvertWhiteout` step by step, because containerd compares
nothing but the diff_id: a layer applied differently would pass and leave a wrong tree.

- Every name is resolved inside the root as if the root were `/` (continuity's
  `fs.RootPath`): `..`, absolute names and symlinked parents never reach outside it.
- An existing path is replaced unless both it and the entry are directories (merged).
- Missing parent directories are made 0755, or copy owner, mode, times and non-trusted
  xattrs from the first lower layer that has them (overlay only).
- Whiteouts: with `overlay`, `.wh.NAME` becomes a 0/0 character device owned like the
  entry, `.wh..wh..opq` sets `trusted.overlay.opaque=y`; otherwise the named path is
  removed, and an opaque marker empties its directory of what this layer did not add.
- Owners, then xattrs (`trusted.*` skipped, as containerd does), then mode (setuid and
  friends included), then times; directory times last, once nothing more is written in them.

Runs in an apply worker process (no asyncio, stdlib only), one call per layer.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import stat
import tarfile
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("cs_p2p.apply")

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
PAX_XATTR = "SCHILY.xattr."
MAX_LINKS = 255  # symlinks followed while resolving one name, as continuity allows
COPY_CHUNK = 1 << 20
MAX_TIME_NS = (1 << 63) - 1


class InvalidLayer(Exception):
    """The tar is malformed or asks for something containerd refuses (bad whiteout name,
    unknown entry type, a symlink loop): the apply fails and the pull with it."""


def root_path(root: str, path: str) -> str:
    """`path` resolved inside `root` with every symlink followed as if `root` were `/`.

    Components that do not exist are taken as they are; `..` never climbs above `root`.
    """
    parts = deque(p for p in path.split("/") if p and p != ".")
    resolved: list[str] = []
    links = 0
    while parts:
        name = parts.popleft()
        if name == "..":
            if resolved:
                resolved.pop()
            continue
        resolved.append(name)
        full = root + "/" + "/".join(resolved)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISLNK(st.st_mode):
            continue
        links += 1
        if links > MAX_LINKS:
            raise InvalidLayer(f"too many symlinks resolving {path!r}")
        target = os.readlink(full)
        resolved.pop()
        if target.startswith("/"):
            resolved = []
        parts.extendleft(reversed([p for p in target.split("/") if p and p != "."]))
    return root + "/" + "/".join(resolved) if resolved else root


def _clean(name: str) -> str:
    """Go's filepath.Clean (posixpath keeps a leading `//`, Go does not)."""
    cleaned = posixpath.normpath(name) if name else "."
    return "/" + cleaned.lstrip("/") if cleaned.startswith("//") else cleaned


def _time_ns(member: tarfile.TarInfo, key: str) -> int | None:
    """A PAX time exactly (tarfile's float loses nanoseconds), else the header's seconds."""
    raw = member.pax_headers.get(key)
    if raw is not None:
        sec, _, frac = raw.partition(".")
        try:
            whole = int(sec)
            ns = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            raise InvalidLayer(f"bad PAX {key} {raw!r} on {member.name!r}") from None
        return whole * 1_000_000_000 - ns if sec.startswith("-") else whole * 1_000_000_000 + ns
    if key == "mtime":
        return int(member.mtime) * 1_000_000_000
    return None


def _bound(ns: int) -> int:
    return ns if 0 <= ns <= MAX_TIME_NS else 0


def _times(member: tarfile.TarInfo) -> tuple[int, int]:
    """(atime, mtime) as containerd sets them: atime is the later of the two."""
    mtime = _time_ns(member, "mtime") or 0
    atime = _time_ns(member, "atime")
    return _bound(max(atime, mtime) if atime is not None else mtime), _bound(mtime)


def _remove_all(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


@dataclass
class LayerApplier:
    """State of one layer's application: the root, the lower layers that lend attributes
    to missing parents, and what this layer has unpacked so far (for opaque markers)."""

    root: str
    overlay: bool = False  # convert whiteouts for an overlay upperdir
    parents: list[str] = field(default_factory=list)  # lowerdirs, topmost first
    unpacked: set[str] = field(default_factory=set)
    dirs: list[tuple[str, int, int]] = field(default_factory=list)  # (name, atime, mtime)
    _resolved: dict[str, str] = field(default_factory=dict)  # parent name -> resolved path
    _dirs_seen: set[str] = field(default_factory=set)  # parents known to be directories

    def __post_init__(self) -> None:
        self.root = _clean(os.path.abspath(self.root))

    def _forget_resolutions(self) -> None:
        """Something was removed or a link made: cached parent resolutions may be stale."""
        self._resolved.clear()
        self._dirs_seen.clear()

    def _resolve_parent(self, ppath: str) -> str:
        hit = self._resolved.get(ppath)
        if hit is None:
            hit = self._resolved[ppath] = root_path(self.root, ppath)
        return hit

    def apply(self, tar: tarfile.TarFile) -> None:
        while (member := tar.next()) is not None:
            self._entry(tar, member)
            tar.members.clear()  # tarfile keeps every header it read; a layer may have millions
        for name, atime, mtime in self.dirs:
            os.utime(root_path(self.root, name), ns=(atime, mtime), follow_symlinks=False)

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _clean(member.name)
        cut = name.rfind("/") + 1
        ppath, base = name[:cut], name[cut:]
        ppath = self._resolve_parent(ppath)
        leaf = _clean("/" + base).lstrip("/")
        path = _clean(ppath + "/" + leaf) if leaf else ppath
        if path == self.root:
            return  # the root's own attributes are never changed
        if ppath != self.root:
            parent = ppath if base else posixpath.dirname(path)
            if parent not in self._dirs_seen:
                self._mkparent(parent)
                self._dirs_seen.add(parent)
        if not self._whiteout(member, path):
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not (stat.S_ISDIR(st.st_mode) and member.isdir()):
                _remove_all(path)
                self._forget_resolutions()
        self._create(tar, member, path)
        if member.isdir():
            self.dirs.append((name, *_times(member)))
        if not self.overlay:  # only an opaque marker without overlay asks what this layer unpacked
            self.unpacked.add(path)

    def _whiteout(self, member: tarfile.TarInfo, path: str) -> bool:
        """Handle a whiteout entry; False if the entry is one (nothing more to write)."""
        parent, base = posixpath.split(path)
        if not base.startswith(WHITEOUT_PREFIX):
            return True
        if base == WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(parent, "trusted.overlay.opaque", b"y")
            else:
                self._empty_except_unpacked(parent)
            return False
        original = _clean(parent + "/" + base[len(WHITEOUT_PREFIX):])
        if not original.startswith(parent.rstrip("/") + "/"):
            raise InvalidLayer(f"invalid whiteout name: {base!r}")
        if self.overlay:
            os.mknod(original, stat.S_IFCHR, 0)
            os.chown(original, member.uid, member.gid)
        else:
            _remove_all(original)
            self._forget_resolutions()
        return False

    def _empty_except_unpacked(self, directory: str) -> None:
        os.lstat(directory)  # containerd fails an opaque marker whose directory is gone
        for top, dirnames, filenames in os.walk(directory):
            for n in filenames:
                p = top + "/" + n
                if p not in self.unpacked:
                    os.unlink(p)
            keep = []
            for n in dirnames:
                p = top + "/" + n
                if p in self.unpacked:
                    keep.append(n)
                else:
                    _remove_all(p)
            dirnames[:] = keep
        self._forget_resolutions()

    def _mkparent(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                return
            raise NotADirectoryError(errno.ENOTDIR, "mkparent: not a directory", path)
        up = posixpath.dirname(path)
        if len(up) > len(self.root):
            self._mkparent(up)
        try:
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
        except FileExistsError:
            if os.path.isdir(path) and not os.path.islink(path):
                return
            raise
        rel = path[len(self.root):]
        for lower in self.parents:
            lpath = root_path(lower, rel)
            try:
                lst = os.lstat(lpath)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(lst.st_mode):
                break  # replaced in that layer: attributes are not copied
            _copy_dir_info(lst, path)
            _copy_up_xattrs(path, lpath)
            return

    def _create(self, tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> None:
        mode = member.mode & 0o7777
        atime, mtime = _times(member)
        if member.isreg():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            try:
                if member.size:
                    _copy(tar, member, fd)
                os.fchown(fd, member.uid, member.gid)
                self._xattrs(member, fd, path, regular_or_dir=True)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(atime, mtime))
            finally:
                os.close(fd)
            return
        if member.isdir():
            try:
                st = os.lstat(path)
                exists = stat.S_ISDIR(st.st_mode)
            except FileNotFoundError:
                exists = False
            if not exists:
                os.mkdir(path, mode)
        elif member.issym():
            os.symlink(member.linkname, path)
            self._forget_resolutions()
        elif member.islnk():
            os.link(self._hardlink_target(member.linkname), path, follow_symlinks=False)
            self._forget_resolutions()
        elif member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            os.mknod(path, kind | mode, os.makedev(member.devmajor, member.devminor))
        else:
            raise InvalidLayer(f"unhandled tar header type {member.type!r} for {member.name!r}")
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        st = os.lstat(path)
        self._xattrs(member, path, path, regular_or_dir=stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode))
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(path, mode)
        os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    def _hardlink_target(self, linkname: str) -> str:
        """The link's target inside the root: its parent resolved there, its own name not
        (a hard link to a symlink links the symlink, as `link(2)` does)."""
        cut = linkname.rfind("/") + 1
        target = _clean(root_path(self.root, linkname[:cut]) + "/" + linkname[cut:])
        return target if target.startswith(self.root) else self.root

    def _xattrs(self, member: tarfile.TarInfo, target: int | str, path: str, regular_or_dir: bool) -> None:
        for key, value in member.pax_headers.items():
            if not key.startswith(PAX_XATTR):
                continue
            attr = key[len(PAX_XATTR):]
            if attr.startswith("trusted."):
                log.warning("xattr ignored: admin attributes from archive not supported",
                            extra={"path": path, "xattr": attr})
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if isinstance(target, int):
                    os.setxattr(target, attr, data)
                else:
                    os.setxattr(target, attr, data, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.ENOTSUP or (exc.errno == errno.EPERM and attr.startswith("user.")
                                                  and not regular_or_dir):
                    log.warning("xattr ignored", extra={"path": path, "xattr": attr, "error": str(exc)})
                    continue
                raise


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
    """A member's data into `fd`: straight from the layer stream where it offers that,
    through tarfile otherwise (sparse members, plain files in tests)."""
    stream = tar.fileobj
    if hasattr(stream, "copy_to") and not member.issparse():
        stream.seek(member.offset_data)
        stream.copy_to(fd, member.size)
        return
    src = tar.extractfile(member)
    assert src is not None
    while True:
        chunk = src.read(COPY_CHUNK)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _copy_dir_info(st: os.stat_result, path: str) -> None:
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_up_xattrs(dst: str, src: str) -> None:
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise
    for name in names:
        if name.startswith("trusted."):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=False), os.XATTR_CREATE,
                        follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                raise
