"""What runs inside each pool worker: load the task once, then run chunks of items.

A chunk's items are run one after another; each returns an `Outcome`, and one failing
item never stops the rest of its chunk.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.keys import Item
from tasks.publish import discard, publish, temp_path
from tasks.spec import CommandFailed, Task, TaskRef

TRACEBACK_TAIL = 8000  # characters of a traceback kept in a failure record


@dataclass(frozen=True)
class Outcome:
    """How one execution of one key went."""

    key: str  # the item's key
    ok: bool  # published (or found published by a peer, for directory outputs)
    started: float  # wall-clock start, seconds since the epoch
    seconds: float  # how long the task itself took
    error: str = ""  # one line: exception type and message, or exit status
    detail: str = ""  # traceback, or the command's stderr tail
    duplicate: bool = False  # a peer had already published this directory output


@dataclass
class _State:
    task: Task
    root: Path
    tmp_dir: Path
    fsync: bool
    ctx: Any


_state: _State | None = None


def init_worker(ref: TaskRef, root: str, tmp_dir: str, fsync: bool, chdir: bool) -> None:
    """Pool initializer: import the task by name and run its per-process initializer once."""
    global _state
    task = ref.load()
    if chdir:
        os.chdir(root)
    _state = _State(task, Path(root), Path(tmp_dir), fsync or task.fsync, task.open())


def run_chunk(items: list[Item]) -> list[Outcome]:
    assert _state is not None, "init_worker was not called in this process"
    return [run_one(_state, item) for item in items]


def run_one(state: _State, item: Item) -> Outcome:
    tmp = temp_path(state.tmp_dir, item.out)
    started = time.time()
    t0 = time.perf_counter()
    try:
        if state.task.is_dir:
            tmp.mkdir()
        state.task.execute(item, tmp, state.root, state.ctx)
        published = publish(tmp, state.root / item.out, is_dir=state.task.is_dir,
                            fsync=state.fsync)
        return Outcome(item.key, True, started, time.perf_counter() - t0, duplicate=not published)
    except CommandFailed as e:
        discard(tmp)
        return Outcome(item.key, False, started, time.perf_counter() - t0,
                       f"exit status {e.returncode}", e.stderr)
    except (Exception, SystemExit) as e:  # user code may raise anything; record, go on
        discard(tmp)
        line = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
        return Outcome(item.key, False, started, time.perf_counter() - t0, line,
                       traceback.format_exc()[-TRACEBACK_TAIL:])
