"""The two ends of a `fab push`/`fab pull`: a folder on the laptop and a folder of the share over one SFTP session.

Both offer the same few operations (list a tree, stat one file, open for reading, open a
part file for writing at an offset, finish it: times, mode, rename into place), so one copy
loop in cluster.transfer serves both directions. Names listed on the share are untrusted:
a name that is not one plain path component is refused, symbolic links are not followed.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

import paramiko
import paramiko.sftp

PART_SUFFIX = ".spotfan-part"  # a file being copied: `.NAME.SIZE-MTIME.spotfan-part` beside NAME
PUSH_LOCK_PREFIX = ".spotfan-push-lock"  # a push's lock beside its destination (cluster.pushlock)
IO_TIMEOUT_S = 60.0  # one SFTP request unanswered this long fails the file
MAX_TREE_FILES = 2_000_000  # files listed in one tree


@dataclass(frozen=True)
class Entry:
    """One regular file of a tree."""

    rel: str  # path below the tree's top, with "/" separators ("" for a single file)
    size: int  # bytes
    mtime: int  # modification time, whole seconds (SFTP's resolution)
    mode: int  # permission bits


@dataclass(frozen=True)
class Tree:
    """What a listing found: the files, the folders (to create empty ones too), what it skipped."""

    files: list[Entry]
    dirs: list[str]  # rel paths of folders below the top
    skipped: list[str]  # rel paths of links and special files, and refused names


def part_name(final: PurePosixPath, size: int, mtime: int) -> PurePosixPath:
    """The part file of `final` while a copy of a source of this size and mtime goes on: an
    interrupted copy of the same source version continues from it, any other starts afresh."""
    return final.with_name(f".{final.name}.{size}-{mtime}{PART_SUFFIX}")


def is_part(name: str) -> bool:
    return name.startswith(".") and name.endswith(PART_SUFFIX)


def is_push_lock(name: str) -> bool:
    """A push's lock file (cluster.pushlock): `.spotfan-push-lock.NAME.spotfan-part` beside NAME."""
    return name.startswith(PUSH_LOCK_PREFIX) and name.endswith(PART_SUFFIX)


def plain(name: str) -> bool:
    """One path component that names nothing else (no "/", NUL, "." or "..")."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


class Side(Protocol):
    """One end of a transfer; paths are PurePosixPath below its top folder."""

    def describe(self, rel: PurePosixPath) -> str: ...
    def walk(self, top: PurePosixPath) -> Tree | Entry | None: ...
    def stat(self, rel: PurePosixPath) -> os.stat_result | paramiko.SFTPAttributes | None: ...
    def is_dir(self, rel: PurePosixPath) -> bool: ...
    def reader(self, rel: PurePosixPath, offset: int, size: int) -> BinaryIO: ...
    def writer(self, rel: PurePosixPath, offset: int) -> BinaryIO: ...
    def finish(self, part: PurePosixPath, final: PurePosixPath, entry: Entry) -> None: ...
    def remove(self, rel: PurePosixPath) -> None: ...
    def makedirs(self, rel: PurePosixPath) -> None: ...


def _is_file(st: os.stat_result | paramiko.SFTPAttributes) -> bool:
    return stat.S_ISREG(st.st_mode or 0)


class LocalSide:
    """A folder on this machine."""

    def __init__(self, top: Path) -> None:
        self.top = top

    def path(self, rel: PurePosixPath) -> Path:
        return self.top.joinpath(*rel.parts)

    def describe(self, rel: PurePosixPath) -> str:
        return str(self.path(rel))

    def walk(self, top: PurePosixPath) -> Tree | Entry | None:
        base = self.path(top)
        try:
            st = base.lstat()
        except FileNotFoundError:
            return None
        if _is_file(st):
            return Entry("", st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode):
            return Tree([], [], [str(top)])
        files, dirs, skipped = [], [], []
        for dirpath, dirnames, filenames in os.walk(base):
            here = Path(dirpath).relative_to(base).as_posix()
            prefix = "" if here == "." else here + "/"
            for d in sorted(dirnames):
                if is_part(d):  # a folder a push is filling (cluster.transfer.staging_name)
                    dirnames.remove(d)
                elif os.path.islink(os.path.join(dirpath, d)):
                    skipped.append(prefix + d)
                    dirnames.remove(d)
                else:
                    dirs.append(prefix + d)
            for name in sorted(filenames):
                if is_part(name):
                    continue
                st = os.lstat(os.path.join(dirpath, name))
                if not _is_file(st):
                    skipped.append(prefix + name)
                    continue
                files.append(Entry(prefix + name, st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)))
                if len(files) > MAX_TREE_FILES:
                    raise OSError(f"more than {MAX_TREE_FILES} files under {base}")
        return Tree(files, dirs, skipped)

    def stat(self, rel: PurePosixPath) -> os.stat_result | None:
        try:
            st = self.path(rel).lstat()
        except FileNotFoundError:
            return None
        return st if _is_file(st) else None

    def is_dir(self, rel: PurePosixPath) -> bool:
        return self.path(rel).is_dir()

    def reader(self, rel: PurePosixPath, offset: int, size: int) -> BinaryIO:
        f = open(self.path(rel), "rb")
        f.seek(offset)
        return f

    def writer(self, rel: PurePosixPath, offset: int) -> BinaryIO:
        path = self.path(rel)
        if offset:
            f = open(path, "r+b")
            f.seek(offset)
            f.truncate()
            return f
        return open(path, "wb")

    def finish(self, part: PurePosixPath, final: PurePosixPath, entry: Entry) -> None:
        path = self.path(part)
        os.chmod(path, entry.mode)
        os.utime(path, (entry.mtime, entry.mtime))
        os.replace(path, self.path(final))

    def remove(self, rel: PurePosixPath) -> None:
        self.path(rel).unlink(missing_ok=True)

    def makedirs(self, rel: PurePosixPath) -> None:
        self.path(rel).mkdir(parents=True, exist_ok=True)


class RemoteSide:
    """A folder of the share, over one SFTP session (one per thread: sessions are not shared)."""

    def __init__(self, sftp: paramiko.SFTPClient, top: PurePosixPath, shown: str) -> None:
        self.sftp = sftp
        self.top = top
        self.shown = shown  # how messages name the top ("the share's data/")
        sftp.get_channel().settimeout(IO_TIMEOUT_S)
        self._made: set[PurePosixPath] = set()
        self.locks_seen: list[PurePosixPath] = []  # push locks the last walk passed (cluster.pushlock)

    def path(self, rel: PurePosixPath) -> str:
        return str(self.top / rel)

    def describe(self, rel: PurePosixPath) -> str:
        return f"{self.shown}{rel}" if str(rel) != "." else self.shown

    def walk(self, top: PurePosixPath) -> Tree | Entry | None:
        try:
            st = self.sftp.lstat(self.path(top))
        except FileNotFoundError:
            return None
        if _is_file(st):
            return Entry("", st.st_size or 0, int(st.st_mtime or 0), stat.S_IMODE(st.st_mode or 0))
        if not stat.S_ISDIR(st.st_mode or 0):
            return Tree([], [], [str(top)])
        files: list[Entry] = []
        dirs: list[str] = []
        skipped: list[str] = []
        self.locks_seen = []
        todo = [""]
        while todo:
            here = todo.pop()
            for a in sorted(self.sftp.listdir_attr(self.path(top / here) if here else self.path(top)),
                            key=lambda a: a.filename):
                name = a.filename
                rel = f"{here}/{name}" if here else name
                if not plain(name):
                    skipped.append(repr(rel))
                elif is_part(name):
                    if is_push_lock(name):
                        self.locks_seen.append(top / rel)
                    continue  # a part file, or a folder a push is filling
                elif stat.S_ISDIR(a.st_mode or 0):
                    dirs.append(rel)
                    todo.append(rel)
                elif _is_file(a):
                    files.append(Entry(rel, a.st_size or 0, int(a.st_mtime or 0), stat.S_IMODE(a.st_mode or 0)))
                else:
                    skipped.append(rel)
                if len(files) > MAX_TREE_FILES:
                    raise OSError(f"more than {MAX_TREE_FILES} files under {self.describe(top)}")
        return Tree(files, dirs, skipped)

    def stat(self, rel: PurePosixPath) -> paramiko.SFTPAttributes | None:
        try:
            st = self.sftp.lstat(self.path(rel))
        except FileNotFoundError:
            return None
        return st if _is_file(st) else None

    def is_dir(self, rel: PurePosixPath) -> bool:
        try:
            return stat.S_ISDIR(self.sftp.stat(self.path(rel)).st_mode or 0)
        except FileNotFoundError:
            return False

    def reader(self, rel: PurePosixPath, offset: int, size: int) -> BinaryIO:
        f = self.sftp.open(self.path(rel), "rb")
        f.seek(offset)
        f.prefetch(size)  # many reads in flight: one round trip does not limit the rate
        return f  # type: ignore[return-value]

    def writer(self, rel: PurePosixPath, offset: int) -> BinaryIO:
        f = self.sftp.open(self.path(rel), "r+b" if offset else "wb")
        if offset:
            f.truncate(offset)
            f.seek(offset)
        f.set_pipelined(True)  # writes acknowledged in bulk, not one round trip each
        return f  # type: ignore[return-value]

    def finish(self, part: PurePosixPath, final: PurePosixPath, entry: Entry) -> None:
        path = self.path(part)
        self.sftp.chmod(path, entry.mode)
        self.sftp.utime(path, (entry.mtime, entry.mtime))
        self.sftp.posix_rename(path, self.path(final))  # an atomic replace on OpenSSH

    def remove(self, rel: PurePosixPath) -> None:
        try:
            self.sftp.remove(self.path(rel))
        except FileNotFoundError:
            pass

    def free_bytes(self, rel: PurePosixPath) -> int | None:
        """Bytes free (to its user) on the disk that holds `rel`, from OpenSSH's statvfs@openssh.com;
        None where the server cannot say."""
        try:  # paramiko has no call for this extension: its request, framed by paramiko
            kind, msg = self.sftp._request(paramiko.sftp.CMD_EXTENDED, "statvfs@openssh.com", self.path(rel))
        except (OSError, EOFError, paramiko.SSHException):
            return None
        if kind != paramiko.sftp.CMD_EXTENDED_REPLY:
            return None
        _bsize, frsize, _blocks, _bfree, bavail = (msg.get_int64() for _ in range(5))
        return frsize * bavail

    def makedirs(self, rel: PurePosixPath) -> None:
        parts = rel.parts
        for i in range(1, len(parts) + 1):
            sub = PurePosixPath(*parts[:i])
            if sub in self._made:
                continue
            try:
                self.sftp.mkdir(self.path(sub))
            except OSError:
                try:  # exists (SFTP says only "failure"), or truly could not be made
                    if not stat.S_ISDIR(self.sftp.stat(self.path(sub)).st_mode or 0):
                        raise NotADirectoryError(f"{self.describe(sub)} is a file, not a folder") from None
                except FileNotFoundError as e:
                    raise PermissionError(f"cannot create folder {self.describe(sub)}") from e
            self._made.add(sub)
