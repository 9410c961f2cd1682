"""Claims: exclusive-create files under the root that keep live runners off each other's units.

A claim covers one *unit* of keys (see `plan.Plan`): the file `claims/<unit>` created with
O_CREAT|O_EXCL. Its mtime is its heartbeat: the holder rewrites a byte of it (a write gets
the filesystem's clock; utime over SSHFS would get the client's). A claim older than the
plan's lease, judged on the filesystem's clock, belongs to a dead or frozen runner and is
taken over by creating the next generation, `claims/<unit>.1`, `<unit>.2`, ... again with
O_EXCL, so that of two takers only one wins. A finished unit leaves `done/<unit>`, so one
listing of `done/` tells a runner which units peers finished. Works over SSHFS, where a
lost exclusive create fails with EPERM rather than EEXIST.

The bookkeeping every root shares (which claims are held, lost while frozen, due for a
heartbeat) is `ClaimBook`; `Claims` is its POSIX store, `tasks.store.claims.BucketClaims`
the object-store one (the same names, created only if absent, renewed by compare-and-swap).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tasks.errors import ClaimError
from tasks.fs import ENV_ERRNOS, FsClock, fault
from tasks.records import Stamp

logger = logging.getLogger(__name__)

MAX_GENERATIONS = 32  # takeovers of one unit before we give up on it for this run
CLAIM_THREADS = 16  # concurrent claim round trips on a network filesystem
REFRESH_FRACTION = 0.25  # refresh a claim once it is this fraction of the lease old
LOST_FRACTION = 0.8  # no refresh for this fraction of the lease: a peer may have taken it
EPERM_RETRIES = 5  # EPERM with no file there, this many times in a row, is a real refusal
LOST_CHECK_S = 0.1  # held claims are looked over for lost ones at most this often

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Held:
    """A claim this process holds."""

    unit: str  # the unit's name
    name: str  # the claim's name in the claims folder: <unit> or <unit>.<generation>
    generation: int  # 0 for a first claim, n for the n-th takeover
    handle: Any  # what its heartbeat writes through: an open fd (POSIX), a version (object store)
    touched: float  # time.monotonic() of the last successful refresh


@dataclass(frozen=True)
class Won:
    """A unit just claimed."""

    unit: str
    generation: int  # above 0: taken over from a dead or frozen runner
    marked_done: bool  # done/<unit> exists: some runner finished the unit (now or before)


def generation_path(claims: Path, unit: str, gen: int) -> Path:
    return claims / (unit if gen == 0 else f"{unit}.{gen}")


def parse_claim_name(name: str) -> tuple[str, int] | None:
    """`<unit>` or `<unit>.<gen>` -> (unit, gen); None for anything else."""
    unit, _, gen = name.partition(".")
    if not unit or not all(c in "0123456789abcdef" for c in unit):
        return None
    if not gen:
        return unit, 0
    return (unit, int(gen)) if gen.isdigit() else None


def listing(folder: Path) -> set[str]:
    """Names in a folder (one listing; none if it is missing)."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()


class Folder:
    """A folder used through one open descriptor, opened on first use: over SSHFS with
    caching off every path component is a lookup round trip, a name in an open folder
    is one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fd(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def open(self, name: str, flags: int) -> int:
        return os.open(name, flags, 0o644, dir_fd=self.fd())

    def stat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd(), follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.stat(name)
            return True
        except FileNotFoundError:
            return False

    def unlink(self, name: str) -> None:
        os.unlink(name, dir_fd=self.fd())

    def names(self) -> set[str]:
        # By path: SSHFS cannot rewind a folder descriptor (a second listing is empty).
        return listing(self.path)


class ClaimBook:
    """The claims one `run` process holds on one task's units: what is shared by every
    kind of root (which units are held, which were lost while frozen, when to refresh).
    A subclass says how one claim is made, refreshed and released on its store."""

    dir: Any  # where the claims are (a folder, or an object-name prefix), for fences

    def __init__(self, *, lease_s: float, clock: FsClock, pipelined: bool) -> None:
        self.lease_s = lease_s
        self.clock = clock
        self.pipelined = pipelined
        self.stamp = Stamp.mine().to_json().encode()  # written into each claim: who holds it
        self._held: dict[str, Held] = {}
        self._lost: list[str] = []  # units whose claim expired while held, not yet reported
        self._checked = 0.0  # time.monotonic() of the last check_lost
        self._lock = threading.Lock()

    # -- what each store does ----------------------------------------------------------
    def _acquire_one(self, unit: str) -> tuple[Held, bool] | None:
        """Claim one unit: (the claim, whether done/<unit> exists), or None if a live
        owner holds it."""
        raise NotImplementedError

    def _release_one(self, held: Held, done: bool) -> None:
        raise NotImplementedError

    def _rewrite(self, held: Held) -> bool:
        """One heartbeat of a held claim: True if it took (it carries the store's clock)."""
        raise NotImplementedError

    def _let_go(self, held: Held) -> None:
        """Stop renewing a claim that was lost (the claim itself stays)."""

    def _expired(self, held: Held) -> bool:
        """Our lease ran out while we worked: someone may hold the next generation now,
        and removing ours would let a newcomer claim generation 0 beside them. So a
        release leaves such a claim (it is swept once stale)."""
        if time.monotonic() - held.touched <= self.lease_s * LOST_FRACTION:
            return False
        logger.warning("claim %s expired while held (no refresh for %.0fs); leaving it",
                       held.name, time.monotonic() - held.touched)
        return True

    def close(self) -> None:
        """Release descriptors or connections."""

    def __len__(self) -> int:
        return len(self._held)

    def held(self, unit: str) -> bool:
        """True while this process holds `unit` and no peer can have taken it over."""
        self.check_lost()
        with self._lock:
            return unit in self._held

    # -- acquire -----------------------------------------------------------------------
    def acquire(self, units: Sequence[str]) -> tuple[list[Won], list[str]]:
        """Claim what can be claimed: returns (won, held by live others)."""
        todo = [u for u in units if u not in self._held]
        results = self.map(self._acquire_one, todo)
        won: list[Won] = []
        busy: list[str] = []
        with self._lock:
            for unit, got in zip(todo, results):
                if got is None:
                    busy.append(unit)
                else:
                    held, marked = got
                    self._held[unit] = held
                    won.append(Won(unit, held.generation, marked))
        return won, busy

    def generation(self, unit: str) -> int:
        with self._lock:
            held = self._held.get(unit)
        return held.generation if held is not None else 0

    # -- release -----------------------------------------------------------------------
    def release(self, units: Iterable[str], *, done: bool) -> None:
        """Give up claims; `done`: every key of these units is settled, so leave the
        marker that tells peers so (written before the claim goes: a peer that wins the
        claim next then sees the marker)."""
        with self._lock:
            held = [self._held.pop(u) for u in units if u in self._held]
        if held:
            self.map(lambda h: self._release_one(h, done), held)

    def release_all(self) -> None:
        self.release(list(self._held), done=False)

    # -- heartbeat ---------------------------------------------------------------------
    def check_lost(self) -> None:
        """Drop claims not refreshed for most of the lease (this process was frozen, or
        the mount hung): a peer may hold them now. They are reported by take_lost()."""
        now = time.monotonic()
        if now - self._checked < LOST_CHECK_S:
            return
        self._checked = now
        limit = now - self.lease_s * LOST_FRACTION
        with self._lock:
            lost = [h for h in self._held.values() if h.touched < limit]
            for h in lost:
                del self._held[h.unit]
                self._lost.append(h.unit)
        for h in lost:
            logger.warning("claim %s went %.0fs without a refresh (lease %.0fs): a peer may "
                           "have taken it over; leaving its keys to that peer", h.name,
                           time.monotonic() - h.touched, self.lease_s)
            self._let_go(h)

    def take_lost(self) -> list[str]:
        self.check_lost()
        with self._lock:
            lost, self._lost = self._lost, []
        return lost

    def refresh(self) -> int:
        """Rewrite the claims that are getting old (a heartbeat each); returns how many."""
        self.check_lost()
        now = time.monotonic()
        with self._lock:
            due = [h for h in self._held.values()
                   if now - h.touched > self.lease_s * REFRESH_FRACTION]
        for h in due:
            if self._rewrite(h):
                h.touched = time.monotonic()
        return len(due)

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items; concurrently on a network filesystem, where each call is a round
        trip and SSHFS pipelines concurrent requests over one connection."""
        if self.pipelined and len(items) > 1:
            with ThreadPoolExecutor(min(CLAIM_THREADS, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(i) for i in items]


class Claims(ClaimBook):
    """Claims on a folder (a local disk or an SSHFS mount; see the module docstring)."""

    def __init__(self, claims_dir: Path, done_dir: Path, *, lease_s: float, clock: FsClock,
                 pipelined: bool) -> None:
        super().__init__(lease_s=lease_s, clock=clock, pipelined=pipelined)
        self.dir = claims_dir
        self.done_dir = done_dir
        self.folder = Folder(claims_dir)
        self.done = Folder(done_dir)

    def _acquire_one(self, unit: str) -> tuple[Held, bool] | None:
        for gen in range(MAX_GENERATIONS):
            path = generation_path(self.dir, unit, gen)
            fd = self._create(path)
            if fd is None:
                try:
                    st = self.folder.stat(path.name)
                except FileNotFoundError:
                    fd = self._create(path)  # released between our create and our stat
                    if fd is None:
                        return None
                else:
                    age = self.clock.age(st.st_mtime)
                    if age < self.lease_s and not _holder_died_here(path):
                        return None  # a live owner holds it
                    logger.info("claim %s is %.0fs old (lease %.0fs) or its holder on this "
                                "host is gone: taking over", path.name, age, self.lease_s)
                    continue
            held = Held(unit, path.name, gen, fd, time.monotonic())
            return held, self.done.exists(unit)
        logger.warning("claim unit %s was taken over %d times; leaving it for this run",
                       unit, MAX_GENERATIONS)
        return None

    def _create(self, path: Path) -> int | None:
        """Exclusive create: the open file if we made it, None if someone else has it."""
        refusal: OSError | None = None
        for _ in range(EPERM_RETRIES):
            try:
                fd = self.folder.open(path.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                return None
            except PermissionError as e:
                # SSHFS reports a lost exclusive create as EPERM. The winner may even have
                # released the claim again before we look, so a missing file is not yet a
                # real refusal: only an EPERM that repeats with no file there is.
                if self.folder.exists(path.name):
                    return None
                refusal = e
            except OSError as e:
                if e.errno in ENV_ERRNOS:
                    raise fault(e.errno, self.dir) from e
                raise
        else:
            assert refusal is not None
            raise ClaimError(f"cannot create claim files in {self.dir}: {refusal.strerror}. Check "
                             "that this user may write the run root (and that the mount is "
                             "writable)") from refusal
        try:
            os.write(fd, self.stamp)
        except OSError as e:
            os.close(fd)
            # An empty claim we made would look like a live peer's to every runner until
            # the lease ran out (a full disk fails the write after the create succeeded)
            try:
                self.folder.unlink(path.name)
            except OSError:
                pass
            if e.errno in ENV_ERRNOS:
                raise fault(e.errno, self.dir) from e
            raise
        return fd

    def close(self) -> None:
        self.folder.close()
        self.done.close()

    def _rewrite(self, held: Held) -> bool:
        try:
            os.pwrite(held.handle, self.stamp[:1], 0)
            return True
        except OSError as e:
            logger.warning("could not refresh claim %s: %s", held.name, e)
            return False

    def _let_go(self, held: Held) -> None:
        try:
            os.close(held.handle)
        except OSError:
            pass

    def _release_one(self, held: Held, done: bool) -> None:
        self._let_go(held)
        if done:
            try:
                os.close(self.done.open(held.unit, os.O_CREAT | os.O_WRONLY))
            except OSError as e:
                logger.warning("could not mark unit %s done: %s", held.unit, e)
        if self._expired(held):
            return
        for gen in range(held.generation + 1):
            try:
                self.folder.unlink(generation_path(self.dir, held.unit, gen).name)
            except FileNotFoundError:
                pass


def _holder_died_here(path: Path) -> bool:
    """True if the claim's holder ran on this host and that process is gone. A VM that
    restarts after a preemption so takes back its own claims at once, without waiting
    out the lease; holders on other hosts are judged by the lease alone."""
    try:
        stamp = Stamp.from_json(path.read_text(encoding="utf-8"))
    except OSError:
        return False
    return stamp is not None and stamp.gone()


def live_claims(claims_dir: Path, *, lease_s: float, clock: FsClock) -> dict[str, float]:
    """Unit -> age in seconds of its freshest claim, for claims younger than the lease."""
    live: dict[str, float] = {}
    try:
        entries = list(os.scandir(claims_dir))
    except FileNotFoundError:
        return live
    for entry in entries:
        parsed = parse_claim_name(entry.name)
        if parsed is None:
            continue
        try:
            age = clock.age(entry.stat().st_mtime)
        except FileNotFoundError:
            continue
        if age < lease_s:
            unit = parsed[0]
            live[unit] = min(age, live.get(unit, age))
    return live


def sweep_claims(claims_dir: Path, done_units: set[str], *, lease_s: float,
                 clock: FsClock) -> int:
    """Remove stale claims on units whose keys are all done (left by owners that died
    after publishing). Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(claims_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        parsed = parse_claim_name(entry.name)
        if parsed is None or parsed[0] not in done_units:
            continue
        try:
            if clock.age(entry.stat().st_mtime) > lease_s:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
