"""What `tasks logs SPEC KEY` knows about one key: whether it ran, how its last attempt ended, what it printed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.cmdout import output_paths
from tasks.layout import Layout
from tasks.records import Failure, FailureStore
from tasks.spec import Task
from tasks.layout import is_object_url


@dataclass(frozen=True)
class KeyLog:
    """One key's state as `tasks logs` shows it."""

    key: str
    is_key: bool  # the task has this key (its source lists it)
    out: str  # its output, relative to the root ("" when not a key)
    done: bool  # its output exists at its final path: the key succeeded
    failure: Failure | None  # the record of its last failed attempt, if any
    stdout: Path | None  # kept output of its last attempt (--keep-output), if any
    stderr: Path | None
    keys: int  # how many keys the task has


def key_log(task: Task, *, root: str | Path, key: str) -> KeyLog:
    """Read one key's output, failure record and kept output; writes nothing. On an
    object-store root nothing is kept (`run --keep-output` is refused there): stdout and
    stderr are None, and the failure record holds the end of a failed command's stderr."""
    if is_object_url(str(root)):
        return _on_bucket(task, str(root), key)
    root = Path(root)
    items = task.items(root)
    item = next((i for i in items if i.key == key), None)
    out = item.out if item is not None else ""
    done = item is not None and (root / out).exists()
    layout = Layout(root, task.name)
    failure = FailureStore(layout.failed, layout.tmp).load([key]).get(key)
    stdout, stderr = output_paths(root, task.name, key)
    return KeyLog(key, item is not None, out, done, None if done else failure,
                  stdout if stdout.exists() else None, stderr if stderr.exists() else None, len(items))


def _on_bucket(task: Task, url: str, key: str) -> KeyLog:
    from tasks.store.publish import published  # the SDKs: only for an object-store root
    from tasks.store.records import BucketFailures
    from tasks.store.views import opened

    with opened(url) as root:
        items = task.items(root)
        item = next((i for i in items if i.key == key), None)
        done = item is not None and published(root, item)
        failure = BucketFailures(root, root.layout(task.name)).load([key]).get(key)
    return KeyLog(key, item is not None, item.out if item is not None else "", done,
                  None if done else failure, None, None, len(items))
