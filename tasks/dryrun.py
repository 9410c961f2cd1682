"""`run --dry-run`: what a run would do, read from the root alone; it takes no claim and writes nothing."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.chunks import MAX_CHUNK, TARGET_CHUNK_S
from tasks.layout import Layout
from tasks.plan import DEFAULT_LEASE_S, Plan
from tasks.records import FailureStore
from tasks.runner import RunOptions
from tasks.scan import scan_done
from tasks.spec import CmdTask, Task

SHOWN_KEYS = 10  # keys (and command lines) a dry run lists


@dataclass(frozen=True)
class Chunking:
    """How the run would send keys to its workers and group them into claims."""

    workers: int  # worker processes on this machine
    chunk_size: int | None  # keys per chunk when fixed (--chunk-size); None: adaptive
    first_chunk: int  # keys in each worker's first chunk
    units: int  # claim units of the task's plan (one claim covers one unit's keys)
    lease_s: float  # the plan's lease
    plan_exists: bool  # False: the first real run writes a plan with these numbers

    def describe(self) -> str:
        sizing = (f"{self.chunk_size} key(s) per chunk (--chunk-size)" if self.chunk_size else
                  f"adaptive chunks: {self.first_chunk} key per chunk at first, then sized to about "
                  f"{TARGET_CHUNK_S:g}s of work each (at most {MAX_CHUNK} keys)")
        plan = "its plan" if self.plan_exists else "the plan the first run will write"
        return (f"{self.workers} worker(s), {sizing}; {self.units} claim unit(s) of keys, "
                f"lease {self.lease_s:g}s ({plan})")


@dataclass(frozen=True)
class DryRun:
    """What `run` would do now; total = done + failed + left."""

    task: str
    root: str
    total: int  # keys of the task
    done: int  # output exists
    failed: int  # gave up in earlier runs (not run again without --retry-failed)
    retrying: int  # failed before but under --max-attempts: among `left`
    left: int  # keys a run would try
    would_run: int  # of those, at most --limit
    keys: list[str]  # the first keys it would run (in key order; a run shuffles them)
    commands: list[str]  # for --cmd: their command lines, as `/bin/sh -c` would get them
    chunking: Chunking

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def dry_run(task: Task, *, root: str | Path = ".", workers: int | None = None,
            limit: int | None = None, retry_failed: bool = False, chunk_size: int | None = None,
            lease_s: float | None = None, shown: int = SHOWN_KEYS) -> DryRun:
    """The counts and first keys of a run of `task` with these options; reads only."""
    root = Path(root).resolve()
    n_workers = RunOptions(workers=workers, limit=limit, chunk_size=chunk_size,
                           lease_s=lease_s).check(root)  # the bounds a real run checks
    layout = Layout(root, task.name)
    items = task.items(root)
    done = scan_done(root, items)
    failures = FailureStore(layout.failed, layout.tmp).load()
    gave_up = set() if retry_failed else {k for k, f in failures.items() if f.gave_up and k not in done}
    pending = [it for it in done.left if it.key not in gave_up]
    retrying = sum(1 for it in pending if it.key in failures)
    would = len(pending) if limit is None else min(limit, len(pending))
    first = pending[:min(shown, would)]
    commands = []
    if isinstance(task, CmdTask):
        commands = [task.command_line(it, root / it.out, root) for it in first]
    plan = _plan(layout)
    chunking = Chunking(
        workers=n_workers, chunk_size=chunk_size, first_chunk=chunk_size or 1,
        units=plan.units if plan else Plan.for_total(len(items), DEFAULT_LEASE_S).units,
        lease_s=plan.lease_s if plan else (lease_s or DEFAULT_LEASE_S), plan_exists=plan is not None)
    return DryRun(task.name, str(root), len(items), len(done), len(gave_up), retrying, len(pending),
                  would, [it.key for it in first], commands, chunking)


def _plan(layout: Layout) -> Plan | None:
    try:
        return Plan.from_json(layout.plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
