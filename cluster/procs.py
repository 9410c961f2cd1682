"""Whether a recorded pid is still the process spotfan started: the one identity check before a signal.

A pid alone is not a process: once it exits, the kernel may give its number to another.
A `ProcRecord` keeps the start time with the pid (psutil's create_time), so a recycled
pid is never signalled; `running` checks a pid file that a shell script wrote (a shell
cannot record a start time) by the command line that process must have.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psutil

START_SLACK_S = 0.01  # create_time read twice for one process agrees to far better than this


@dataclass(frozen=True)
class ProcRecord:
    """A process we started, recorded so that only that very process is ever signalled."""

    pid: int  # host pid
    started: float  # psutil create_time(): a recycled pid has another one

    def process(self) -> psutil.Process | None:
        """The live process, or None if it exited (or its pid now belongs to someone else)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.started) > START_SLACK_S or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    @classmethod
    def of(cls, pid: int) -> ProcRecord:
        return cls(pid=pid, started=psutil.Process(pid).create_time())


def running(pid_file: Path, command: str) -> int | None:
    """The pid in `pid_file` if that process is alive and its command line holds `command`."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except (OSError, ValueError, psutil.Error):
        return None
    return pid if command in cmdline else None
