"""What is done and what is left, read from the root alone (no server to ask)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.claims import ClaimPlan, live_claims
from tasks.layout import Layout
from tasks.records import FailureStore
from tasks.runner import DEFAULT_LEASE_S
from tasks.scan import scan_done
from tasks.spec import Task


@dataclass(frozen=True)
class Owner:
    """A `run` process working on the root, as its heartbeat file describes it."""

    owner: str  # host-pid-random
    host: str  # machine it runs on
    pid: int  # its process id there
    task: str  # task it runs
    age: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class TaskStatus:
    """Counts of one task's keys; total = done + failed + running + pending."""

    task: str
    root: str
    total: int
    done: int  # output exists
    failed: int  # reached --max-attempts, not done
    running: int  # held by a live claim, not done
    pending: int  # everything else
    retrying: int  # failed at least once, will be retried
    owners: list[Owner] = field(default_factory=list)  # live `run` processes on this task

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def status(task: Task, *, root: str | Path = ".", lease_s: float = DEFAULT_LEASE_S) -> TaskStatus:
    root = Path(root).resolve()
    layout = Layout(root, task.name)
    items = task.items(root)
    done = scan_done(root, items)
    failures = FailureStore(layout.failed, layout.tmp).load()
    keys = {it.key for it in items}
    live_units = set(live_claims(layout.claims, lease_s=lease_s))
    live: set[str] = set()
    if live_units:
        plan = ClaimPlan.load_or_create(layout.task_dir, len(items))
        live = {it.key for it in items if plan.unit(it.key) in live_units}
    failed = {k for k, f in failures.items() if f.gave_up and k not in done and k in keys}
    running = live - done - failed
    retrying = {k for k, f in failures.items() if not f.gave_up and k not in done and k in keys}
    return TaskStatus(task.name, str(root), len(items), len(done), len(failed), len(running),
                      len(items) - len(done) - len(failed) - len(running), len(retrying),
                      live_owners(layout, task.name, lease_s))


def live_owners(layout: Layout, task: str, lease_s: float) -> list[Owner]:
    owners: list[Owner] = []
    now = time.time()
    try:
        entries = list(os.scandir(layout.owners))
    except FileNotFoundError:
        return owners
    for entry in entries:
        try:
            age = now - entry.stat().st_mtime
            if age >= lease_s:
                continue
            data = json.loads(Path(entry.path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("task") == task:
            owners.append(Owner(data["owner"], data["host"], data["pid"], task, round(age, 1)))
    return sorted(owners, key=lambda o: o.owner)
