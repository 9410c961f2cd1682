"""What is done and what is left, read from the root alone (no server to ask)."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.claims import live_claims
from tasks.fs import FsClock
from tasks.layout import Layout, is_object_url
from tasks.owners import LiveOwner, live_owners
from tasks.plan import DEFAULT_LEASE_S, Plan
from tasks.items import Item
from tasks.records import Failure, FailureStore
from tasks.scan import DoneKeys, scan_done
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


def status(task: Task, *, root: str | Path = ".", lease_s: float | None = None) -> TaskStatus:
    """Counts from one listing per output folder, the claims and the failure records. Ages
    are judged on the filesystem's clock and by the lease in the task's plan (`lease_s`
    only when there is no plan yet)."""
    if is_object_url(str(root)):
        view = _bucket_view(task, str(root), lease_s=lease_s)
    else:
        view = _folder_view(task, Path(root).resolve(), lease_s=lease_s)
    items, done, failures, plan = view.items, view.done, view.failures, view.plan
    left = done.left_keys  # the keys not done
    live_units = view.live_units
    live: set[str] = set()
    if live_units and plan is not None:
        live = {k for k in left if plan.unit(k) in live_units}
    failed = {k for k, f in failures.items() if f.gave_up and k in left}
    running = live - failed
    retrying = {k for k, f in failures.items() if not f.gave_up and k in left}
    owners = [Owner(o.record.owner, o.record.host, o.record.pid, o.record.task, o.age)
              for o in view.owners]
    return TaskStatus(task.name, view.root, len(items), len(done), len(failed), len(running),
                      len(items) - len(done) - len(failed) - len(running), len(retrying), owners)


@dataclass(frozen=True)
class RootView:
    """What `status` reads from a root, whatever its kind."""

    root: str  # as shown
    items: Sequence[Item]
    done: DoneKeys
    failures: dict[str, Failure]
    plan: Plan | None
    live_units: set[str]  # units held by a live claim
    owners: list[LiveOwner]


def _folder_view(task: Task, root: Path, *, lease_s: float | None) -> RootView:
    layout = Layout(root, task.name)
    items = task.items(root)
    done = scan_done(root, items)
    failures = FailureStore(layout.failed, layout.tmp).load()
    plan = _plan(layout)
    lease = plan.lease_s if plan is not None else (lease_s or DEFAULT_LEASE_S)
    clock = _clock(layout)
    live_units = set(live_claims(layout.claims, lease_s=lease, clock=clock)) if plan else set()
    return RootView(str(root), items, done, failures, plan, live_units,
                    live_owners(layout, lease_s=lease, clock=clock, task=task.name))


def _bucket_view(task: Task, url: str, *, lease_s: float | None) -> RootView:
    """The outputs (a LIST per folder), the failure records, the plan, the live claims and
    owners, ages judged on the store's clock (a response's Date: nothing is written)."""
    from tasks.store.claims import live_claims as bucket_claims
    from tasks.store.records import BucketFailures
    from tasks.store.records import live_owners as bucket_owners
    from tasks.store.root import BucketRoot
    from tasks.store.scan import scan_done as scan_bucket

    root = BucketRoot(url)
    try:
        root.check()
        layout = root.layout(task.name)
        items = task.items(root)
        done = scan_bucket(root, items)
        failures = BucketFailures(root, layout).load()
        raw = root.read(layout.plan)
        try:
            plan = Plan.from_json(raw.decode("utf-8", "replace")) if raw is not None else None
        except ValueError:
            plan = None  # damaged: the next run repairs or names it
        lease = plan.lease_s if plan is not None else (lease_s or DEFAULT_LEASE_S)
        root.sync_clock()
        live = set(bucket_claims(root, layout, lease_s=lease)) if plan else set()
        return RootView(str(root), items, done, failures, plan, live,
                        bucket_owners(root, layout, lease_s=lease, task=task.name))
    finally:
        root.close()

def _plan(layout: Layout) -> Plan | None:
    try:
        return Plan.from_json(layout.plan.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no run yet, or a damaged plan (the next run repairs or names it)


def _clock(layout: Layout) -> FsClock:
    """The filesystem's clock, from a probe file written under .spotfan/tmp/ (this
    machine's clock if the root is read-only)."""
    clock = FsClock()
    probe = layout.tmp / f".status-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"{")
            clock.sync(fd, b"{", probe)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        pass
    return clock
