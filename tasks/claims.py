"""Claims: exclusive-create files under the root that keep live workers off each other's keys.

A claim on a key is the file `claims/<id>` created with O_CREAT|O_EXCL; its mtime is its
heartbeat. A claim whose mtime is older than the lease belongs to a dead (or stuck) owner
and is taken over by creating the next generation, `claims/<id>.1`, `<id>.2`, ... again
with O_EXCL, so that of two takers only one wins. Works over SSHFS, where a lost
exclusive create fails with EPERM rather than EEXIST.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ClaimError
from tasks.keys import Item
from tasks.layout import key_id

logger = logging.getLogger(__name__)

MAX_GENERATIONS = 32  # takeovers of one key before we give up on it for this run
CLAIM_THREADS = 16  # concurrent claim round trips on a network filesystem
REFRESH_FRACTION = 0.25  # refresh a claim once it is this fraction of the lease old
ZOMBIE_FRACTION = 0.9  # past this fraction of the lease without a refresh, assume takeover


@dataclass
class Held:
    """A claim this process holds."""

    path: Path  # the claim file
    generation: int  # 0 for a first claim, n for the n-th takeover
    touched: float  # time.monotonic() of the last successful refresh


def generation_path(claims: Path, kid: str, gen: int) -> Path:
    return claims / (kid if gen == 0 else f"{kid}.{gen}")


def parse_claim_name(name: str) -> tuple[str, int] | None:
    """`<id>` or `<id>.<gen>` -> (id, gen); None for anything else."""
    kid, _, gen = name.partition(".")
    if len(kid) != 40:
        return None
    if not gen:
        return kid, 0
    return (kid, int(gen)) if gen.isdigit() else None


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
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    # -- acquire -----------------------------------------------------------------------
    def acquire(self, items: Sequence[Item], *, published: Callable[[Item], bool] | None = None
                ) -> tuple[list[Item], list[Item], list[Item]]:
        """Claim what can be claimed. Returns (claimed, held by live others, already
        published). `published` is checked after a claim is won, because a peer may have
        finished the key since we listed the output folders."""
        with self._lock:
            mine = [it for it in items if it.key in self._held]
        todo = [it for it in items if it.key not in self._held]

        def one(item: Item) -> tuple[str, Held | None]:
            held = self._acquire_one(item)
            if held is None:
                return "busy", None
            if published is not None and published(item):
                self._release_one(held)
                return "published", None
            return "claimed", held

        results = self._map(one, todo)
        claimed, busy, done = list(mine), [], []
        with self._lock:
            for item, (what, held) in zip(todo, results):
                if held is not None:
                    self._held[item.key] = held
                    claimed.append(item)
                else:
                    (busy if what == "busy" else done).append(item)
        return claimed, busy, done

    def _acquire_one(self, item: Item) -> Held | None:
        kid = key_id(item.key)
        for gen in range(MAX_GENERATIONS):
            path = generation_path(self.dir, kid, gen)
            if self._create(path):
                return Held(path, gen, time.monotonic())
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                # released between our create and our stat: one more try at this generation
                return Held(path, gen, time.monotonic()) if self._create(path) else None
            if age < self.lease_s:
                return None  # a live owner holds it
            logger.info("claim %s on key %r is %.0fs old (lease %.0fs): taking over",
                        path.name, item.key, age, self.lease_s)
        logger.warning("key %r was taken over %d times; leaving it for this run",
                       item.key, MAX_GENERATIONS)
        return None

    def _create(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except PermissionError as e:
            # SSHFS reports a lost exclusive create as EPERM; tell it from a real refusal.
            if os.path.lexists(path):
                return False
            raise ClaimError(f"cannot create claim files in {self.dir}: {e.strerror}. Check that "
                             "this user may write the run root (and that the mount is writable)") from e
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise ClaimError(f"the run root is unreachable ({e.strerror}): the shared mount "
                                 "is dead; remount it (fab heal) and run again") from e
            raise
        os.close(fd)
        return True

    # -- release -----------------------------------------------------------------------
    def release(self, keys: Iterable[str]) -> None:
        """Give up claims on keys (done, failed, or handed back)."""
        with self._lock:
            held = [self._held.pop(k) for k in keys if k in self._held]
        if held:
            self._map(self._release_one, held)

    def release_all(self) -> None:
        self.release(list(self._held))

    def _release_one(self, held: Held) -> None:
        if time.monotonic() - held.touched > self.lease_s * ZOMBIE_FRACTION:
            # Our lease ran out while we worked: someone may hold the next generation now,
            # and removing ours would let a newcomer claim generation 0 beside them.
            logger.warning("claim %s expired while running (no refresh for %.0fs); leaving it",
                           held.path.name, time.monotonic() - held.touched)
            return
        kid = held.path.name.partition(".")[0]
        for gen in range(held.generation + 1):
            try:
                generation_path(self.dir, kid, gen).unlink()
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

    def _map(self, fn, items):  # type: ignore[no-untyped-def]
        if self.pipelined and len(items) > 1:
            with ThreadPoolExecutor(min(CLAIM_THREADS, len(items))) as pool:
                return list(pool.map(fn, items))
        return [fn(i) for i in items]


def live_claims(claims_dir: Path, *, lease_s: float) -> dict[str, float]:
    """Key id -> age in seconds of its freshest claim, for claims younger than the lease."""
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
            kid = parsed[0]
            live[kid] = min(age, live.get(kid, age))
    return live


def sweep_claims(claims_dir: Path, done_ids: set[str], *, lease_s: float) -> int:
    """Remove stale claims on keys that are already done (left by owners that died after
    publishing). Returns how many were removed."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(claims_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        parsed = parse_claim_name(entry.name)
        if parsed is None or parsed[0] not in done_ids:
            continue
        try:
            if now - entry.stat().st_mtime > lease_s:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    return removed
