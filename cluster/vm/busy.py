"""What counts as useful work on a worker VM, and the mark the idle guard (cluster/vm/watchdog.sh) watches.

Useful work means a key of this VM running. The engine says so in the state file each
`tasks run --state-file PATH` keeps on the VM's own disk (written atomically at least
every STATE_WRITE_S and at exit): a fresh file whose `running` holds keys. Waiting on keys
that live peers hold is idle, and so is a runner that stopped writing its state. An
engine too old for --state-file is judged the old way: a live `tasks run` is busy.

The agent touches MARK (in SPOTFAN_HOME) whenever it sees useful work; the guard powers
the VM off once MARK is older than idle_timeout. Stdlib only: it runs inside the agent.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MARK = "busy"  # SPOTFAN_HOME/busy: its mtime is the last time this VM did useful work
STATE_VERSION = 1
STATE_WRITE_S = 2.0  # the engine writes its state file at least this often
STATE_FRESH_S = 5 * STATE_WRITE_S  # an older state file means the runner stopped reporting
PROBE_TIMEOUT_S = 60.0  # `tasks run --help`, once per agent, to see whether it knows --state-file
PHASES = ("starting", "working", "waiting", "finished")


@dataclass(frozen=True)
class RunnerState:
    """One `tasks run` process as its state file describes it."""

    time: float  # epoch seconds of the write
    pid: int  # the runner's pid
    task: str  # the task's name
    phase: str  # starting | working | waiting | finished
    total: int  # keys of the task
    done: int
    failed: int
    running: tuple[str, ...]  # keys this runner executes now
    waiting: tuple[str, ...]  # keys held by live peers that it waits for


def state_path(home: Path, run_id: str) -> Path:
    """Where the runner of `run_id` keeps its state: the VM's own disk, never the share."""
    return home / "runs" / f"{run_id}.state.json"


def read_state(path: Path) -> RunnerState | None:
    """The state file, validated; None if it is missing, torn or not of this version."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, Mapping) or raw.get("version") != STATE_VERSION or raw.get("phase") not in PHASES:
        return None
    try:
        return RunnerState(
            time=float(raw["time"]), pid=int(raw["pid"]), task=str(raw.get("task", "")),
            phase=str(raw["phase"]), total=int(raw.get("total") or 0), done=int(raw.get("done") or 0),
            failed=int(raw.get("failed") or 0), running=_keys(raw.get("running")),
            waiting=_keys(raw.get("waiting")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _keys(value: object) -> tuple[str, ...]:
    if isinstance(value, list):
        return tuple(str(k) for k in value)
    if isinstance(value, int) and not isinstance(value, bool):  # a count instead of keys
        return tuple(str(i) for i in range(value))
    return ()


def useful(state: RunnerState | None, *, pid: int, started_ago: float, grace: float,
           now: float | None = None) -> bool:
    """Whether the runner `pid` (spawned `started_ago` seconds ago) does useful work now.

    A runner that has not written its state yet, or is still starting (scanning which
    keys are left), counts as busy for `grace` seconds after its spawn: preparing its own
    keys is work, but a start that hangs (a dead mount) must not keep the VM up for ever.
    """
    now = time.time() if now is None else now
    fresh = state is not None and state.pid == pid and now - state.time <= STATE_FRESH_S
    if not fresh:
        return started_ago < grace
    assert state is not None
    if state.running:
        return True
    return state.phase == "starting" and started_ago < grace


def engine_reports_state(python: str, *, env: Mapping[str, str], cwd: Path) -> bool:
    """Whether this VM's `tasks run` takes --state-file (asked once: `tasks run --help`)."""
    try:
        out = subprocess.run([python, "-m", "tasks", "run", "--help"], capture_output=True, text=True,
                             env=dict(env), cwd=cwd, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "--state-file" in out.stdout


def mark(home: Path) -> None:
    """This VM did useful work just now (the guard's idle clock starts again)."""
    path = home / MARK
    try:
        os.utime(path)
    except FileNotFoundError:
        path.touch()
