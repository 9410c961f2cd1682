"""Bounds of every number the engine's options take, and the checks that refuse nan, inf,
negative and huge values with a message that names the option and its range."""
from __future__ import annotations

import logging
import math
import os

from tasks.errors import SpecError

logger = logging.getLogger(__name__)

MIN_LEASE_S = 5.0  # shorter, and a claim could expire between two refreshes of a live worker
MAX_LEASE_S = 86400.0  # longer, and a dead VM's claims would hold its keys for over a day
MIN_TIMEOUT_S = 0.1  # --timeout: a key's longest run; shorter is no real task
MAX_TIMEOUT_S = 30 * 86400.0
MAX_ATTEMPTS_LIMIT = 100  # a key that failed this often is broken, not flaky
MAX_LIMIT = 10**9  # --limit: more keys than one run can list
MAX_CHUNK_SIZE = 100_000  # a fixed --chunk-size: keys one worker holds at once
MAX_READ_WORKERS = 256  # `collect --workers`: concurrent reads (threads)
WORKERS_PER_CPU_MAX = 8  # `run --workers` beyond this many per core is capped, with a warning
START_METHODS = ("forkserver", "spawn", "fork")  # `run --start-method`: the pool's choices


def count_problem(value: object, lo: int, hi: int) -> str | None:
    """Why `value` is not a whole number from lo to hi, or None."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        return f"must be a whole number from {lo} to {hi}, got {value!r}"
    return None


def seconds_problem(value: object, lo: float, hi: float) -> str | None:
    """Why `value` is not a finite number of seconds from lo to hi (nan and inf are not), or None."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not lo <= value <= hi):
        return f"must be a number of seconds from {lo:g} to {hi:g}, got {value!r}"
    return None


def check_count(option: str, value: object, lo: int, hi: int) -> None:
    why = count_problem(value, lo, hi)
    if why is not None:
        raise SpecError(f"{option} {why}")


def check_seconds(option: str, value: object, lo: float, hi: float) -> None:
    why = seconds_problem(value, lo, hi)
    if why is not None:
        raise SpecError(f"{option} {why}")


def worker_count(workers: int | None) -> int:
    """How many worker processes to start: one per core by default; more than
    WORKERS_PER_CPU_MAX per core is capped there, with a warning (each worker is a process
    with its own memory: past a few per core only tasks that wait on I/O gain, and
    thousands would exhaust the machine rather than speed it up)."""
    cpus = os.cpu_count() or 1
    if workers is None:
        return cpus
    cap = WORKERS_PER_CPU_MAX * cpus
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SpecError(f"--workers must be a whole number of at least 1, got {workers!r}")
    if workers > cap:
        logger.warning("--workers %d is far above this machine's %d core(s): starting %d "
                       "(at most %d per core)", workers, cpus, cap, WORKERS_PER_CPU_MAX)
        return cap
    return workers
