"""A runner's local staging folder on a network root, and the sweep of dead runners' ones.

On a network root a task writes its output on local disk first, in
`$TMPDIR/spotfan-<owner>/`. A runner killed outright (SIGKILL, preemption of a container
that shares /tmp) leaves its folder behind; the next runner removes it. Whether its owner
is gone is told by a lock, not by a process id: `spotfan-<owner>.lock` is created and
`flock`ed before the folder, and held until the folder is removed. The kernel drops the
lock when the process dies, so a lock that can be taken means a dead owner, whatever the
PID namespace or host name it ran under (lab VMs and containers share one /tmp and may
reuse each other's names and pids: a pid check would judge a live peer's folder dead).
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "spotfan-"
LOCK_SUFFIX = ".lock"


class Staging:
    """This runner's staging folder, under a lock held until `close()`."""

    def __init__(self, owner_id: str, *, parent: Path | None = None) -> None:
        self.parent = Path(parent or tempfile.gettempdir())
        self.path = self.parent / f"{PREFIX}{owner_id}"
        self.lock = self.parent / f"{PREFIX}{owner_id}{LOCK_SUFFIX}"
        self._fd: int | None = None

    def create(self) -> Path:
        """Take the lock, then make the folder (in that order: a sweeper never sees the
        folder without its lock). The lock is taken under another name and renamed into
        place, so no sweeper can take it in the instant between its create and its flock."""
        fresh = self.lock.with_name(self.lock.name + "-new")
        fd = os.open(fresh, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(fresh, self.lock)
        except BaseException:
            os.close(fd)
            fresh.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.path.mkdir(mode=0o700)
        return self.path

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def sweep(parent: Path | None = None) -> int:
    """Remove the staging folders (and locks) of runners that are gone; returns how many.
    A folder whose lock is held is a live runner's and is left alone. A folder without a
    lock was made by an older spotfan (a runner makes its lock before its folder and
    removes it after): it is removed only if its name says this host and a process that
    is gone, that older version's own rule."""
    parent = Path(parent or tempfile.gettempdir())
    removed = 0
    try:
        names = {e.name for e in os.scandir(parent) if e.name.startswith(PREFIX)}
    except OSError as e:
        logger.warning("cannot list %s for dead runners' staging folders: %s", parent, e)
        return 0
    locks = [n for n in names if n.endswith(LOCK_SUFFIX)]
    for name in names - {n[: -len(LOCK_SUFFIX)] for n in locks} - set(locks):
        if _older_and_gone(name) and (parent / name).is_dir():
            shutil.rmtree(parent / name, ignore_errors=True)
            removed += 1
    for name in locks:
        lock = parent / name
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # its owner finished meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # held: a live runner
            shutil.rmtree(parent / name[: -len(LOCK_SUFFIX)], ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d staging folder(s) of runners that are gone", removed)
    return removed


def _older_and_gone(name: str) -> bool:
    """`spotfan-<host>-<pid>-<hex>` of this host whose pid is no process here."""
    parts = name[len(PREFIX):].rsplit("-", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname().replace("/", "_")[:40] or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
