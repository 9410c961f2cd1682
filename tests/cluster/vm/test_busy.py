"""What counts as useful work on a VM (cluster.vm.busy): the engine's state file, as the agent reads it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.vm import busy

REPO = Path(__file__).resolve().parents[3]


def write_state(path: Path, **fields: object) -> None:
    state = {"version": 1, "time": time.time(), "pid": 4242, "task": "t", "phase": "working", "total": 10,
             "done": 3, "failed": 0, "running": [], "waiting": [], **fields}
    path.write_text(json.dumps(state))


def test_a_fresh_state_with_running_keys_is_useful_and_waiting_on_peers_is_not(tmp_path):
    p = tmp_path / "r.state.json"
    write_state(p, running=["a.txt"])
    st = busy.read_state(p)
    assert st is not None and st.running == ("a.txt",) and st.phase == "working"
    assert busy.useful(st, pid=4242, started_ago=999, grace=20)
    write_state(p, phase="waiting", running=[], waiting=["b.txt"])
    assert not busy.useful(busy.read_state(p), pid=4242, started_ago=999, grace=20), "waiting on a peer is idle"
    write_state(p, phase="finished", running=[])
    assert not busy.useful(busy.read_state(p), pid=4242, started_ago=999, grace=20)


def test_a_stale_or_foreign_state_counts_only_during_the_start_grace(tmp_path):
    p = tmp_path / "r.state.json"
    write_state(p, running=["a.txt"], time=time.time() - busy.STATE_FRESH_S - 1)
    st = busy.read_state(p)
    assert not busy.useful(st, pid=4242, started_ago=999, grace=20), "a runner that stopped reporting is idle"
    write_state(p, running=["a.txt"], pid=1)
    assert not busy.useful(busy.read_state(p), pid=4242, started_ago=999, grace=20), "another runner's file"
    assert busy.useful(None, pid=4242, started_ago=5, grace=20), "not written yet: starting, within the grace"
    assert not busy.useful(None, pid=4242, started_ago=25, grace=20), "a start that hangs ends being busy"
    write_state(p, phase="starting", running=[])
    assert busy.useful(busy.read_state(p), pid=4242, started_ago=5, grace=20)
    assert not busy.useful(busy.read_state(p), pid=4242, started_ago=25, grace=20)


def test_torn_or_unknown_state_files_are_refused(tmp_path):
    p = tmp_path / "r.state.json"
    assert busy.read_state(p) is None
    p.write_text('{"version": 1, "time": ')
    assert busy.read_state(p) is None
    write_state(p, version=2)
    assert busy.read_state(p) is None
    write_state(p, phase="dancing")
    assert busy.read_state(p) is None


def test_the_probe_says_whether_this_engine_takes_state_file(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    said = busy.engine_reports_state(sys.executable, env=env, cwd=tmp_path)
    helptext = subprocess.run([sys.executable, "-m", "tasks", "run", "--help"], capture_output=True, text=True,
                              env=env, cwd=tmp_path).stdout
    assert said == ("--state-file" in helptext)
    assert not busy.engine_reports_state("/nonexistent/python", env=env, cwd=tmp_path)


def test_mark_touches_the_guards_file(tmp_path):
    busy.mark(tmp_path)
    first = (tmp_path / busy.MARK).stat().st_mtime
    os.utime(tmp_path / busy.MARK, (first - 100, first - 100))
    busy.mark(tmp_path)
    assert (tmp_path / busy.MARK).stat().st_mtime >= first
