"""Publishing small outputs over a direct, pipelined SFTP session to the share's server.

Through the SSHFS mount (caching off) one publish costs about eleven round trips, one
after another: lookups, create, write, close, link, unlink. When the runner is told how
to reach the mount's server (SPOTFAN_SFTP_COMMAND, set by the cluster's VMs), workers
leave small finished outputs on local disk and the runner publishes each chunk's in one
batch on its own session: create + write + close, then a plain SFTP RENAME, which
OpenSSH's server performs as link + unlink, so it fails when the output exists (create
only, like the mount's link). Every request of a phase is in flight at once.

Nothing here is trusted unchecked: at start a probe proves that the session sees the
run root (a file made through it appears under the mount) and that its rename never
replaces (a rename onto an existing file is refused and leaves it intact). Without that,
or if the session dies later, outputs are published through the mount as before.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shlex
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tasks import sftp
from tasks.claims import listing
from tasks.errors import EnvironmentFault, PublishError
from tasks.fs import fault
from tasks.publish import Fence, Published, Publisher, discard, lost_temp

if TYPE_CHECKING:
    from tasks.items import Item
    from tasks.worker import Outcome

logger = logging.getLogger(__name__)
T = TypeVar("T")

COMMAND_ENV = "SPOTFAN_SFTP_COMMAND"  # shell words of a command that starts an SFTP session
MAX_BYTES = 4 << 20  # bigger outputs (and folders) are published by their worker, through the mount
FULL_BELOW_BYTES = 64 * 1024  # a refused write on a disk with less free space: out of space
PREFIX = "d-"  # remote temporaries' names: never a name the mount's publisher uses
READDIR_PAGE = 100  # names per READDIR answer from OpenSSH's server
BATCH_BYTES = 32 << 20  # staged outputs read into memory at once, at most (a chunk can be big)


@dataclass(frozen=True)
class Staged:
    """A finished output waiting on local disk to be published."""

    key: str
    local: Path  # the temporary on this machine's disk
    out: str  # the output's path under the run root
    fence: Fence


def remote_root(root: Path, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The path on the SFTP server of `root`, from the sshfs mount it lives on, or None."""
    target = os.path.realpath(root)
    best: tuple[str, str] | None = None
    try:
        with open(mountinfo, encoding="utf-8") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if not sep or len(fields) < 5 or len(tail) < 2 or tail[0] != "fuse.sshfs":
                    continue
                mnt = _unescape(fields[4])
                inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
                if inside and (best is None or len(mnt) > len(best[0])):
                    best = (mnt, _unescape(tail[1]))
    except OSError:
        return None
    if best is None or ":" not in best[1]:
        return None
    mnt, source = best
    base = source.split(":", 1)[1] or "."
    rel = os.path.relpath(target, mnt)
    return base if rel == "." else f"{base.rstrip('/')}/{rel}"


def _open_session() -> sftp.Session:
    """The SFTP session SPOTFAN_SFTP_COMMAND starts (its handshake done)."""
    return sftp.Session(shlex.split(os.environ.get(COMMAND_ENV, "").strip()))


def _unescape(field: str) -> str:
    """A mountinfo field with its octal escapes (\\040 for a space, ...) decoded."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class Direct:
    """The runner's session, and how it publishes a chunk's staged outputs."""

    def __init__(self, session: sftp.Session | None, *, root: Path, remote: str, tmp: Path,
                 fallback: Publisher, lost: str = "") -> None:
        self.session = session
        self.root, self.remote, self.tmp = root, remote, tmp
        self.remote_tmp = f"{remote}/{tmp.relative_to(root).as_posix()}"
        self.fallback = fallback  # the mount's publisher, for when the session is gone
        self.lost = lost  # why the session is not used (any more)
        self._lock = threading.Lock()
        self._pages: dict[str, int] = {}  # READDIR pages of each folder at its last listing

    @staticmethod
    def wanted(root: Path) -> str | None:
        """The run root's folder on the server when SPOTFAN_SFTP_COMMAND names a session to
        try; None (said why, if it is set) when there is none to try."""
        if not os.environ.get(COMMAND_ENV, "").strip():
            return None
        remote = remote_root(root)
        if remote is None:
            logger.info("%s is set but %s is not on an sshfs mount: publishing through the "
                        "mount", COMMAND_ENV, root)
        return remote

    @staticmethod
    def connect() -> "Future[sftp.Session]":
        """The session's ssh handshake in a thread (a few hundred milliseconds that the
        runner's other set-up and its workers' start overlap); `start` takes it."""
        pool = ThreadPoolExecutor(1, thread_name_prefix="spotfan-sftp-start")
        try:
            return pool.submit(_open_session)
        finally:
            pool.shutdown(wait=False)

    @classmethod
    def start(cls, *, root: Path, remote: str, tmp: Path, fallback: Publisher,
              connecting: "Future[sftp.Session] | None" = None) -> Direct:
        """The session named by SPOTFAN_SFTP_COMMAND (the one `connecting` brings, else one
        started now) once its probe passes; else one that publishes the staged outputs
        through the mount (said why)."""
        try:
            session = connecting.result() if connecting is not None else _open_session()
        except (sftp.SessionLost, ValueError) as e:
            logger.warning("cannot start the SFTP session of %s (%s): publishing through the "
                           "mount (slower, as safe)", COMMAND_ENV, e)
            return cls(None, root=root, remote=remote, tmp=tmp, fallback=fallback, lost=str(e))
        direct = cls(session, root=root, remote=remote, tmp=tmp, fallback=fallback)
        why = direct.probe()
        if why:
            session.close()
            logger.warning("the SFTP session of %s failed its check (%s): publishing through "
                           "the mount (slower, as safe)", COMMAND_ENV, why)
            return cls(None, root=root, remote=remote, tmp=tmp, fallback=fallback, lost=why)
        logger.info("publishing small outputs over a direct SFTP session (%s on the server)", remote)
        return direct

    def close(self) -> None:
        if self.session is not None:
            logger.info("the direct SFTP session sent %d requests", self.session.sent)
            self.session.close()

    def probe(self) -> str:
        """"" if the session sees the run root and its rename refuses to replace; else why not."""
        tag = f"{PREFIX}probe-{os.getpid()}"
        made, kept = self.tmp / f"{tag}-a", self.tmp / f"{tag}-b"
        try:
            kept.write_bytes(b"kept")
            r = self.session.run([sftp.open_create(f"{self.remote_tmp}/{made.name}")])[0]
            if not r.ok:
                return f"cannot create a file in {self.remote_tmp}: {r.message}"
            replies = self.session.run([sftp.write(r.data, 0, b"made"), sftp.close(r.data)])
            if not all(x.ok for x in replies) or made.read_bytes() != b"made":
                return f"a file made through the session is not {made} under the mount"
            moved = self.session.run([sftp.rename(f"{self.remote_tmp}/{made.name}",
                                                  f"{self.remote_tmp}/{kept.name}")])[0]
            if moved.ok or kept.read_bytes() != b"kept":
                return "the server's rename replaces an existing file (not OpenSSH's)"
            return ""
        except (sftp.SessionLost, OSError) as e:
            return str(e)
        finally:
            for p in (made, kept):
                p.unlink(missing_ok=True)

    def using(self, fn: Callable[[sftp.Session], T], *, what: str) -> T | None:
        """`fn(session)` while the session lives, else None (then the caller goes through
        the mount); a session lost on the way is said once and not used again."""
        with self._lock:
            if self.lost or self.session is None:
                return None
            try:
                return fn(self.session)
            except sftp.SessionLost as e:
                self.lost = str(e)
                logger.warning("the direct SFTP session is gone (%s) while %s: going through "
                               "the mount from now on", e, what)
                return None

    # -- listing -----------------------------------------------------------------------
    def listings(self, folders: Sequence[Path]) -> list[set[str]]:
        """The names in each folder (none for a missing one), one after another in the given
        order, each with its pages pipelined; through the mount once the session is gone."""
        with self._lock:
            if not self.lost:
                try:
                    return [self._listing(f) for f in folders]
                except sftp.SessionLost as e:
                    self.lost = str(e)
                    logger.warning("the direct SFTP session is gone (%s): listing and publishing "
                                   "through the mount from now on", e)
                except OSError as e:
                    logger.info("listing through the mount this once: %s", e)
        return [listing(f) for f in folders]

    def _listing(self, folder: Path) -> set[str]:
        path = f"{self.remote}/{folder.relative_to(self.root).as_posix()}"
        opened = self.session.run([sftp.opendir(path)])[0]
        if opened.code == sftp.NO_SUCH_FILE:
            return set()
        if not opened.ok:
            raise OSError(errno.EIO, f"the server cannot list {folder}: {opened.message}")
        names: set[str] = set()
        pages = self._pages.get(path, 1) + 1  # the pages it had last time, and one for EOF
        try:
            while True:
                replies = self.session.run([sftp.readdir(opened.data)] * pages)
                got = [r for r in replies if r.kind == sftp.NAME]
                for r in got:
                    names.update(r.names)
                bad = [r for r in replies if r.kind != sftp.NAME and r.code != sftp.EOF]
                if bad:
                    raise OSError(errno.EIO, f"the server stopped listing {folder}: {bad[0].message}")
                if len(got) < len(replies):  # an EOF ends the folder
                    break
                pages = 2
        finally:
            self.session.run([sftp.close(opened.data)])
        self._pages[path] = max(1, len(names) // READDIR_PAGE + 1)
        names.discard(".")
        names.discard("..")
        return names

    # -- publishing --------------------------------------------------------------------
    def publish(self, staged: Sequence[Staged]) -> list[Published | Exception]:
        """Publish every staged output (create-only); what became of each, in order. In
        batches of at most BATCH_BYTES held in memory at once."""
        out: list[Published | Exception] = []
        batch: list[Staged] = []
        size = 0
        for s in staged:
            try:
                n = s.local.stat().st_size
            except OSError:
                n = 0  # _publish says what became of it
            if batch and size + n > BATCH_BYTES:
                out += self._publish_batch(batch)
                batch, size = [], 0
            batch.append(s)
            size += n
        if batch:
            out += self._publish_batch(batch)
        return out

    def _publish_batch(self, staged: Sequence[Staged]) -> list[Published | Exception]:
        with self._lock:
            if not self.lost:
                try:
                    result = self._publish(staged)
                    for s in staged:
                        discard(s.local)
                    return result
                except sftp.SessionLost as e:
                    self.lost = str(e)
                    logger.warning("the direct SFTP session is gone (%s): publishing through "
                                   "the mount from now on", e)
            return [self._through_mount(s) for s in staged]

    def _through_mount(self, s: Staged) -> Published | Exception:
        self.fallback.open()
        try:
            return self.fallback.publish(s.local, s.out, is_dir=False, fence=s.fence)
        except Exception as e:  # the key's or the environment's: its caller sorts them
            return e
        finally:
            self.fallback.close()

    def _publish(self, staged: Sequence[Staged]) -> list[Published | Exception]:
        result: list[Published | Exception | None] = [None] * len(staged)
        names = [f"{self.remote_tmp}/{PREFIX}{s.local.name}" for s in staged]
        datas: list[bytes] = []
        for i, s in enumerate(staged):
            try:
                datas.append(s.local.read_bytes())
            except OSError as e:
                datas.append(b"")
                result[i] = PublishError(f"the finished output {s.local} vanished before it "
                                         f"was published ({e.strerror})")
        todo = [i for i in range(len(staged)) if result[i] is None]
        opened = self.session.run([sftp.open_create(names[i]) for i in todo])
        writes: list[sftp.Request] = []
        owners: list[int] = []  # the item of each write request
        for i, r in zip(todo, opened):
            if not r.ok:
                result[i] = self._refused(r, self.tmp, names[i])
                continue
            data = datas[i]
            for off in range(0, max(1, len(data)), sftp.WRITE_BLOCK):
                writes.append(sftp.write(r.data, off, data[off:off + sftp.WRITE_BLOCK]))
                owners.append(i)
            writes.append(sftp.close(r.data))
            owners.append(i)
        for i, r in zip(owners, self.session.run(writes)):
            if not r.ok and result[i] is None:
                result[i] = self._refused(r, self.tmp, names[i])
        todo = [i for i in range(len(staged)) if result[i] is None]
        for _ in range(2):  # a second time after making missing output folders
            renamed = self.session.run([sftp.rename(names[i], f"{self.remote}/{staged[i].out}")
                                        for i in todo])
            missing = []
            for i, r in zip(todo, renamed):
                if r.ok:
                    result[i] = "ours"
                elif r.code == sftp.NO_SUCH_FILE:
                    missing.append(i)
                else:
                    result[i] = self._taken_or_refused(r, staged[i])
            if not missing:
                break
            for i in missing:
                (self.root / staged[i].out).parent.mkdir(parents=True, exist_ok=True)
            todo = missing
        for i in todo:
            if result[i] is None:
                result[i] = lost_temp(self.tmp)
        leftovers = [names[i] for i in range(len(staged)) if result[i] != "ours"]
        if leftovers:
            self.session.run([sftp.remove(n) for n in leftovers])  # answers do not matter
        return [r if r is not None else PublishError("not published") for r in result]

    def _taken_or_refused(self, r: sftp.Reply, s: Staged) -> Published | Exception:
        folder = s.out.rsplit("/", 1)[0] if "/" in s.out else "."
        there, tmp_fs, out_fs = self.session.run([
            sftp.lstat(f"{self.remote}/{s.out}"), sftp.statvfs(self.remote_tmp),
            sftp.statvfs(f"{self.remote}/{folder}")])
        if there.ok:
            return "theirs"  # a peer published it first: its copy stays
        # OpenSSH's server answers FAILURE, without errno, for every other refusal of a
        # rename; the filesystems on both sides say which environment fault it was.
        where = self.root / folder
        tmp_stats, out_stats = sftp.fs_stats(tmp_fs), sftp.fs_stats(out_fs)
        if out_stats is not None and out_stats.read_only:
            return fault(errno.EROFS, where)
        if tmp_stats is not None and out_stats is not None and tmp_stats.fsid != out_stats.fsid:
            return EnvironmentFault(
                f"cannot move outputs into {where}: on the share's server it is another filesystem "
                f"than the run root {self.root} (where temporaries are written); keep outputs on the "
                "run root's filesystem and run the same command again; no key was charged an attempt")
        if out_stats is not None and out_stats.free_bytes < FULL_BELOW_BYTES:
            return fault(errno.ENOSPC, where)
        return self._refused(r, where, s.out)

    def _refused(self, r: sftp.Reply, where: Path, name: str) -> Exception:
        """Why the server refused a request: the environment's fault, or the key's."""
        if r.code == sftp.NO_SUCH_FILE:
            return lost_temp(self.tmp)
        if r.code == sftp.PERMISSION_DENIED:
            return EnvironmentFault(f"the share's server refuses writes under {where} "
                                    f"({r.message}); make it writable and run the same command "
                                    "again; no key was charged an attempt")
        try:
            st = os.statvfs(self.root)
            if st.f_bavail * st.f_frsize < FULL_BELOW_BYTES:
                return fault(errno.ENOSPC, self.root)
        except OSError:
            pass
        return PublishError(f"the share's server refused {name}: {r.message or 'failure'}")


def stageable(path: Path) -> bool:
    """A finished output the runner can publish directly: a regular file of at most MAX_BYTES."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return path.is_file() and not path.is_symlink() and st.st_size <= MAX_BYTES


def settle(direct: Direct, outcomes: list[Outcome], items: Sequence[Item],
           fences: Sequence[Fence], mine: Callable[[str], bool]) -> list[Outcome]:
    """A chunk's outcomes with every staged output published (or dropped, when our claim
    on its unit was taken over meanwhile)."""
    by_key = {it.key: (it, f) for it, f in zip(items, fences)}
    staged, at = [], []
    out = list(outcomes)
    for i, o in enumerate(outcomes):
        if not o.staged:
            continue
        if not mine(o.key):
            discard(Path(o.staged))
            out[i] = replace(o, ok=False, staged="", published="fenced")
            continue
        it, fence = by_key[o.key]
        staged.append(Staged(o.key, Path(o.staged), it.out, fence))
        at.append(i)
    for i, put in zip(at, direct.publish(staged)):
        o = out[i]
        if isinstance(put, EnvironmentFault):
            out[i] = replace(o, ok=False, staged="", error=str(put), env=str(put))
        elif isinstance(put, Exception):
            out[i] = replace(o, ok=False, staged="", error=f"{type(put).__name__}: {put}")
        else:
            out[i] = replace(o, ok=put != "fenced", staged="", published=put)
    return out
