"""Whether a recorded pid is still the process spotfan started: the one identity check before a signal.

A pid alone is not a process: once it exits, the kernel may give its number to another.
A `ProcRecord` keeps the start time with the pid (tasks.procs, the one identity check),
so a recycled pid is never signalled; `running` checks a pid file that a shell script wrote (a shell
cannot record a start time) by the command line that process must have.
"""
from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tasks.procs import boot_id, find_process, start_time


@dataclass(frozen=True)
class ProcRecord:
    """A process we started, recorded so that only that very process is ever signalled."""

    pid: int  # host pid
    started: float  # its start, seconds since boot (tasks.procs): a recycled pid has another one
    boot: str = ""  # the boot it ran in ("": not recorded)

    def process(self) -> psutil.Process | None:
        """The live process, or None if it exited (or its pid now belongs to someone else)."""
        try:
            return find_process(self.pid, self.started, self.boot)
        except psutil.Error:
            return None

    @classmethod
    def of(cls, pid: int) -> ProcRecord:
        return cls(pid=pid, started=start_time(pid), boot=boot_id())


def running(pid_file: Path, command: str) -> int | None:
    """The pid in `pid_file` if that process is alive and its command line holds `command`."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if command in cmdline else None


def stop_group(proc: subprocess.Popen[Any], *, wait_s: float) -> None:
    """End a child started in a session of its own, and everything in its process group:
    SIGTERM, up to `wait_s` to exit, then SIGKILL and as long again."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
