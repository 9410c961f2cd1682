"""Progress of a run: the Snapshot the runner reports, shown as a live bar on a terminal
and as plain log lines everywhere else."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

PLAIN_EVERY_S = 10.0  # a plain progress line at most this often


@dataclass(frozen=True)
class Snapshot:
    """Progress of a run, as shown to the user."""

    task: str  # the task's name
    total: int  # keys in the task
    done: int  # keys whose output exists (before this run or by it)
    failed: int  # keys that reached --max-attempts
    running: int  # keys in flight in this process
    rate: float  # keys finished per second over the last minute
    elapsed: float  # seconds since this run started

    @property
    def eta(self) -> float | None:
        left = self.total - self.done - self.failed
        return left / self.rate if self.rate > 0 else None


ProgressFn = Callable[[Snapshot], None]


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def line(s: Snapshot) -> str:
    pct = 100.0 * s.done / s.total if s.total else 100.0
    return (f"{s.task}: {s.done}/{s.total} done ({pct:.1f}%), {s.failed} failed, "
            f"{s.running} running, {s.rate:.1f}/s, ETA {fmt_eta(s.eta)}")


class PlainProgress:
    """One line every PLAIN_EVERY_S seconds and one at the end, for logs and pipes."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.last = time.monotonic()  # first line after PLAIN_EVERY_S: early rates mislead
        self.latest: Snapshot | None = None

    def __call__(self, s: Snapshot) -> None:
        self.latest = s
        now = time.monotonic()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            print(line(s), file=self.stream, flush=True)

    def close(self) -> None:
        if self.latest is not None:
            print(line(self.latest), file=self.stream, flush=True)


class RichProgress:
    """A live bar with done/total, rate and ETA."""

    def __init__(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[extra]}"),
                                  TimeElapsedColumn(), transient=False)
        self._id: int | None = None

    def __call__(self, s: Snapshot) -> None:
        extra = f"{s.rate:.1f}/s  ETA {fmt_eta(s.eta)}  failed {s.failed}  running {s.running}"
        if self._id is None:
            self._progress.start()
            self._id = self._progress.add_task(s.task, total=s.total, extra=extra)
        self._progress.update(self._id, completed=s.done, extra=extra)

    def close(self) -> None:
        if self._id is not None:
            self._progress.stop()


def make_progress(stream: TextIO = sys.stderr) -> PlainProgress | RichProgress:
    return RichProgress() if stream.isatty() else PlainProgress(stream)
