"""Whether a recorded pid is still the process it was: the one process-identity check of both packages.

A pid alone is not a process: once it exits, the kernel may give its number to another.
So every record of a process keeps its start time beside the pid, and a process is the
recorded one only if both agree. The start time is the process's start tick since boot
(/proc/PID/stat), not psutil's create_time: that is the boot time plus the tick, and Linux
derives the boot time (/proc/stat btime) from the wall clock, so a clock step (NTP at a
VM's boot, a hypervisor's correction) moves every create_time at once and a live process
would look gone (measured here: one step of 11 s left the lab's head running untracked,
`fab down` did not stop it and `fab up` called its port taken). Ticks since boot repeat
after a reboot, so each record also names the boot (/proc/sys/kernel/random/boot_id).
"""
from __future__ import annotations

import functools
import os

import psutil

TICK_SLACK_S = 0.02  # start ticks are exact (1/100 s): a reading's rounding, no more
EPOCH_FLOOR = 1e9  # a start time above this is an epoch (psutil create_time, spotfan before 2026-12-03)
EPOCH_SLACK_S = 1.0  # two create_time readings of one process may differ by a second
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id() -> str:
    """This boot of this machine ("" where the kernel does not say)."""
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def start_time(pid: int) -> float:
    """When process `pid` started, in seconds since boot (psutil.NoSuchProcess if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold spaces
        return int(fields[19]) / _ticks_per_second()  # field 22: starttime
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    except (OSError, IndexError, ValueError):
        p = psutil.Process(pid)  # no /proc of this shape: psutil's, taken in one reading
        return p.create_time() - psutil.boot_time()


@functools.cache
def _ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def find_process(pid: int, started: float, boot: str | None = None) -> psutil.Process | None:
    """The live process with this pid and start time (of boot `boot`, if the record names
    one); None if it exited, is a zombie, or its pid now belongs to another process. Raises
    psutil.AccessDenied (a psutil.Error) when this user may not look, so that callers decide
    what not knowing means."""
    if boot and boot_id() and boot != boot_id():
        return None  # recorded in an earlier boot: that process is long gone
    try:
        p = psutil.Process(pid)
        if started > EPOCH_FLOOR:  # a record from before start ticks
            same = abs(p.create_time() - started) <= EPOCH_SLACK_S
        else:
            same = abs(start_time(pid) - started) <= TICK_SLACK_S
        if not same or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.NoSuchProcess:
        return None
