"""The owner file of a live `run` and its heartbeat, and the sweep of what dead owners left.

`owners/<owner>.json` (an `OwnerRecord`) says who is working on the root; its mtime is the
heartbeat, rewritten by a write (so it carries the filesystem's clock) and read back to
learn that clock (`fs.FsClock`). An owner whose file is older than the plan's lease, on
that clock, is dead or frozen: a peer may take its claims and sweep its temporaries, and
the owner, if it comes back, finds its file gone and registers again.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from tasks.claims import Claims, sweep_claims
from tasks.fs import FsClock
from tasks.layout import Layout
from tasks.records import OwnerRecord

logger = logging.getLogger(__name__)

HEARTBEAT_MAX_S = 30.0  # owners and their claims are touched at least this often
HEARTBEAT_FRACTION = 0.2  # ... and at least this often as a fraction of the lease


def heartbeat_interval(lease_s: float) -> float:
    return min(lease_s * HEARTBEAT_FRACTION, HEARTBEAT_MAX_S)


class Owner:
    """This process's owner file and its temporaries folder on the root."""

    def __init__(self, layout: Layout, record: OwnerRecord, clock: FsClock) -> None:
        self.layout = layout
        self.record = record
        self.clock = clock
        self.path = layout.owner_file(record.owner)
        self.tmp = layout.owner_tmp(record.owner)
        self._fd: int | None = None
        self._lock = threading.Lock()
        self.reregistered = 0  # times a peer judged us dead and we came back

    def register(self) -> None:
        """Write the owner file (before the temporaries folder: a folder without a fresh
        owner file may be swept), open it for heartbeats, and learn the filesystem clock."""
        with self._lock:
            self.layout.owners.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
            os.write(fd, self.record.to_json())
            if self._fd is not None:
                os.close(self._fd)
            self._fd = fd
            self.clock.sync(fd, b"{", self.path)
            self.tmp.mkdir(parents=True, exist_ok=True)

    def beat(self) -> None:
        """One heartbeat; registers again if a peer swept us as dead meanwhile."""
        with self._lock:
            fd = self._fd
        if fd is None:
            return
        try:
            self.clock.sync(fd, b"{", self.path)
        except FileNotFoundError:
            self.reregistered += 1
            logger.warning("this runner's owner file %s was removed (a peer judged it dead: "
                           "was it frozen for longer than the lease?); registering again",
                           self.path.name)
            self.register()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.path.unlink(missing_ok=True)


class Heartbeat:
    """Beats the owner file and refreshes ageing claims until stopped."""

    def __init__(self, owner: Owner, claims: Claims, interval_s: float) -> None:
        self.owner = owner
        self.claims = claims
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spotfan-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.claims.check_lost()  # before the beat: a gap means we were frozen
                self.owner.beat()
                self.claims.refresh()
            except OSError as e:  # a flaky mount must not kill the run; claims may expire
                logger.warning("heartbeat failed: %s", e)


@dataclass(frozen=True)
class LiveOwner:
    """An owner file younger than the lease."""

    record: OwnerRecord
    age: float  # seconds since its last heartbeat, on the filesystem's clock


def live_owners(layout: Layout, *, lease_s: float, clock: FsClock,
                task: str | None = None) -> list[LiveOwner]:
    """Owners with a fresh heartbeat (of `task`, if given), by name."""
    found: list[LiveOwner] = []
    try:
        entries = list(os.scandir(layout.owners))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue
        try:
            age = clock.age(entry.stat().st_mtime)
            if age >= lease_s:
                continue
            record = OwnerRecord.from_json(Path(entry.path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if record is not None and (task is None or record.task == task):
            found.append(LiveOwner(record, round(max(age, 0.0), 1)))
    return sorted(found, key=lambda o: o.record.owner)


def sweep(layout: Layout, *, lease_s: float, clock: FsClock, done_units: set[str],
          me: str = "") -> None:
    """Remove what dead owners left: their temporaries and owner files (only those whose
    heartbeat is older than the lease, or whose process on this host is gone: never a
    live owner's), and stale claims on finished units."""
    try:
        names = {e.name for e in os.scandir(layout.tmp) if e.is_dir()} - {me}
    except FileNotFoundError:
        names = set()
    for name in names:
        f = layout.owner_file(name)
        try:
            st = f.stat()
            dead = clock.age(st.st_mtime) > lease_s
            if not dead:
                record = OwnerRecord.from_json(f.read_text(encoding="utf-8"))
                dead = record is not None and record.stamp.gone()
        except FileNotFoundError:
            try:  # no owner file: dead, unless its owner is between the two creates
                dead = clock.age((layout.tmp / name).stat().st_mtime) > lease_s
            except FileNotFoundError:
                continue
        except (OSError, UnicodeDecodeError):
            continue
        if dead:
            shutil.rmtree(layout.tmp / name, ignore_errors=True)
            f.unlink(missing_ok=True)
            logger.info("swept temporaries of dead runner %s", name)
    if done_units:
        removed = sweep_claims(layout.claims, done_units, lease_s=lease_s, clock=clock)
        if removed:
            logger.info("swept %d stale claims on finished units", removed)

