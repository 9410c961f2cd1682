"""The state file of a running `tasks run --state-file PATH`: what this runner is doing now,
for the VM's agent (cluster/ reads it with `RunState.from_json`).

The runner rewrites PATH atomically (temp + rename; keep it on the VM's local disk) at
least every STATE_EVERY_S seconds and once at exit. `running` > 0 is useful work; a runner
that only waits on keys held by live peers is idle.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tasks.fs import atomic_write

STATE_VERSION = 1
STATE_EVERY_S = 2.0  # the longest a state file may go unchanged while the runner lives
MAX_KEYS_LISTED = 1000  # the running and waiting lists are cut at this many keys
Phase = Literal["starting", "working", "waiting", "finished"]
PHASES = ("starting", "working", "waiting", "finished")


@dataclass(frozen=True)
class RunState:
    """One snapshot of a runner, as written to its state file."""

    version: int  # STATE_VERSION
    time: float  # seconds since the epoch, when written
    pid: int  # the runner's process id
    task: str  # the task's name
    phase: Phase  # starting | working (keys of ours run) | waiting (only on peers) | finished
    total: int  # keys in the task
    done: int  # keys whose output exists
    failed: int  # keys that reached --max-attempts
    running: list[str] = field(default_factory=list)  # keys THIS runner executes now
    waiting: list[str] = field(default_factory=list)  # keys held by live peers we wait on

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunState":
        """Parse and check a state file's text; ValueError saying what is wrong."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not JSON: {e}") from e
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"version {d.get('version')!r}, expected {STATE_VERSION}")
        if d.get("phase") not in PHASES:
            raise ValueError(f"phase {d.get('phase')!r} is not one of {', '.join(PHASES)}")
        for name in ("pid", "total", "done", "failed"):
            v = d.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} {v!r} is not a whole number >= 0")
        t = d.get("time")
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t):
            raise ValueError(f"time {t!r} is not a number")
        if not isinstance(d.get("task"), str):
            raise ValueError("task is not a string")
        for name in ("running", "waiting"):
            v = d.get(name)
            if not isinstance(v, list) or not all(isinstance(k, str) for k in v):
                raise ValueError(f"{name} is not a list of keys")
        return cls(STATE_VERSION, float(t), d["pid"], d["task"], d["phase"], d["total"],
                   d["done"], d["failed"], list(d["running"]), list(d["waiting"]))

    @classmethod
    def read(cls, path: Path) -> "RunState | None":
        """The state in `path`, or None if it is missing or not a valid state file."""
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None


class StateFile:
    """Writes a runner's state to PATH: at once when the phase changes, and from its own
    thread at least every STATE_EVERY_S seconds, however long the dispatch loop blocks."""

    def __init__(self, path: Path, *, task: str, total: int) -> None:
        self.path = path
        self._state = RunState(STATE_VERSION, time.time(), os.getpid(), task, "starting",
                               total, 0, 0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spotfan-state", daemon=True)

    def __enter__(self) -> "StateFile":
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=STATE_EVERY_S * 2)

    def update(self, *, phase: Phase, done: int, failed: int, running: list[str],
               waiting: list[str]) -> None:
        with self._lock:
            changed = phase != self._state.phase
            self._state = RunState(STATE_VERSION, time.time(), self._state.pid, self._state.task,
                                   phase, self._state.total, done, failed,
                                   running[:MAX_KEYS_LISTED], waiting[:MAX_KEYS_LISTED])
        if changed:
            self._write()

    def _write(self) -> None:
        with self._lock:
            state = RunState(**{**asdict(self._state), "time": time.time()})
        atomic_write(self.path, state.to_json().encode())

    def _loop(self) -> None:
        while not self._stop.wait(STATE_EVERY_S / 2):
            try:
                self._write()
            except OSError:
                pass  # a full local disk: the agent sees the file age and judges by that
