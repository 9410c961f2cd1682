"""Atomic, create-only outputs: a finished temporary is put at its final path only if
nothing is there, so a late finisher (a frozen runner whose claim was taken over) never
replaces what a peer published.

How, per filesystem (`fs.probe_publish`, once per root):
  renameat2  local disks: `renameat2(RENAME_NOREPLACE)` of the temporary, file or folder.
  link       SSHFS: the task writes on the VM's local disk; the result is copied into the
             runner's folder on the share and `link(2)`ed into place (a server-side link
             that fails if the name exists), then the copy's name is removed. Every call
             goes through open folder descriptors, so a path's folders are not looked up
             again (each lookup is a round trip with caching off). A folder output cannot
             be linked: it is renamed (refused onto a non-empty folder) after checking that
             the claim was not taken over (its next generation does not exist).
  rename     neither works: a check that the output is absent, then rename (a small race).
A worker killed at any instant leaves at most a temporary, swept later.
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tasks.errors import EnvironmentFault, PublishError
from tasks.fs import ENV_ERRNOS, PublishMethod, fault, renameat2_noreplace

MAX_TEMP_NAME = 200  # leave room for the prefix within NAME_MAX (255)
COPY_BLOCK = 1 << 20
_counter = itertools.count()
Published = Literal["ours", "theirs", "fenced"]  # put by us; already there; claim taken over


@dataclass(frozen=True)
class Fence:
    """The claim a key is published under: superseded once its next generation exists."""

    claims_dir: str  # the task's claims folder
    unit: str  # the key's unit
    generation: int  # the generation we hold

    def superseded(self) -> bool:
        return os.path.lexists(os.path.join(self.claims_dir, f"{self.unit}.{self.generation + 1}"))


def temp_path(tmp_dir: Path, out: str) -> Path:
    """A unique temporary for `out` that ends with the output's own name (and so its suffix)."""
    name = out.rsplit("/", 1)[-1]
    if len(name.encode()) > MAX_TEMP_NAME:
        name = name[-(MAX_TEMP_NAME // 4):]  # keep the tail: the suffix matters to writers
    return tmp_dir / f"{os.getpid()}-{next(_counter)}.{name}"


def discard(path: Path) -> None:
    """Remove a temporary file or directory, if it is there."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder of a directory output, to stable storage."""
    if path.is_dir():
        for dirpath, _, files in os.walk(path):
            for f in files:
                _fsync(Path(dirpath) / f, os.O_RDONLY)
            _fsync(Path(dirpath), os.O_RDONLY | os.O_DIRECTORY)
    else:
        _fsync(path, os.O_RDONLY)


def _fsync(path: Path, flags: int, dir_fd: int | None = None) -> None:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (FUSE, some network mounts) refuse fsync on directories.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EPERM, errno.ENOSYS, errno.EIO):
            raise
    finally:
        os.close(fd)


class Publisher:
    """Publishes one worker's outputs; open() and close() around each chunk keep folder
    descriptors for the chunk (reopened per chunk, so a re-created folder is seen)."""

    def __init__(self, root: Path, *, method: PublishMethod, share_tmp: Path | None,
                 fsync: bool) -> None:
        self.root = root
        self.method = method
        self.share_tmp = share_tmp  # on a network root: the runner's folder on the share
        self.fsync = fsync
        self._tmp_fd: int | None = None
        self._dirs: dict[str, int] = {}
        self._lock = threading.Lock()  # publishes may run in threads

    def open(self) -> None:
        if self.share_tmp is not None:
            try:
                self._tmp_fd = os.open(self.share_tmp, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError as e:
                raise lost_temp(self.share_tmp) from e

    def close(self) -> None:
        for fd in [self._tmp_fd, *self._dirs.values()]:
            if fd is not None:
                os.close(fd)
        self._tmp_fd = None
        self._dirs.clear()

    def publish(self, tmp: Path, out: str, *, is_dir: bool, fence: Fence) -> Published:
        if not os.path.lexists(tmp):
            if not tmp.parent.is_dir():
                raise lost_temp(tmp.parent)
            # Distinguish "the task wrote nothing" from "the output's folder is missing".
            raise PublishError(f"the task returned without writing its output (expected a "
                               f"file at the `out` path it was given, which ends in "
                               f"{out.rsplit('/', 1)[-1]!r})")
        if self.fsync and self.share_tmp is None:
            fsync_tree(tmp)
        if self.share_tmp is not None:
            return self._via_share(tmp, out, is_dir=is_dir, fence=fence)
        final = self.root / out
        if self.method == "renameat2":
            put = self._retry_parent(final, lambda: renameat2_noreplace(str(tmp), str(final)))
        elif self.method == "link" and not is_dir:
            put = self._retry_parent(final, lambda: os.link(tmp, final))
        else:
            put = self._retry_parent(final, lambda: _rename_absent(tmp, final, fence))
        if put != "ours" or self.method == "link":
            discard(tmp)
        if put == "ours" and self.fsync:
            _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        return put

    def _retry_parent(self, final: Path, put: Callable[[], object]) -> Published:
        for _ in range(3):
            try:
                put()
                return "ours"
            except FileExistsError:
                return "theirs"
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EISDIR):
                    return "theirs"
                if e.errno == errno.EAGAIN and str(e) == "fenced":
                    return "fenced"
                if e.errno != errno.ENOENT:
                    _raise_folder_fault(e, final.parent)
                # The output's folder is missing, or was missing: a peer worker may have
                # made it between our attempt and now, so ENOENT with the folder there is
                # no fault yet. Make it (if needed) and try again.
                final.parent.mkdir(parents=True, exist_ok=True)
        raise PublishError(f"the folder of {final} vanished three times while publishing")

    # -- network root: copy into the share, link or rename into place ------------------
    def _via_share(self, tmp: Path, out: str, *, is_dir: bool, fence: Fence) -> Published:
        assert self.share_tmp is not None and self._tmp_fd is not None
        name = tmp.name
        parent, _, final_name = out.rpartition("/")
        try:
            if is_dir:
                shutil.copytree(tmp, self.share_tmp / name)
                if self.fsync:
                    fsync_tree(self.share_tmp / name)
            else:
                self._copy_in(tmp, name)
        except FileNotFoundError as e:
            raise lost_temp(self.share_tmp) from e
        finally:
            discard(tmp)
        try:
            if is_dir:
                if fence.superseded():
                    return "fenced"
                return self._in_parent(parent, lambda fd: os.rename(
                    name, final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=fd))
            return self._in_parent(parent, lambda fd: os.link(
                name, final_name, src_dir_fd=self._tmp_fd, dst_dir_fd=fd))
        finally:
            if is_dir:
                discard(self.share_tmp / name)
            else:
                try:
                    os.unlink(name, dir_fd=self._tmp_fd)
                except FileNotFoundError:
                    pass

    def _copy_in(self, src: Path, name: str) -> None:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=self._tmp_fd)
        try:
            with open(src, "rb") as f:
                while block := f.read(COPY_BLOCK):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _in_parent(self, parent: str, put: Callable[[int], object]) -> Published:
        for _ in range(2):
            fd = self._dir_fd(parent)
            try:
                put(fd)
                return "ours"
            except FileExistsError:
                return "theirs"
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EISDIR):
                    return "theirs"
                if e.errno != errno.ENOENT:
                    _raise_folder_fault(e, self.root / parent, tmp=self.share_tmp)
                if self.share_tmp is not None and not self.share_tmp.is_dir():
                    raise lost_temp(self.share_tmp) from e
                with self._lock:
                    gone = self._dirs.pop(parent, None)
                if gone is not None:
                    os.close(gone)  # the output folder went away: make it again
                (self.root / parent).mkdir(parents=True, exist_ok=True)
        raise PublishError(f"the folder {self.root / parent} vanished twice while publishing")

    def _dir_fd(self, parent: str) -> int:
        with self._lock:
            return self._open_dir(parent)

    def _open_dir(self, parent: str) -> int:
        fd = self._dirs.get(parent)
        if fd is None:
            path = self.root / parent if parent else self.root
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except FileNotFoundError:
                path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            self._dirs[parent] = fd
        return fd


def _rename_absent(tmp: Path, final: Path, fence: Fence) -> None:
    if fence.superseded():
        raise OSError(errno.EAGAIN, "fenced")
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "exists", str(final))
    os.rename(tmp, final)


def _raise_folder_fault(e: OSError, folder: Path, *, tmp: Path | None = None) -> None:
    """Raise why an output folder refuses outputs: the folder's fault, not the key's (the
    run stops with exit 3), or `e` itself for anything else. `tmp`: where the temporaries
    are (a link from another filesystem is refused; over SSHFS with EPERM, not EXDEV)."""
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or e.errno == errno.EROFS:
        raise fault(errno.EROFS, folder) from e
    if e.errno in ENV_ERRNOS:
        raise fault(e.errno, folder) from e
    if e.errno == errno.EXDEV or (e.errno == errno.EPERM and tmp is not None and _apart(folder, tmp)):
        raise EnvironmentFault(f"cannot move outputs into {folder}: it is on another filesystem "
                                "than the run root; keep outputs on the run root's mount and run "
                               "the same command again; no key was charged an attempt") from e
    if e.errno in (errno.EACCES, errno.EPERM):
        raise EnvironmentFault(f"cannot write outputs into {folder}: {e.strerror}; make it "
                               "writable and run the same command again; no key was charged "
                               "an attempt") from e
    raise e


def _apart(a: Path, b: Path) -> bool:
    """True if `a` and `b` are surely on different filesystems. statvfs is what SSHFS passes
    on from the server for each path (its st_dev is the mount's for every file): two readings
    of one filesystem give the same size and inode count."""
    try:
        x, y = os.statvfs(a), os.statvfs(b)
    except OSError:
        return False
    return (x.f_blocks, x.f_files, x.f_frsize) != (y.f_blocks, y.f_files, y.f_frsize)


def lost_temp(folder: Path) -> EnvironmentFault:
    return EnvironmentFault(f"the temporary folder {folder} vanished (deleted, or swept by a "
                            "peer that judged this runner dead); run the same command again")
