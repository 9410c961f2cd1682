"""The bookkeeping records of an object-store root: the same records as on a folder
(tasks/records.py, tasks/owners.py, tasks/plan.py), written as whole objects.

    failed/<id>.json        Failure, rewritten by the key's current claim holder
    log/<owner>.<n>.jsonl   the n-th flush of one owner's execution log (no appends here)
    owners/<owner>.json     OwnerRecord and a beat count; its `updated` is the heartbeat
    plan.json               Plan, created only if absent: of two first runners one plan wins
"""
from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from typing import Any

from tasks.errors import PlanError
from tasks.layout import Layout, key_id
from tasks.owners import LiveOwner
from tasks.plan import DEFAULT_LEASE_S, PLAN_READ_TRIES, Plan
from tasks.records import Failure, OwnerRecord
from tasks.store.bucket import Refused
from tasks.store.root import BucketRoot

logger = logging.getLogger(__name__)


class BucketFailures:
    """Failure records by key, as FailureStore on a folder."""

    def __init__(self, root: BucketRoot, layout: Layout) -> None:
        self.root = root
        self.dir = layout.failed

    def load(self, keys: Iterable[str] | None = None) -> dict[str, Failure]:
        """All records (one listing, then the reads in parallel), or only those of `keys`."""
        names = sorted(n for n in self.root.names(self.dir) if n.endswith(".json"))
        if keys is not None:
            wanted = {f"{key_id(k)}.json" for k in keys}
            names = [n for n in names if n in wanted]
        found: dict[str, Failure] = {}
        for data in self.root.map(lambda n: self.root.read_json(f"{self.dir}/{n}"), names):
            try:
                found[data["key"]] = Failure(**data)
            except (KeyError, TypeError):
                continue  # vanished or foreign: no record
        return found

    def record(self, failure: Failure) -> None:
        self.root.put(f"{self.dir}/{key_id(failure.key)}.json", json.dumps(asdict(failure)).encode())

    def clear(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self.root.map(lambda k: self.root.delete(f"{self.dir}/{key_id(k)}.json"), keys)


class BucketLog:
    """This process's execution log: each write (a finished chunk's rows) is the next part,
    `<owner>.<n>.jsonl`, so a runner killed outright loses no row of what it finished (an
    object cannot be appended to; a part per chunk is ~0.2 requests per tiny key)."""

    def __init__(self, root: BucketRoot, layout: Layout, owner: str) -> None:
        self.root = root
        self.dir = layout.log
        self.owner = owner
        self.host = socket.gethostname()
        self._parts = itertools.count(1)

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps({**row, "owner": self.owner, "host": self.host}) for row in rows]
        if lines:
            part = f"{self.dir}/{self.owner}.{next(self._parts):06d}.jsonl"
            if self.root.create(part, ("\n".join(lines) + "\n").encode()) is None:
                raise RuntimeError(f"{self.root.where(part)} exists: two runners share owner {self.owner}")

    def close(self) -> None:
        """Nothing is held open."""


def read_logs(root: BucketRoot, layout: Layout) -> Iterator[dict[str, Any]]:
    """Every execution row of every owner, part by part in name order."""
    from tasks.store.views import jsonl_objects

    return (row for _, row in jsonl_objects(root, str(layout.log)))


class BucketOwner:
    """This process's owner object; each beat is a compare-and-swap rewrite of it."""

    def __init__(self, root: BucketRoot, layout: Layout, record: OwnerRecord) -> None:
        self.root = root
        self.record = record
        self.rel = f"{layout.owners}/{record.owner}.json"
        self._version: str | None = None
        self._beats = itertools.count()
        self._lock = threading.Lock()
        self.reregistered = 0
        self.tmp = None  # no temporaries on the store: outputs are staged on local disk

    def _data(self) -> bytes:
        return json.dumps({**asdict(self.record), "beat": next(self._beats)}).encode()

    def register(self) -> None:
        with self._lock:
            self._version = self.root.put(self.rel, self._data()).version

    def beat(self) -> None:
        with self._lock:
            version = self._version
        if version is None:
            return
        try:
            made = self.root.bucket.replace(self.root.name(self.rel), self._data(), version=version)
        except Exception as e:  # a flaky store must not kill the run; claims may expire
            logger.warning("heartbeat failed: %s", e)
            return
        if isinstance(made, Refused):
            self.reregistered += 1
            logger.warning("this runner's owner object %s was removed (a peer judged it dead: "
                           "was it frozen for longer than the lease?); registering again", self.rel)
            try:
                self.register()
            except Exception as e:  # the next beat tries again
                logger.warning("could not register again: %s", e)
            return
        self.root.learn(made)
        with self._lock:
            self._version = made.version

    def close(self) -> None:
        with self._lock:
            version, self._version = self._version, None
        if version is not None:
            try:
                self.root.delete(self.rel, version=version)
            except Exception as e:
                logger.warning("could not remove %s: %s", self.root.where(self.rel), e)


def live_owners(root: BucketRoot, layout: Layout, *, lease_s: float,
                task: str | None = None) -> list[LiveOwner]:
    """Owners with a fresh heartbeat (of `task`, if given), by name."""
    fresh = [e for e in root.entries(layout.owners)
             if e.name.endswith(".json") and root.age(e.info) < lease_s]
    found: list[LiveOwner] = []
    for e, data in zip(fresh, root.map(lambda e: root.read(f"{layout.owners}/{e.name}"), fresh)):
        record = OwnerRecord.from_json((data or b"").decode("utf-8", "replace"))
        if record is not None and (task is None or record.task == task):
            found.append(LiveOwner(record, round(max(root.age(e.info), 0.0), 1)))
    return sorted(found, key=lambda o: o.record.owner)


def sweep_owners(root: BucketRoot, layout: Layout, *, lease_s: float, me: str) -> int:
    """Remove owner objects older than the lease (their runners died), each only if
    unchanged since listed; a runner that comes back registers again."""
    dead = [e for e in root.entries(layout.owners)
            if e.name != f"{me}.json" and root.age(e.info) > lease_s]
    return sum(root.map(lambda e: root.delete(f"{layout.owners}/{e.name}", version=e.info.version), dead))


def load_or_create_plan(root: BucketRoot, layout: Layout, *, total: int, lease_s: float | None,
                        runner_alive: Callable[[], bool]) -> Plan:
    """The task's plan (tasks.plan.load_or_create, on a bucket): read it, or create it only
    if absent; a damaged one is replaced when no live runner holds the task."""
    wanted = lease_s if lease_s is not None else DEFAULT_LEASE_S
    rel = str(layout.plan)
    problem = ""
    for _ in range(PLAN_READ_TRIES):
        got = root.bucket.get(root.name(rel))
        if got is None:
            if root.create(rel, Plan.for_total(total, wanted).to_json()) is not None:
                logger.info("wrote %s (lease %.0fs)", root.where(rel), wanted)
            continue
        try:
            plan = Plan.from_json(got.data.decode("utf-8", "replace"))
        except ValueError as e:
            problem = str(e)
            break  # an object is whole or absent: a damaged one stays damaged
        if lease_s is not None and lease_s != plan.lease_s:
            logger.warning("--lease %gs differs from the lease of %gs that the first runner of "
                           "this task fixed in %s; using %gs, as every runner of the task must "
                           "(to change it, delete that object while no run of the task is active)",
                           lease_s, plan.lease_s, root.where(rel), plan.lease_s)
        return plan
    else:
        raise PlanError(f"{root.where(rel)} could not be read or written {PLAN_READ_TRIES} times; "
                        "check the store and run again")
    if runner_alive():
        raise PlanError(f"{root.where(rel)} is damaged ({problem}) and a live runner holds this "
                        f"task; stop every run of the task, delete {root.where(rel)}, and run again")
    plan = Plan.for_total(total, wanted)
    logger.warning("%s was damaged (%s) and no live runner holds the task: rewriting it",
                   root.where(rel), problem)
    root.put(rel, plan.to_json())
    return plan
