"""Filesystem facts the engine builds on: atomic writes, create-only publishing, the
filesystem's own clock, and telling environment errors from a key's own failure.

Measured on sshfs 3.7 / OpenSSH 9.2: `renameat2(RENAME_NOREPLACE)` is refused there
(EINVAL), while `link(2)` is a server-side link that fails with EEXIST, so a create-only
publish is `renameat2` on local filesystems and link + unlink over SSHFS (probed once per
root). A create or a write gets the server's clock, `utime` the client's: ages are judged
against the mtime of a file this process just wrote on the same root.
"""
from __future__ import annotations

import ctypes
import errno
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasks.errors import EnvironmentFault

# errno values that say the environment failed, not the key: the run stops, no key is charged
ENV_ERRNOS = {errno.ENOSPC: "no space left on the device",
              errno.EDQUOT: "the disk quota is exhausted",
              errno.EROFS: "the filesystem is read-only",
              errno.ENOTCONN: "the mount is dead (transport endpoint is not connected)",
              errno.EIO: "an I/O error",
              errno.ESTALE: "a stale file handle (the mount lost its server)"}
RENAME_NOREPLACE = 1
AT_FDCWD = -100
PublishMethod = Literal["renameat2", "link", "rename"]

_libc = ctypes.CDLL(None, use_errno=True)


def env_errno(exc: BaseException | None) -> int | None:
    """The environment errno behind an exception (following its causes), or None."""
    seen = 0
    while exc is not None and seen < 16:  # bound: chains can be cyclic in odd user code
        if isinstance(exc, OSError) and exc.errno in ENV_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def fault(code: int, where: str | os.PathLike[str]) -> EnvironmentFault:
    """The error that stops a run for an environment errno, saying how to recover."""
    what = ENV_ERRNOS.get(code, os.strerror(code))
    fix = {errno.ENOSPC: "free space (or grow the disk)", errno.EDQUOT: "raise the quota or free space",
           errno.EROFS: "make it writable", errno.ENOTCONN: "remount it (on a cluster: fab heal)",
           errno.ESTALE: "remount it (on a cluster: fab heal)"}.get(code, "check the disk")
    return EnvironmentFault(f"{what} under {where}: {fix} and run the same command again; "
                            "no key was charged an attempt")


def renameat2_noreplace(src: str, dst: str, *, src_dir_fd: int = AT_FDCWD,
                        dst_dir_fd: int = AT_FDCWD) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst`."""
    rc = _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst),
                         RENAME_NOREPLACE)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def probe_publish(folder: Path) -> PublishMethod:
    """How this filesystem publishes create-only: tried once per root in `folder`."""
    tag = f".probe-{os.getpid()}-{secrets.token_hex(3)}"
    a, b = folder / f"{tag}-a", folder / f"{tag}-b"
    try:
        a.write_bytes(b"")
        try:
            renameat2_noreplace(str(a), str(b))
            a, b = b, a
            return "renameat2"
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        try:
            os.link(a, b)
            return "link"
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
        return "rename"  # neither: fenced by the claim generation alone (see publish.py)
    finally:
        for p in (a, b):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, fsync: bool = False,
                 make_parents: bool = False) -> None:
    """Write a whole file or nothing: a temporary beside it, closed (and fsynced), chmod,
    renamed into place. A reader never sees half a file under its final name, and a crash
    leaves at most a hidden `.NAME.*.tmp`. The one atomic write of both packages: every
    bookkeeping file of the engine and every local file of the cluster layer goes through
    here. The temporary's name is unique across machines and processes (lab VMs on one
    share may share pids)."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    host = socket.gethostname().replace("/", "_")[:40]
    tmp = path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def create_only(path: Path, data: bytes) -> bool:
    """Put a whole file at `path` unless one is there: True if ours was put. A temporary
    is linked into place (link(2) never replaces; it works over SSHFS too)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@dataclass
class FsClock:
    """`now` on the filesystem's clock: the mtime of a file this process just wrote there,
    as an offset from this machine's clock, refreshed by every heartbeat. Over SSHFS that
    is the head's clock (1 s resolution); on a local disk the kernel's."""

    offset: float = 0.0  # filesystem clock minus time.time(), seconds
    synced: float = 0.0  # time.monotonic() of the last sync; 0: never

    def sync(self, fd: int, first: bytes, path: Path) -> None:
        """Rewrite the first byte (`first`, what is there already) of the open probe file
        `fd`, then read the mtime of `path` (that file; FileNotFoundError if it was
        removed). The fsync makes SSHFS wait for the write, which it sends on
        asynchronously otherwise."""
        os.pwrite(fd, first, 0)
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
        before = time.time()
        mtime = os.stat(path).st_mtime
        self.offset = mtime - before
        self.synced = time.monotonic()

    def now(self) -> float:
        return time.time() + self.offset

    def age(self, mtime: float) -> float:
        """Seconds since `mtime` (a filesystem timestamp), on the filesystem's clock."""
        return self.now() - mtime
