"""Whether a recorded pid is still the process it was: the one process-identity check of both packages.

A pid alone is not a process: once it exits, the kernel may give its number to another.
So every record of a process keeps its start time (psutil's create_time) beside the pid,
and a process is the recorded one only if both agree.
"""
from __future__ import annotations

import psutil

# psutil's create_time is the boot time plus the process's start tick, and Linux derives the
# boot time (/proc/stat btime) from the clock minus the uptime: two readings for one process
# may differ by a second. A pid reused within a second of its first owner's start is not a
# case worth a false "gone" (which would let a peer take a live claim over).
START_SLACK_S = 1.0


def find_process(pid: int, started: float) -> psutil.Process | None:
    """The live process with this pid and start time; None if it exited, is a zombie, or its
    pid now belongs to another process. Raises psutil.AccessDenied (a psutil.Error) when
    this user may not look, so that callers decide what not knowing means."""
    try:
        p = psutil.Process(pid)
        if abs(p.create_time() - started) > START_SLACK_S or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.NoSuchProcess:
        return None


def start_time(pid: int) -> float:
    """The start time to record with `pid` (psutil.NoSuchProcess if it is gone already)."""
    return psutil.Process(pid).create_time()
