"""Failed keys grouped by their error, and sending them back to be run again.

Errors are grouped by a signature: the error line with quoted literals, numbers and
hex ids masked, so "KeyError: 'k13'" and "KeyError: 'k17'" are one group
("KeyError: '…'") while a ValueError stays another. A failed command's signature is its
exit status plus the masked last line of its stderr.

`retry` resets the failure records of keys that are not done (attempts 0, not given
up), keeping their last error for reference. It runs nothing itself: the next `run`
of the task, on any machine, retries them. A `run` already in progress read the records
when it started and does not pick them up; every record is replaced by an atomic
rename (on an object-store root, a whole-object write), so resetting while runs are
active loses nothing and corrupts nothing.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, ContextManager

from tasks.items import Item
from tasks.layout import Layout, new_owner_id
from tasks.records import Failure, FailureStore
from tasks.scan import DoneKeys, scan_done
from tasks.spec import Task
from tasks.layout import is_object_url

if TYPE_CHECKING:
    from tasks.store.root import BucketRoot

DETAIL_LINES = 6  # lines of a traceback or stderr shown per group: its innermost end
EXAMPLE_KEYS = 5  # keys shown per group in the human-readable listing
_ENGINE_DIR = str(Path(__file__).resolve().parent) + "/"  # frames here are not the task's

# What differs between keys with one cause, in the order tried, each masked as one token.
_VARYING = re.compile(r"""
    (?P<quoted>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")            # 'k13', "a.jpg"
  | (?P<path>(?<![\w/])/?(?:[\w.@%+~-]+/)+[\w.@%+~-]*)                # /data/a.txt, shard/7
  | (?P<hex>\b0x[0-9a-fA-F]+\b|\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b)       # 0x7f3a2b1c, hashes
  | (?P<number>\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)                         # 13, 3.2, 1e-05
""", re.VERBOSE)
_MASKS = {"quoted": "'…'", "path": "…/…", "hex": "0x…", "number": "#"}


@dataclass(frozen=True)
class FailureGroup:
    """Failed keys that share one error signature."""

    signature: str  # the error with literals and numbers masked: what the keys share
    keys: tuple[str, ...]  # every key of the group, sorted
    gave_up: int  # keys that reached --max-attempts; the others are retried by the next run
    error: str  # the error line of the group's first key, as recorded
    detail: str  # the last DETAIL_LINES lines of that key's traceback or stderr

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class FailureReport:
    """The failures of one task's keys that are not done."""

    task: str  # the task's name
    total: int  # keys in the task
    failed: int  # keys with a failure record and no output
    gave_up: int  # of those, keys that reached --max-attempts (skipped until retried)
    groups: tuple[FailureGroup, ...]  # by error signature, largest first

    def to_json(self) -> str:
        data = asdict(self)
        for g, group in zip(data["groups"], self.groups):
            g["count"] = group.count
        return json.dumps(data)


def signature(error: str, detail: str = "") -> str:
    """The part of an error that keys with the same cause share."""
    if error.startswith("exit status ") and detail.strip():
        # A command's error line is only its status; its stderr says what went wrong.
        last = [ln for ln in detail.splitlines() if ln.strip()][-1]
        return f"{error}: {_mask(last.strip())}"
    return _mask(error)


def _mask(text: str) -> str:
    return _VARYING.sub(lambda m: _MASKS[m.lastgroup or "number"], text)


def tail(detail: str, lines: int = DETAIL_LINES) -> str:
    """The last non-empty lines of a traceback or stderr, without the engine's own frames:
    where the task raised, and why. (A traceback's first lines are the engine's.)"""
    kept = []
    skipping = False
    for ln in detail.splitlines():
        if ln.startswith('  File "'):
            skipping = ln.startswith(f'  File "{_ENGINE_DIR}')
        elif not ln.startswith(" "):
            skipping = False  # the exception line, "Traceback ...", "During handling ..."
        if not skipping and ln.strip():
            kept.append(ln)
    return "\n".join(kept[-lines:])


def open_failures(task: Task, *, root: str | Path = ".") -> list[Failure]:
    """Failure records of the task's keys that are not done, sorted by key."""
    if is_object_url(str(root)):
        with _opened(str(root)) as bucket:
            return _bucket_failures(bucket, task)[1]
    root = Path(root).resolve()
    return _open_failures(Layout(root, task.name), task.items(root))


def _open_failures(layout: Layout, items: Sequence[Item]) -> list[Failure]:
    root = layout.root
    records = FailureStore(layout.failed, layout.tmp).load()
    return not_done(records, items, lambda candidates: scan_done(root, candidates))


def not_done(records: dict[str, Failure], items: Sequence[Item],
             scan: Callable[[Sequence[Item]], DoneKeys]) -> list[Failure]:
    """The records of keys of `items` whose output does not exist, sorted by key (`scan`
    lists only the outputs of keys with a record)."""
    if not records:
        return []
    keys = {it.key for it in items}
    candidates = [it for it in items if it.key in records]
    done = scan(candidates)
    return sorted((f for k, f in records.items() if k in keys and k not in done),
                  key=lambda f: f.key)


def group_failures(found: Iterable[Failure]) -> list[FailureGroup]:
    """Failures grouped by error signature, largest group first."""
    by_sig: dict[str, list[Failure]] = {}
    for f in found:
        by_sig.setdefault(signature(f.error, f.detail), []).append(f)
    groups = []
    for sig, members in by_sig.items():
        members.sort(key=lambda f: f.key)
        first = members[0]
        groups.append(FailureGroup(sig, tuple(f.key for f in members),
                                   sum(1 for f in members if f.gave_up), first.error,
                                   tail(first.detail)))
    return sorted(groups, key=lambda g: (-g.count, g.signature))


def failures(task: Task, *, root: str | Path = ".") -> FailureReport:
    """What failed in a task, grouped by error."""
    if is_object_url(str(root)):
        with _opened(str(root)) as bucket:
            total, found = _bucket_failures(bucket, task)
    else:
        root = Path(root).resolve()
        items = task.items(root)
        total, found = len(items), _open_failures(Layout(root, task.name), items)
    return FailureReport(task.name, total, len(found),
                         sum(1 for f in found if f.gave_up), tuple(group_failures(found)))


def retry(task: Task, *, root: str | Path = ".", keys: Iterable[str] | None = None) -> list[str]:
    """Send failed keys back: reset their failure records so the next `run` tries each
    again for up to --max-attempts. `keys` limits it to some keys (default: every failed
    key that is not done). Returns the keys reset, sorted."""
    wanted = set(keys) if keys is not None else None
    if is_object_url(str(root)):
        from tasks.store.records import BucketFailures

        with _opened(str(root)) as bucket:
            found = [f for f in _bucket_failures(bucket, task)[1] if wanted is None or f.key in wanted]
            store = BucketFailures(bucket, bucket.layout(task.name))
            bucket.map(lambda f: store.record(replace(f, attempts=0, gave_up=False)), found)
        return [f.key for f in found]
    root = Path(root).resolve()
    layout = Layout(root, task.name)
    found = [f for f in open_failures(task, root=root) if wanted is None or f.key in wanted]
    if not found:
        return []
    # A temporary folder of our own: runs write their records' temporaries in .spotfan/tmp/
    # under fixed names, and two writers must never share one temporary.
    tmp = layout.owner_tmp(new_owner_id())
    tmp.mkdir(parents=True)
    try:
        store = FailureStore(layout.failed, tmp)
        for f in found:
            store.record(replace(f, attempts=0, gave_up=False))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f.key for f in found]


def _opened(url: str) -> ContextManager["BucketRoot"]:
    from tasks.store.views import opened  # the SDKs: only for an object-store root

    return opened(url)


def _bucket_failures(root: "BucketRoot", task: Task) -> tuple[int, list[Failure]]:
    """(keys of the task, records of those not done) on an object-store root: one listing
    of `failed/`, the records read in parallel, a LIST per output folder of failed keys."""
    from tasks.store.records import BucketFailures
    from tasks.store.scan import scan_done as scan_bucket

    items = task.items(root)
    records = BucketFailures(root, root.layout(task.name)).load()
    return len(items), not_done(records, items, lambda candidates: scan_bucket(root, candidates))
