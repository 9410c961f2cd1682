"""`fab push` and `fab pull`: files and folders between the laptop and the share, whole, resumable, concurrent.

Each file is copied to a part file beside its final name (`.NAME.SIZE-MTIME.spotfan-part`),
which is given the source's mtime and mode and then renamed into place: a task whose glob
matches the final name never sees half of it. A file already there with the same size and
mtime (or, with `checksum`, the same bytes) is skipped, so running the same command again
after an interrupt copies only what is missing, continuing a big file from its part. Several
files go at once: where OpenSSH's client is installed, a push's small files through a few
pipelined SFTP sessions (cluster.sftp_pipeline: many files in flight, each one's fate from the
head's answers), its big ones through several `sftp -b` processes (cluster.sftp_batch: 64
requests in flight; what they copied is checked here) and its very big ones in ranges over
several sessions at once (cluster.sftp_ranges: past one session's window per round trip); a pull's (and a push's without OpenSSH)
through paramiko, one SFTP session per worker thread. Nothing is ever deleted but our own part files once a file
is in place.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import paramiko

from cluster import leftovers, pushlock, sftp_batch, sftp_ranges
from cluster.compare import listed, same
from cluster.push_plan import (ENGINES, OPENSSH_JOBS, Engine, Options, Plan, batched, early_batches,  # noqa: F401
                               openssh, piped_sends, pipeline_for, ranged, ranges_for)
from cluster.pushlock import PushLock
from cluster.errors import ClusterError, UsageError
from cluster.sides import Entry, LocalSide, RemoteSide, Side, Tree, part_name, plain
from cluster.share import Share

logger = logging.getLogger(__name__)

DEFAULT_JOBS = 8  # files in flight through paramiko: small files are round-trip bound, so several at once
MAX_JOBS = 64
BLOCK_BYTES = 1 << 20  # read and written at a time
RESUME_MIN_BYTES = leftovers.RESUME_MIN_BYTES  # a part file at least this big is continued, a smaller one restarted
STAGING_SUFFIX = ".spotfan-part"  # `.NAME.spotfan-part`: a new folder while a push fills it
TICK_S = 0.2  # how often the main thread reports progress while files go


@dataclass(frozen=True)
class Progress:
    """Where a transfer is (for a progress bar or a plain line)."""

    files: int  # files to copy (after skipping those already there)
    files_done: int
    bytes: int  # bytes to copy
    bytes_done: int
    seconds: float


@dataclass(frozen=True)
class TransferReport:
    """What a push or pull did; files = copied + skipped + failed."""

    direction: Literal["push", "pull"]
    source: str  # as given
    dest: str  # where it went (a share path is shown relative to the share's root)
    files: int  # regular files in the source
    copied: int  # files copied now
    skipped: int  # already there: same size and mtime (same bytes with --checksum)
    resumed: int  # of the copied, continued from a part file an interrupted copy left
    bytes: int  # bytes sent now
    seconds: float
    not_files: list[str] = field(default_factory=list)  # links, special files, refused names: not copied
    failed: dict[str, str] = field(default_factory=dict)  # rel path -> what went wrong
    interrupted: bool = False  # stopped by Ctrl-C: run the same command again to go on
    kept: list[str] = field(default_factory=list)  # part files and staged folders left for the same command to
    # continue from (below the share's root for a push, local paths for a pull); other partial copies are removed
    disk_free: int | None = None  # a push that failed for want of space: bytes the head's disk had free after it

    @property
    def rate(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "rate_bytes_s": round(self.rate)})


def share_path(text: str, *, what: str) -> PurePosixPath:
    """A path below the share's root, as the user typed it ("" or "." is the root)."""
    p = PurePosixPath(text.strip() or ".")
    if p.is_absolute() or any(not plain(part) for part in p.parts if part != "."):
        raise UsageError(f"{what} {text!r} must be a path below the share's root, without `..`: "
                         "type e.g. `data/images`")
    return PurePosixPath(*[part for part in p.parts if part != "."]) if p.parts != (".",) else PurePosixPath()


def push(share: Share, local: Path, dest: str = "", *, opts: Options = Options(),
         on_progress: Callable[[Progress], None] | None = None) -> TransferReport:
    """Copy a local file or folder to the share: to DEST, or by default to its own name at the root."""
    _check(opts)
    local, to = push_paths(local, dest)
    src = LocalSide(local.parent.resolve())
    return _transfer("push", share, src, PurePosixPath(local.resolve().name), to, str(local),
                     lambda sftp: RemoteSide(sftp, share.root, "the share's "), opts, on_progress, src_local=True)


def pull(share: Share, src: str, local: Path | None = None, *, opts: Options = Options(),
         on_progress: Callable[[Progress], None] | None = None) -> TransferReport:
    """Copy a file or folder of the share here: to LOCAL, or by default to its name in the current folder."""
    _check(opts)
    frm, target = pull_paths(src, local, root="the share's root")
    dst = LocalSide(target.parent)
    return _transfer("pull", share, dst, frm, PurePosixPath(target.name), src,
                     lambda sftp: RemoteSide(sftp, share.root, "the share's "), opts, on_progress, src_local=False)


def push_paths(local: Path, dest: str) -> tuple[Path, PurePosixPath]:
    """What `fab push LOCAL [--to DEST]` copies and where to (by default its own name at the root), checked."""
    local = local.expanduser()
    if not local.exists():
        raise UsageError(f"`fab push {local}`: no such file or folder here")
    return local, share_path(dest, what="DEST") if dest else PurePosixPath(local.resolve().name)


def pull_paths(src: str, local: Path | None, *, root: str) -> tuple[PurePosixPath, Path]:
    """What `fab pull SRC [--to LOCAL]` copies (a path below `root`) and where to, checked."""
    frm = share_path(src, what="SRC")
    if not frm.parts:
        raise UsageError(f"`fab pull` needs SRC, a path below {root}: type e.g. `fab pull results`")
    target = (local or Path(frm.name)).expanduser().resolve()
    if not target.parent.is_dir():
        raise UsageError(f"cannot pull into {target}: its folder {target.parent} does not exist; create it first")
    return frm, target


def _check(opts: Options) -> None:
    if not 0 <= opts.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs {opts.jobs} must be from 1 to {MAX_JOBS}")
    if opts.engine not in ENGINES:
        raise UsageError(f"--engine {opts.engine!r} must be one of {', '.join(ENGINES)}")
    if not opts.bwlimit >= 0 or opts.bwlimit == float("inf"):
        raise UsageError(f"--bwlimit {opts.bwlimit} must be a number of KB/s, 0 for no limit")


class _Sessions:
    """One RemoteSide per worker thread, each on its own SSH connection to the head; all closed at the end."""

    def __init__(self, share: Share, make: Callable[[paramiko.SFTPClient], RemoteSide], stack: ExitStack) -> None:
        self._share, self._make, self._stack = share, make, stack
        self._local = threading.local()
        self._lock = threading.Lock()

    def side(self) -> RemoteSide:
        side = getattr(self._local, "side", None)
        if side is None:
            with self._lock:
                sftp = self._stack.enter_context(self._share.session())
            side = self._local.side = self._make(sftp)
        return side


def _transfer(direction: Literal["push", "pull"], share: Share, local: LocalSide, frm: PurePosixPath,
              to: PurePosixPath, shown_src: str, make: Callable[[paramiko.SFTPClient], RemoteSide],
              opts: Options, on_progress: Callable[[Progress], None] | None, *, src_local: bool) -> TransferReport:
    started = time.monotonic()
    with ExitStack() as stack:
        held = stack.enter_context(ExitStack())  # released last, once every copy has ended
        sessions = _Sessions(share, make, stack)
        found = _walk(local, frm, shown_src) if src_local else None
        pipe = pipeline_for(share, found, opts) if src_local else None
        if pipe is not None:
            stack.enter_context(pipe).start()  # ssh logins while paramiko's does and the destination is listed
        ranges = ranges_for(share, found, opts) if src_local else None
        if ranges is not None:
            stack.enter_context(ranges).start()
        early = early_batches(share, found, opts, piped=pipe is not None, ranged=ranges is not None) \
            if src_local else []
        for b in early:  # sftp logins likewise
            stack.callback(b.close)
            b.start()
        main = make(share.sftp)
        src_side, dst_side = (local, main) if src_local else (main, local)
        dest_shown = dst_side.describe(to)
        if found is None:
            found = _walk(src_side, frm, shown_src)
        tree = found if isinstance(found, Tree) else Tree([found], [], [])
        single = isinstance(found, Entry)
        if single and dst_side.is_dir(to):  # `fab push data.csv inputs/`: into the folder
            to = to / frm.name
            dest_shown = dst_side.describe(to)
        final_to = to
        if not single and openssh(opts) and src_local and to.parts and not dst_side.is_dir(to) \
                and dst_side.stat(to) is None:
            to = staging_name(to)  # a new folder: filled beside its name, then renamed into place whole
        plans: list[Plan] = []
        skipped, failed = 0, {}
        try:
            for d in ([] if single else [""] + tree.dirs):
                dst_side.makedirs(to / d if d else to)
            if single:
                dst_side.makedirs(to.parent)
        except OSError as e:
            raise ClusterError(f"cannot create folders under {dest_shown}: {e}") from e
        lock: PushLock | None = None
        lost = ""  # why this push stopped when its lock was taken over
        if src_local:  # one push at a time to a destination (cluster.pushlock)
            lock = PushLock.take(main, final_to, dest_shown)
            held.callback(lock.release)
            lock.keep(share.session())
        there = listed(dst_side, to, single)
        if lock is not None:  # and none inside the destination: the listing passed their locks
            lock.refuse_overlaps(main.locks_seen)
        for e in tree.files:
            s, d = (frm, to) if single else (frm / e.rel, to / e.rel)
            try:
                if same(src_side, dst_side, s, d, e, checksum=opts.checksum, there=there):
                    skipped += 1
                    continue
            except OSError as err:
                failed[e.rel or frm.name] = f"cannot compare: {err}"
                continue
            plans.append((e, s, d))
        plans.sort(key=lambda p: -p[0].size)  # big files first: they set the pace
        state = _State(total_bytes=sum(p[0].size for p in plans), total_files=len(plans))
        copied = resumed = 0
        interrupted = False
        sends, plans = piped_sends(local, main, plans, staged=to != final_to) if pipe is not None else ([], plans)
        bigs, plans = ranged(local, main, plans) if ranges is not None else ([], plans)
        puts, plans = batched(local, main, plans, opts, staged=to != final_to) if src_local else ([], plans)
        batches = sftp_batch.split(puts, len(early) or opts.jobs or OPENSSH_JOBS) if puts else []
        for b in early[len(batches):]:
            b.close()  # its files were there already
        workers = len(batches) + bool(bigs) + min(opts.jobs or DEFAULT_JOBS, len(plans))
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="transfer")
        futures: dict[Future[bool], str] = {}
        ran: dict[Future[int], sftp_batch.Batch] = {}
        piped: set[Future[None]] = set()
        in_ranges: Future[sftp_ranges.Outcome] | None = None
        try:
            if ranges is not None and bigs:
                in_ranges = pool.submit(ranges.send, bigs, state.add, lambda b: state.add(0, file_done=True))
            if pipe is not None and sends:
                piped.update(pipe.send(sends, lambda f: state.add(f.size, file_done=True)))
            for i, batch in enumerate(batches):
                b = early[i] if i < len(early) else sftp_batch.Batch(share.login(), bwlimit=opts.bwlimit)
                ran[pool.submit(b.run, batch, lambda p: state.add(p.sends, file_done=True))] = b
            for e, s, d in plans:
                def one(e: Entry = e, s: PurePosixPath = s, d: PurePosixPath = d) -> bool:
                    side = sessions.side()
                    a, b = (src_side, side) if src_local else (side, dst_side)
                    return _copy(a, b, s, d, e, state, opts)
                futures[pool.submit(one)] = e.rel or frm.name
            pending: set[Future] = set(futures) | set(ran) | piped | ({in_ranges} if in_ranges else set())
            while pending:
                finished, pending = wait(pending, timeout=TICK_S, return_when=FIRST_COMPLETED)
                for fut in finished:
                    if fut in ran or fut in piped or fut is in_ranges:
                        continue  # what a batch copied is checked at the end; a pipeline tells it
                    try:
                        resumed += fut.result()
                        copied += 1
                    except (OSError, EOFError, paramiko.SSHException, ClusterError) as err:
                        failed[futures[fut]] = str(err) or type(err).__name__
                if on_progress is not None:
                    on_progress(state.snapshot(time.monotonic() - started))
                if lock is not None and lock.lost.is_set():
                    raise _LockLost
        except (KeyboardInterrupt, _LockLost) as stopped:
            if isinstance(stopped, _LockLost):  # stopped as by Ctrl-C; said as one failure below
                lost = (f"this push was stopped for over {pushlock.STALE_S:.0f} s (its laptop asleep?) and "
                        f"another push to {dest_shown} took over: run the same command again once that one has ended")
            interrupted = True
            state.stop.set()
            for b in ran.values():
                b.stop()
            if pipe is not None:
                pipe.stop()
            if ranges is not None:
                ranges.stop()
            for fut in futures:
                fut.cancel()
        finally:
            pool.shutdown(wait=True)
            if pipe is not None:
                pipe.close()
        if interrupted:
            copied = sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None)
        if pipe is not None:  # each file's fate is known from the head's answers
            pipe.settle()
            copied += len(pipe.done)
            if not interrupted:
                failed.update(pipe.failed)
        if in_ranges is not None:  # each file's fate is known from the head's answers
            got = in_ranges.result()
            copied += len(got.done)
            resumed += len(got.resumed & got.done)
            if not interrupted:
                failed.update(got.failed)
            state.kept += [str(PurePosixPath(p).relative_to(main.top)) for p in got.kept]
        if ran:  # a batch's file counts as copied once it is at its final path, whole
            arrived = listed(dst_side, to, single)
            by_rel = {e.rel: e for e in tree.files}
            for b in ran.values():
                for p in b.puts:
                    e = by_rel[p.key]
                    have = arrived.get(e.rel) if arrived is not None else None
                    got = (have.size, have.mtime) if have is not None else (
                        _sized(dst_side.stat(to)) if arrived is None else None)
                    if b.ok(p) and got is not None and got == (e.size, e.mtime):
                        copied += 1
                        resumed += p.resume
                    elif not interrupted:
                        failed[p.key or frm.name] = b.why(p)
                if (p := b.current) is not None and not b.ok(p):  # where it stopped: a partial copy
                    leftovers.left(main, PurePosixPath(p.part).relative_to(main.top), kept=state.kept,
                          resumable=by_rel[p.key].size >= RESUME_MIN_BYTES and p.part != p.final)
        unaccounted = len(tree.files) - copied - skipped - len(failed)
        if unaccounted > 0 and not interrupted:  # a backstop: never "ok", nor a folder put in place, with files missing
            failed[f"({unaccounted} more file(s))"] = ("no copier reported them copied or failed: run the same "
                                                       "command again (it copies only what is missing)")
        if to != final_to and not interrupted and not failed:
            try:
                main.sftp.posix_rename(main.path(to), main.path(final_to))
            except OSError as e:
                failed[final_to.name] = (f"all copied to {main.describe(to)}, but it could not be renamed to "
                                         f"{dest_shown}: {e}; move it there, or push to another --to")
        if to != final_to and (failed or interrupted):
            state.kept.append(str(to))
        if lost:
            interrupted = False
            failed[final_to.name] = lost
        full = leftovers.disk_free(main, to if not single else to.parent, tree, failed) if src_local and failed else None
        if src_local and openssh(opts):  # a login OpenSSH could not negotiate: say which setting decides it
            failed = {k: v + sftp_batch.kex_hint(share.login(), v) for k, v in failed.items()}
    return TransferReport(direction, shown_src, dest_shown, len(tree.files), copied, skipped, resumed,
                          state.bytes_done, time.monotonic() - started, tree.skipped, failed, interrupted,
                          sorted(state.kept), full)


class _LockLost(Exception):
    """This push's lock was taken over (cluster.pushlock): its copies stop."""


def _sized(st: os.stat_result | paramiko.SFTPAttributes | None) -> tuple[int, int] | None:
    return (st.st_size or 0, int(st.st_mtime or 0)) if st is not None else None


def staging_name(folder: PurePosixPath) -> PurePosixPath:
    """Where a push to a new folder fills it: beside it, renamed to it once every file is whole
    (an interrupted push leaves it, and the same command continues it)."""
    return folder.with_name(f".{folder.name}{STAGING_SUFFIX}")


def _walk(side: Side, top: PurePosixPath, shown: str) -> Tree | Entry:
    try:
        found = side.walk(top)
    except OSError as e:
        raise ClusterError(f"cannot list {side.describe(top)}: {e}") from e
    if found is None:
        raise UsageError(f"{shown}: no such file or folder ({side.describe(top)})")
    return found


class _State:
    """Counters the copying threads share, and the flag that stops them."""

    def __init__(self, *, total_bytes: int, total_files: int) -> None:
        self.total_bytes, self.total_files = total_bytes, total_files
        self.bytes_done = self.files_done = 0
        self.kept: list[str] = []  # partial copies kept to continue from (TransferReport.kept)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, n: int, *, file_done: bool = False) -> None:
        with self.lock:
            self.bytes_done += n
            self.files_done += file_done

    def snapshot(self, seconds: float) -> Progress:
        with self.lock:
            return Progress(self.total_files, self.files_done, self.total_bytes, self.bytes_done, seconds)


def _copy(src: Side, dst: Side, s: PurePosixPath, d: PurePosixPath, e: Entry, state: _State,
          opts: Options) -> bool:
    """Copy one file to its part file, then rename it into place; True if it continued a part."""
    part = part_name(d, e.size, e.mtime)
    have = dst.stat(part) if e.size >= RESUME_MIN_BYTES else None  # a small file is simply sent again
    offset = (have.st_size or 0) if have is not None else 0
    offset = offset if RESUME_MIN_BYTES <= offset <= e.size else 0
    if offset:
        state.add(0)
        logger.info("%s: continuing from byte %d", dst.describe(d), offset)
    t0 = time.monotonic()
    sent = 0
    try:
        with src.reader(s, offset, e.size - offset) as r, dst.writer(part, offset) as w:
            for _ in range((e.size - offset) // BLOCK_BYTES + 2):
                if state.stop.is_set():
                    raise ClusterError("interrupted")
                block = r.read(BLOCK_BYTES)
                if not block:
                    break
                w.write(block)
                sent += len(block)
                state.add(len(block))
                if opts.bwlimit:
                    ahead = sent / opts.bwlimit - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
    except BaseException:
        leftovers.left(dst, part, resumable=offset + sent >= RESUME_MIN_BYTES, kept=state.kept)
        raise
    if offset + sent != e.size:  # written and closed (a failed write raised): the count is what is there
        raise ClusterError(f"{src.describe(s)} changed while it was copied ({e.size} bytes listed, "
                           f"{offset + sent} copied): run the same command again")
    dst.finish(part, d, e)
    state.add(0, file_done=True)
    return offset > 0
