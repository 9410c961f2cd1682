"""Claims: exclusive-create files under the root that keep live workers off each other's keys.

A claim covers one *unit*: a group of keys whose ids share a prefix (see `ClaimPlan`), so
that a chunk of tiny tasks costs one claim file, not one per key. The claim is the file
`claims/<unit>` created with O_CREAT|O_EXCL; its mtime is its heartbeat. A claim whose
mtime is older than the lease belongs to a dead (or stuck) owner and is taken over by
creating the next generation, `claims/<unit>.1`, `<unit>.2`, ... again with O_EXCL, so
that of two takers only one wins. Works over SSHFS, where a lost exclusive create fails
with EPERM rather than EEXIST.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from tasks.errors import ClaimError
from tasks.layout import key_id

logger = logging.getLogger(__name__)

MAX_GENERATIONS = 32  # takeovers of one unit before we give up on it for this run
PER_KEY_CLAIMS_UP_TO = 4096  # tasks with at most this many keys claim key by key
UNIT_PREFIX = 3  # larger tasks: one claim per 3-hex-digit key-id prefix (4,096 units)
CLAIM_THREADS = 16  # concurrent claim round trips on a network filesystem
REFRESH_FRACTION = 0.25  # refresh a claim once it is this fraction of the lease old
ZOMBIE_FRACTION = 0.9  # past this fraction of the lease without a refresh, assume takeover
PID_START_SLACK_S = 1.0
EPERM_RETRIES = 5  # EPERM with no file there, this many times in a row, is a real refusal  # process start times read twice may differ by rounding


@dataclass
class Held:
    """A claim this process holds."""

    path: Path  # the claim file
    generation: int  # 0 for a first claim, n for the n-th takeover
    touched: float  # time.monotonic() of the last successful refresh


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


@dataclass(frozen=True)
class ClaimPlan:
    """How keys are grouped into claim units, fixed per task so every runner agrees.

    Tasks with few keys claim key by key (prefix 40: the whole key id); tasks with many
    claim by the first `prefix` hex digits of the key id, at most 16**prefix claim
    files however many keys there are: 4,096 for prefix 3.
    """

    prefix: int  # hex digits of the key id that name a unit; 40 = one key per unit

    def unit(self, key: str) -> str:
        return key_id(key)[: self.prefix]

    @classmethod
    def for_total(cls, total: int) -> "ClaimPlan":
        if total <= PER_KEY_CLAIMS_UP_TO:
            return cls(40)
        return cls(UNIT_PREFIX)

    @classmethod
    def load_or_create(cls, task_dir: Path, total: int) -> "ClaimPlan":
        """The task's plan: read it, or write it once (O_EXCL: of two first runners, one
        plan wins and both use it)."""
        path = task_dir / "plan.json"
        for _ in range(MAX_GENERATIONS):
            try:
                text = path.read_text(encoding="utf-8")
                if not text.strip():  # its writer is between create and write
                    time.sleep(0.05)
                    continue
                return cls(int(json.loads(text)["claim_prefix"]))
            except FileNotFoundError:
                pass
            except (ValueError, KeyError, TypeError) as e:
                raise ClaimError(f"{path} is damaged ({e}); delete it only when no run of this "
                                 "task is active, and run again") from e
            plan = cls.for_total(total)
            tmp = task_dir / f".plan-{os.getpid()}-{threading.get_ident()}.json"
            tmp.write_text(json.dumps({"claim_prefix": plan.prefix}), encoding="utf-8")
            try:
                os.link(tmp, path)  # atomic, never replaces: local filesystems
            except OSError:
                # SSHFS has no hard links: exclusive-create the final name and fill it
                # through its open descriptor; readers that see it empty retry.
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(json.dumps({"claim_prefix": plan.prefix}))
                except (FileExistsError, PermissionError):
                    pass
            finally:
                tmp.unlink(missing_ok=True)
            time.sleep(0.01)
        raise ClaimError(f"cannot read or write {path}; check that the run root is writable")


@dataclass(frozen=True)
class Stamp:
    """Who holds a claim: enough to tell, on the same host, that the holder is gone."""

    host: str  # socket.gethostname() of the holder (a lab VM has its own)
    pid: int  # the holder's process id, in its own PID namespace
    started: float  # the holder's process start time, so a reused pid is not mistaken

    @classmethod
    def mine(cls) -> "Stamp":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started})

    @classmethod
    def from_json(cls, text: str) -> "Stamp | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]))
        except (ValueError, KeyError, TypeError):
            return None  # empty (holder died between create and write) or foreign


    def gone(self) -> bool:
        """True if this holder ran on this host and its process is gone (or its pid now
        belongs to another process). Holders on other hosts are never judged gone here."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > PID_START_SLACK_S
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:
            return False


def _holder_died_here(path: Path) -> bool:
    """True if the claim's holder ran on this host and that process is gone. A VM that
    restarts after a preemption so takes back its own claims at once, without waiting
    out the lease; holders on other hosts are judged by the lease alone."""
    try:
        stamp = Stamp.from_json(path.read_text(encoding="utf-8"))
    except OSError:
        return False
    return stamp is not None and stamp.gone()


def network_filesystem(path: Path) -> bool:
    """True if `path` lives on a network or FUSE filesystem (each operation a round trip)."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
        return fstype.startswith(("fuse", "nfs", "cifs", "smb"))
    except OSError:
        return False


class Claims:
    """The claims one `run` process holds on one task's keys."""

    def __init__(self, claims_dir: Path, *, lease_s: float, pipelined: bool) -> None:
        self.dir = claims_dir
        self.lease_s = lease_s
        self.pipelined = pipelined
        self.stamp = Stamp.mine().to_json().encode()  # written into each claim: who holds it
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    # -- acquire -----------------------------------------------------------------------
    def acquire(self, units: Sequence[str]) -> tuple[list[str], list[str]]:
        """Claim what can be claimed: returns (won, held by live others). Units this
        process already holds count as won."""
        with self._lock:
            mine = [u for u in units if u in self._held]
        todo = [u for u in units if u not in self._held]
        results = self.map(self._acquire_one, todo)
        won, busy = list(mine), []
        with self._lock:
            for unit, held in zip(todo, results):
                if held is None:
                    busy.append(unit)
                else:
                    self._held[unit] = held
                    won.append(unit)
        return won, busy

    def _acquire_one(self, unit: str) -> Held | None:
        for gen in range(MAX_GENERATIONS):
            path = generation_path(self.dir, unit, gen)
            if self._create(path):
                return Held(path, gen, time.monotonic())
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                # released between our create and our stat: one more try at this generation
                return Held(path, gen, time.monotonic()) if self._create(path) else None
            if age < self.lease_s and not _holder_died_here(path):
                return None  # a live owner holds it
            logger.info("claim %s is %.0fs old (lease %.0fs) or its holder on this host is "
                        "gone: taking over", path.name, age, self.lease_s)
        logger.warning("claim unit %s was taken over %d times; leaving it for this run",
                       unit, MAX_GENERATIONS)
        return None

    def _create(self, path: Path) -> bool:
        """Exclusive create: True if we made the file, False if someone else has it."""
        for _ in range(EPERM_RETRIES):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                return False
            except PermissionError as e:
                # SSHFS reports a lost exclusive create as EPERM. The winner may even have
                # released the claim again before we look, so a missing file is not yet a
                # real refusal: only an EPERM that repeats with no file there is.
                if os.path.lexists(path):
                    return False
                refusal = e
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    raise ClaimError(f"the run root is unreachable ({e.strerror}): the shared mount "
                                     "is dead; remount it (fab heal) and run again") from e
                raise
        else:
            raise ClaimError(f"cannot create claim files in {self.dir}: {refusal.strerror}. Check "
                             "that this user may write the run root (and that the mount is "
                             "writable)") from refusal
        try:
            os.write(fd, self.stamp)
        finally:
            os.close(fd)
        return True

    def generation(self, unit: str) -> int:
        """The generation of a held claim: above 0 means we took it over from a dead owner."""
        with self._lock:
            held = self._held.get(unit)
        return held.generation if held is not None else 0

    # -- release -----------------------------------------------------------------------
    def release(self, units: Iterable[str]) -> None:
        """Give up claims (their keys are done, failed, or handed back)."""
        with self._lock:
            held = [self._held.pop(u) for u in units if u in self._held]
        if held:
            self.map(self._release_one, held)

    def release_all(self) -> None:
        self.release(list(self._held))

    def _release_one(self, held: Held) -> None:
        if time.monotonic() - held.touched > self.lease_s * ZOMBIE_FRACTION:
            # Our lease ran out while we worked: someone may hold the next generation now,
            # and removing ours would let a newcomer claim generation 0 beside them.
            logger.warning("claim %s expired while running (no refresh for %.0fs); leaving it",
                           held.path.name, time.monotonic() - held.touched)
            return
        unit = held.path.name.partition(".")[0]
        for gen in range(held.generation + 1):
            try:
                generation_path(self.dir, unit, gen).unlink()
            except FileNotFoundError:
                pass

    # -- heartbeat ---------------------------------------------------------------------
    def refresh(self) -> int:
        """Touch claims that are getting old; returns how many were touched."""
        now = time.monotonic()
        with self._lock:
            due = [h for h in self._held.values()
                   if now - h.touched > self.lease_s * REFRESH_FRACTION]
        for h in due:
            try:
                os.utime(h.path)
                h.touched = time.monotonic()
            except FileNotFoundError:
                logger.warning("claim %s vanished while held (swept as stale?)", h.path.name)
        return len(due)

    def map(self, fn, items):  # type: ignore[no-untyped-def]
        """fn over items; concurrently on a network filesystem, where each call is a round
        trip and SSHFS pipelines concurrent requests over one connection."""
        if self.pipelined and len(items) > 1:
            with ThreadPoolExecutor(min(CLAIM_THREADS, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(i) for i in items]


def live_claims(claims_dir: Path, *, lease_s: float) -> dict[str, float]:
    """Unit -> age in seconds of its freshest claim, for claims younger than the lease."""
    live: dict[str, float] = {}
    now = time.time()
    try:
        entries = list(os.scandir(claims_dir))
    except FileNotFoundError:
        return live
    for entry in entries:
        parsed = parse_claim_name(entry.name)
        if parsed is None:
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < lease_s:
            unit = parsed[0]
            live[unit] = min(age, live.get(unit, age))
    return live


def sweep_claims(claims_dir: Path, done_units: set[str], *, lease_s: float) -> int:
    """Remove stale claims on units whose keys are all done (left by owners that died
    after publishing). Returns how many were removed."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(claims_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        parsed = parse_claim_name(entry.name)
        if parsed is None or parsed[0] not in done_units:
            continue
        try:
            if now - entry.stat().st_mtime > lease_s:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
