"""`run --dry-run`: what a run would do, read from the root alone; it takes no claim and writes nothing."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.chunks import MAX_CHUNK, TARGET_CHUNK_S
from tasks.items import Item
from tasks.layout import Layout
from tasks.plan import DEFAULT_LEASE_S, Plan
from tasks.records import Failure, FailureStore
from tasks.runner import RunOptions
from tasks.scan import DoneKeys, scan_done
from tasks.spec import CmdTask, Task
from tasks.layout import is_object_url

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
    """The counts and first keys of a run of `task` with these options; reads only. On an
    object-store root (`s3://B/P`, `gs://B/P`) only reads are sent to the store, and the
    command lines show paths relative to the root (a command gets local copies there)."""
    opts = RunOptions(workers=workers, limit=limit, chunk_size=chunk_size, lease_s=lease_s)
    if is_object_url(str(root)):
        n_workers = opts.check(None)  # the bounds a real run checks
        seen = _bucket_seen(task, str(root))
    else:
        here = Path(root).resolve()
        n_workers = opts.check(here)
        seen = _folder_seen(task, here)
    items, done, failures, plan = seen.items, seen.done, seen.failures, seen.plan
    gave_up = set() if retry_failed else {k for k, f in failures.items() if f.gave_up and k not in done}
    pending = [it for it in done.left if it.key not in gave_up]
    retrying = sum(1 for it in pending if it.key in failures)
    would = len(pending) if limit is None else min(limit, len(pending))
    first = pending[:min(shown, would)]
    commands = []
    if isinstance(task, CmdTask):
        commands = [seen.command(task, it) for it in first]
    chunking = Chunking(
        workers=n_workers, chunk_size=chunk_size, first_chunk=chunk_size or 1,
        units=plan.units if plan else Plan.for_total(len(items), DEFAULT_LEASE_S).units,
        lease_s=plan.lease_s if plan else (lease_s or DEFAULT_LEASE_S), plan_exists=plan is not None)
    return DryRun(task.name, seen.root, len(items), len(done), len(gave_up), retrying, len(pending),
                  would, [it.key for it in first], commands, chunking)


@dataclass(frozen=True)
class _Seen:
    """What a dry run reads from a root, whatever its kind."""

    root: str  # as shown
    items: Sequence[Item]
    done: DoneKeys
    failures: dict[str, Failure]
    plan: Plan | None
    base: Path  # what a command line's paths are relative to: the root folder, or "." on a bucket

    def command(self, task: CmdTask, item: Item) -> str:
        return task.command_line(item, self.base / item.out, self.base)


def _folder_seen(task: Task, root: Path) -> _Seen:
    layout = Layout(root, task.name)
    items = task.items(root)
    return _Seen(str(root), items, scan_done(root, items),
                 FailureStore(layout.failed, layout.tmp).load(), _plan(layout), root)


def _bucket_seen(task: Task, url: str) -> _Seen:
    """The outputs (a LIST per folder), the failure records and the plan: GET and LIST only."""
    from tasks.store.records import BucketFailures  # the SDKs: only for an object-store root
    from tasks.store.scan import scan_done as scan_bucket
    from tasks.store.views import opened

    with opened(url) as root:
        layout = root.layout(task.name)
        items = task.items(root)
        done = scan_bucket(root, items)
        failures = BucketFailures(root, layout).load()
        raw = root.read(layout.plan)
    try:
        plan = Plan.from_json(raw.decode("utf-8", "replace")) if raw is not None else None
    except ValueError:
        plan = None  # damaged: the next run repairs or names it
    return _Seen(str(root), items, done, failures, plan, Path())


def _plan(layout: Layout) -> Plan | None:
    try:
        return Plan.from_json(layout.plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
