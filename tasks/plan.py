"""A task's plan on the root (`plan.json`): how keys are grouped into claim units, and the
one lease every runner of the task judges claims by. The first runner writes it; every
later runner adopts it, so no runner can steal a live claim with a shorter `--lease`.
"""
from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.bounds import MAX_LEASE_S, MIN_LEASE_S
from tasks.errors import ClaimError, PlanError
from tasks.fs import atomic_write, create_only

logger = logging.getLogger(__name__)

PLAN_VERSION = 2
DEFAULT_LEASE_S = 120.0  # a claim not refreshed this long belongs to a dead (or frozen) runner
KEYS_PER_UNIT = 16  # keys per claim unit: one claim and one done marker per this many keys
MIN_UNITS = 256  # ... but at least this many units (or as many as keys): few slow keys must
#                  still spread over every VM, and the last unit claimed stays short
MAX_UNITS = 16384  # so a listing of claims/ or done/ stays a few hundred round trips
PLAN_READ_TRIES = 20  # a plan another runner is writing this instant: read again
PLAN_READ_WAIT_S = 0.05


@dataclass(frozen=True)
class Plan:
    """Fixed by the first runner of a task; every runner uses it as written."""

    units: int  # claim units; a key's unit is crc32(key) % units
    lease_s: float  # a claim or owner not refreshed this long (filesystem clock) is dead
    version: int = PLAN_VERSION
    created: float = 0.0  # seconds since the epoch, by the writer's clock (for people)

    def unit(self, key: str) -> str:
        """The claim unit of a key: a short hex name, the same on every machine (one
        string per unit, shared by all its keys: a million keys hold 16,384 names)."""
        return self._names[zlib.crc32(key.encode("utf-8", "surrogatepass")) % self.units]

    @functools.cached_property
    def _names(self) -> list[str]:
        return [f"{u:04x}" for u in range(self.units)]

    @classmethod
    def for_total(cls, total: int, lease_s: float) -> "Plan":
        units = min(MAX_UNITS, max(1, math.ceil(total / KEYS_PER_UNIT), min(total, MIN_UNITS)))
        return cls(units, lease_s, PLAN_VERSION, time.time())

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Parse and check a plan; ValueError saying what is wrong."""
        if not text.strip():
            raise ValueError("it is empty")
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"it is not JSON ({e})") from e
        if not isinstance(d, dict):
            raise ValueError("it is not a JSON object")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"it is of another spotfan version ({d.get('version', 'none')!r}, "
                             f"expected {PLAN_VERSION})")
        units, lease = d.get("units"), d.get("lease_s")
        if not isinstance(units, int) or isinstance(units, bool) or not 1 <= units <= MAX_UNITS:
            raise ValueError(f"units {units!r} is not a whole number from 1 to {MAX_UNITS}")
        if (not isinstance(lease, (int, float)) or isinstance(lease, bool)
                or not MIN_LEASE_S <= lease <= MAX_LEASE_S):
            raise ValueError(f"lease_s {lease!r} is not a number of seconds from "
                             f"{MIN_LEASE_S:.0f} to {MAX_LEASE_S:.0f}")
        created = d.get("created", 0.0)
        return cls(units, float(lease), PLAN_VERSION,
                   float(created) if isinstance(created, (int, float)) else 0.0)


def load_or_create(path: Path, *, total: int, lease_s: float | None,
                   runner_alive: Callable[[], bool]) -> Plan:
    """The task's plan: read it, or write it once, create-only (of two first runners, one
    plan wins and both use it). A damaged plan is rewritten when `runner_alive()` says no
    live runner holds the task; otherwise PlanError names the file to delete."""
    wanted = lease_s if lease_s is not None else DEFAULT_LEASE_S
    problem = ""
    for _ in range(PLAN_READ_TRIES):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if _create(path, Plan.for_total(total, wanted)):
                logger.info("wrote %s (lease %.0fs)", path, wanted)
            continue
        except OSError as e:
            raise ClaimError(f"cannot read {path}: {e.strerror}; check that the run root is "
                             "readable (and the mount alive)") from e
        try:
            plan = Plan.from_json(text)
        except ValueError as e:
            problem = str(e)
            time.sleep(PLAN_READ_WAIT_S)  # a writer of an older version between create and write
            continue
        if lease_s is not None and lease_s != plan.lease_s:
            logger.warning("--lease %gs differs from the lease of %gs that the first runner of "
                           "this task fixed in %s; using %gs, as every runner of the task must "
                           "(to change it, delete that file while no run of the task is active)",
                           lease_s, plan.lease_s, path, plan.lease_s)
        return plan
    if runner_alive():
        raise PlanError(f"{path} is damaged ({problem}) and a live runner holds this task; "
                        f"stop every run of the task, delete {path}, and run again")
    plan = Plan.for_total(total, wanted)
    logger.warning("%s was damaged (%s) and no live runner holds the task: rewriting it", path,
                   problem)
    atomic_write(path, plan.to_json())
    return plan


def _create(path: Path, plan: Plan) -> bool:
    try:
        return create_only(path, plan.to_json())
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    # No hard links here: exclusive-create the final name and fill it; a reader that
    # sees it empty for a moment reads again.
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except (FileExistsError, PermissionError):
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(plan.to_json())
    return True
