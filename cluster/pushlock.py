"""One `fab push` at a time to a destination: a lock file beside it, on the head, with a lease.

Two pushes of the same data to the same place (a cron script whose last push has not ended,
a second terminal) would share part files: one truncating what the other writes, one renaming
into place a file the other is still filling. So a push first creates
`.spotfan-push-lock.NAME.spotfan-part` beside its destination, only if absent (O_EXCL), and rewrites it
every BEAT_S while it runs (from a thread of its own, on an SFTP channel of its own, so a long
listing or a busy copy never lets it age): the head sets its mtime, so its age is judged on the head's own
clock (against a probe file made there), never the laptop's. A second push finds it fresh and
stops with who holds it; one not rewritten for STALE_S (its push killed, its laptop asleep) is
taken over: renamed away (of two takers only one rename succeeds), then created afresh. A lock
of this same machine (host name and hardware address: two laptops may share a host name) whose
process is gone (a push killed with SIGKILL, the laptop rebooted) is
taken over at once: the same command run again right after a kill goes on. A push that finds its lock taken over
(it was stopped past the lease: a laptop that slept) stops copying at its next rewrite.

Destinations that overlap (`data/` and `data/sub/`) share files too, so a push also stops
when a live push holds a folder that contains its destination (the lock beside each folder
above it) or one inside it (the locks its listing of the destination passes). Each push makes
its own lock before it looks for the others', so of two that start at once at least one sees
the other: one refuses, or both do, and never do both copy.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import paramiko
import psutil

from cluster.errors import ClusterError
from cluster.sides import PART_SUFFIX, PUSH_LOCK_PREFIX, RemoteSide
from tasks.procs import boot_id, find_process, start_time

BEAT_S = 5.0  # a running push rewrites its lock this often
STALE_S = 30.0  # a lock not rewritten for this long is a dead push's
FULL_BELOW_BYTES = 64 * 1024  # a disk with less free than this cannot take a lock file: it is full


def lock_name(dest: PurePosixPath) -> PurePosixPath:
    """Beside the destination; for a push into the share's root, in it."""
    if not dest.name:
        return dest / f"{PUSH_LOCK_PREFIX}{PART_SUFFIX}"
    return dest.with_name(f"{PUSH_LOCK_PREFIX}.{dest.name}{PART_SUFFIX}")


def locked_dest(lock: PurePosixPath) -> PurePosixPath:
    """The destination a lock file (named by lock_name) is for."""
    inner = lock.name[len(PUSH_LOCK_PREFIX):-len(PART_SUFFIX)]
    return lock.parent / inner[1:] if inner else lock.parent


class PushBusy(ClusterError):
    """Another push to the same destination is running."""


@dataclass
class PushLock:
    """Held by this push while it copies; `keep` rewrites it in the background, `release`
    ends that and removes it (only if still ours)."""

    side: RemoteSide
    path: PurePosixPath  # below the side's top
    shown: str  # how messages name the destination
    token: str
    lost: threading.Event = field(default_factory=threading.Event)  # another push took it over: stop copying
    _stop: threading.Event = field(default_factory=threading.Event)
    _beats: threading.Thread | None = None

    @classmethod
    def take(cls, side: RemoteSide, dest: PurePosixPath, shown: str) -> PushLock:
        """This push's lock on `dest`, made once no live push holds it or a folder above it."""
        lock = cls(side, lock_name(dest), shown, secrets.token_hex(8))
        for _ in range(3):  # created; or found stale, moved away, and created (a racer may win each time)
            if lock._create():
                try:
                    lock.refuse_overlaps(lock_name(above) for above in dest.parents)
                except BaseException:
                    lock.release()
                    raise
                return lock
            held = lock._holder()
            if held is None:
                continue  # it went away meanwhile
            age, who, dead = held
            if age < STALE_S and not dead:
                raise PushBusy(
                    f"another `fab push` to {shown} is running ({who}, last seen {age:.0f} s ago): wait for it "
                    f"to end; if it is dead (killed, its laptop asleep), the same command takes over once it has "
                    f"not been seen for {STALE_S:.0f} s")
            lock._move_stale()
        raise PushBusy(f"other pushes to {shown} keep taking its lock ({side.describe(lock.path)}): "
                       "run one push at a time")

    def refuse_overlaps(self, locks: Iterable[PurePosixPath]) -> None:
        """PushBusy if a live push holds one of these locks (of destinations above or inside this
        push's); a stale one (its push dead) is passed over: it guards nothing."""
        for other in locks:
            if other == self.path:
                continue
            held = self._holder(other)
            if held is None:
                continue
            age, who, dead = held
            if age < STALE_S and not dead:
                theirs, mine = locked_dest(other), locked_dest(self.path)
                how = "which holds" if theirs in mine.parents else "inside"
                raise PushBusy(
                    f"another `fab push` to {self._where(theirs)} is running ({who}, last seen {age:.0f} s ago), "
                    f"{how} {self._where(mine)}: pushes to places that overlap would write the same files; wait for it to end "
                    f"and run the same command again (if it is dead, it is passed over once it has not been seen "
                    f"for {STALE_S:.0f} s)")

    def _where(self, dest: PurePosixPath) -> str:
        return self.side.describe(dest) if str(dest) != "." else f"{self.side.describe(dest).strip()} root"

    def keep(self, channel: AbstractContextManager[paramiko.SFTPClient]) -> None:
        """Rewrite the lock every BEAT_S (the head stamps its mtime) over `channel` until `release`."""
        def beats() -> None:
            try:
                with channel as sftp:
                    while not self._stop.wait(BEAT_S):
                        if not self._rewrite(sftp):
                            self.lost.set()
                            return
            except (OSError, EOFError, ClusterError, paramiko.SSHException):
                pass  # a lost connection fails the copies, which say so

        self._beats = threading.Thread(target=beats, name="push-lock", daemon=True)
        self._beats.start()

    def _rewrite(self, sftp: paramiko.SFTPClient) -> bool:
        """Rewrite the lock in place if it is still ours (never create it again: a push that
        was stopped past the lease and is taken over must not take it back); whether it was."""
        try:
            with sftp.open(self.side.path(self.path), "r+") as f:
                held = json.loads(f.read(4096))
                if not isinstance(held, dict) or held.get("token") != self.token:
                    return False
                body = self._body()
                f.seek(0)
                f.write(body)
                f.truncate(len(body))
        except (FileNotFoundError, PermissionError):
            return False  # gone, or replaced by a file this user may not write: not ours any more
        except ValueError:
            return False  # not ours any more (being rewritten by its new holder)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join(timeout=10)
        try:
            with self.side.sftp.open(self.side.path(self.path), "r") as f:
                ours = json.loads(f.read(4096)).get("token") == self.token
            if ours:
                self.side.sftp.remove(self.side.path(self.path))
        except (OSError, EOFError, ValueError, paramiko.SSHException):
            pass  # gone already, taken over, or the connection is lost: the lease ends it

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "machine": machine(), "pid": os.getpid(),
                           "pid_created": _created(os.getpid()), "boot": boot_id(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}).encode()

    def _create(self) -> bool:
        """Whether this push made the lock now (False: one is there)."""
        path = self.side.path(self.path)
        try:
            f = self.side.sftp.open(path, "wx")
        except FileExistsError:
            return False
        except OSError as e:
            if self.side.stat(self.path) is not None:
                return False  # servers that answer an O_EXCL clash with a plain failure
            raise self._cannot(e) from e
        try:
            with f:  # (paramiko sends the write at close)
                f.write(self._body())
        except OSError as e:  # made, but not written (a full disk): never left to block the next push
            self.side.remove(self.path)
            raise self._cannot(e) from e
        return True

    def _cannot(self, e: OSError) -> ClusterError:
        free = self.side.free_bytes(self.path.parent)
        full = (f"; the head's disk is full ({free} bytes free): free space on the head, then run the same "
                "command again") if free is not None and free < FULL_BELOW_BYTES else ""
        return ClusterError(f"cannot create {self.side.describe(self.path)} (the push's lock): {e}{full}")

    def _holder(self, path: PurePosixPath | None = None) -> tuple[float, str, bool] | None:
        """The lock's (or another lock's) age on the head's clock, who holds it, and whether that
        is a process of this machine that is gone; None if the lock is gone."""
        path = path or self.path
        st = self.side.stat(path)
        if st is None:
            return None
        probe = path.with_name(f".{path.name}.{self.token}.probe{PART_SUFFIX}")
        try:
            try:
                with self.side.sftp.open(self.side.path(probe), "wx") as f:
                    f.write(b"")
                now = self.side.stat(probe)
            finally:
                self.side.remove(probe)
        except OSError as e:
            raise ClusterError(f"cannot tell how old {self.side.describe(path)} (another push's lock) is: "
                               f"{e}; if no push to {self.side.describe(locked_dest(path))} runs, delete it") from e
        age = max(0.0, float((now.st_mtime if now else 0) - (st.st_mtime or 0)))
        try:
            with self.side.sftp.open(self.side.path(path), "r") as f:
                held = json.loads(f.read(4096))
        except (OSError, ValueError):
            return age, "its holder unknown", False
        if not isinstance(held, dict):
            return age, "its holder unknown", False
        who = f"from {held.get('host', '?')}, pid {held.get('pid', '?')}, started {held.get('started', '?')}"
        pid = held.get("pid")
        here = machine()
        if not here or held.get("machine") != here or not isinstance(pid, int):
            return age, who, False  # another machine's (two laptops may share a host name): its lease decides
        created, boot = held.get("pid_created"), held.get("boot")
        try:
            gone = (find_process(pid, float(created), boot if isinstance(boot, str) else None) is None
                    if isinstance(created, (int, float)) else not psutil.pid_exists(pid))
        except psutil.Error:
            gone = False  # not ours to look at: it may well be alive
        return age, who, gone

    def _move_stale(self) -> None:
        away = self.path.with_name(f".{self.path.name}.{self.token}.stale{PART_SUFFIX}")
        try:
            self.side.sftp.rename(self.side.path(self.path), self.side.path(away))
        except OSError:
            return  # another taker moved it first
        self.side.remove(away)


def _created(pid: int) -> float | None:
    """When process `pid` of this machine started (seconds since boot, tasks.procs; None if
    there is none): a pid, this and the boot together name one process, never a later one
    that reused the pid."""
    try:
        return start_time(pid)
    except (psutil.Error, ValueError):
        return None


def machine() -> str:
    """This machine, as a lock names it: its host name and a hardware address ("" if it has none
    to give, then no lock is judged by its pid)."""
    node = uuid.getnode()
    if node & (1 << 40):  # a random stand-in (multicast bit set), not this machine's address
        return ""
    return f"{socket.gethostname()}/{node:012x}"
