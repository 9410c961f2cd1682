"""What a run is asked to do and what it did: `DispatchOptions` (from `run`'s keyword
options) and `RunReport` (the summary `run` returns and `tasks run` prints)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.progress import ProgressFn
from tasks.runstate import StateFile


@dataclass(frozen=True, kw_only=True)
class DispatchOptions:
    """How one run dispatches work (from `run`'s keyword options)."""

    workers: int
    max_attempts: int
    limit: int | None
    chunk_size: int | None
    timeout_s: float | None
    lease_s: float
    progress: ProgressFn | None
    state: StateFile | None
    fetch_into: Path | None = None  # fetch inputs over the session into here (tasks.fetch)


@dataclass
class RunReport:
    """What one `run` did."""

    task: str  # the task's name
    root: Path  # the run root
    total: int = 0  # keys in the task
    done_before: int = 0  # keys already done when the run started
    ran: int = 0  # executions started by this run (retries count again)
    succeeded: int = 0  # keys this run published
    by_peers: int = 0  # keys this run claimed and then found finished by another runner
    failed: list[str] = field(default_factory=list)  # keys that reached --max-attempts
    left: int = 0  # keys not done at the end (--limit, or still held by live peers)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed
