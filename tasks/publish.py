"""Atomic outputs: write to a temporary that keeps the output's name, then rename it into place.

Only `rename(2)` of a closed temporary ever puts a file (or directory) at a final path,
so a worker killed at any instant leaves at most a temporary under `.spotfan/tmp/`,
which is swept later and never mistaken for an output.
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
from pathlib import Path

from tasks.errors import PublishError

MAX_TEMP_NAME = 200  # leave room for the prefix within NAME_MAX (255)
_counter = itertools.count()


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


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (FUSE, some network mounts) refuse fsync on directories.
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EPERM, errno.ENOSYS, errno.EIO):
            raise
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, *, is_dir: bool, fsync: bool) -> bool:
    """Move a finished temporary to its final path. Returns False if a directory output was
    already published by another worker (ours is then discarded, theirs kept)."""
    if fsync:
        fsync_tree(tmp)
    try:
        _rename(tmp, final)
    except FileNotFoundError:
        final.parent.mkdir(parents=True, exist_ok=True)
        _rename(tmp, final)
    except OSError as e:
        if is_dir and e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
            discard(tmp)
            return False
        if e.errno == errno.EXDEV:
            raise PublishError(f"cannot rename {tmp} to {final}: they are on different "
                               "filesystems; keep outputs on the same mount as the run root") from e
        raise
    if fsync:
        _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    return True


def _rename(tmp: Path, final: Path) -> None:
    if not os.path.lexists(tmp):
        # Distinguish "the task wrote nothing" from "the output's folder is missing".
        raise PublishError(f"the task returned without writing its output (expected a file "
                           f"at the `out` path it was given, which ends in {final.name!r})")
    os.rename(tmp, final)
