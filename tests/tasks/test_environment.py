"""Environment errors stop the run (exit 3) and charge no key; damaged bookkeeping is
repaired or named; the state file an agent reads is always a valid RunState."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.runstate import RunState
from tests.conftest import run_cli

TASK = """
import time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:02d}" for i in range(20)], out="out/{key}.bin")
def big(key: str, out: Path) -> None:
    out.write_bytes(key.encode() * 50_000)  # 150 kB

@filetask(keys=[f"s{i}" for i in range(40)], out="slow/{key}.txt")
def slow(key: str, out: Path) -> None:
    time.sleep(0.3)
    out.write_text(key)
"""


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs as the run root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    root = tmp_path / "disk"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def test_a_full_disk_stops_the_run_charges_nothing_and_the_rerun_finishes(small_disk: Path) -> None:
    (small_disk / "t.py").write_text(TASK)
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (3 * 1024 * 1024))  # leaves room for a few outputs only
    proc = run_cli(["run", "t:big", "--workers", "2"], small_disk)
    assert proc.returncode == 3, proc.stderr
    assert "no space left on the device" in proc.stderr
    assert "no key was charged an attempt" in proc.stderr
    assert list((small_disk / ".spotfan/tasks/big/failed").iterdir()) == []
    # no claim is left behind, not even one whose body the full disk refused (an empty
    # claim looks like a live peer's to the rerun until the lease runs out)
    assert list((small_disk / ".spotfan/tasks/big/claims").iterdir()) == []
    done_before = len(os.listdir(small_disk / "out"))
    assert done_before < 20, "the disk never filled up: the test proved nothing"
    ballast.unlink()
    again = run_cli(["run", "t:big", "--workers", "2"], small_disk)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(small_disk / "out")) == [f"k{i:02d}.bin" for i in range(20)]
    assert all((small_disk / "out" / f"k{i:02d}.bin").read_bytes() == f"k{i:02d}".encode() * 50_000
               for i in range(20))


def test_a_read_only_output_folder_stops_the_run_with_exit_3(tmp_path: Path, write_module) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only bind")
    write_module("t", TASK)
    (tmp_path / "slow").mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "slow"), str(tmp_path / "slow")],
                   check=True)
    try:
        proc = run_cli(["run", "t:slow", "--workers", "1"], tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "slow")], check=False)
    assert proc.returncode == 3, proc.stderr
    assert f"the filesystem is read-only under {tmp_path / 'slow'}" in proc.stderr
    assert "no key was charged an attempt" in proc.stderr
    assert list((tmp_path / ".spotfan/tasks/slow/failed").iterdir()) == []
    again = run_cli(["run", "t:slow", "--workers", "2"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(os.listdir(tmp_path / "slow")) == 40


def test_a_lost_temporary_folder_stops_the_run_with_exit_3(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    runner = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow", "--workers", "2"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.monotonic() + 60
    while len(os.listdir(tmp_path / "slow") if (tmp_path / "slow").exists() else ()) < 2:
        assert time.monotonic() < deadline and runner.poll() is None, "no output appeared"
        time.sleep(0.05)
    for d in (tmp_path / ".spotfan/tmp").iterdir():
        shutil.rmtree(d)  # e.g. a cleaner of old files
    out, err = runner.communicate(timeout=120)
    assert runner.returncode == 3, err
    assert "vanished" in err and "run the same command again" in err
    assert list((tmp_path / ".spotfan/tasks/slow/failed").iterdir()) == []
    again = run_cli(["run", "t:slow", "--workers", "2"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(os.listdir(tmp_path / "slow")) == 40


@pytest.mark.parametrize("damage", ["", "{not json", '{"claim_prefix": 0}',
                                    '{"version": 2, "units": 0, "lease_s": 120}'])
def test_a_damaged_plan_is_rewritten_when_no_runner_holds_the_task(
        tmp_path: Path, write_module, damage: str) -> None:
    write_module("t", TASK)
    plan = tmp_path / ".spotfan/tasks/slow/plan.json"
    plan.parent.mkdir(parents=True)
    plan.write_text(damage)
    proc = run_cli(["run", "t:slow", "--workers", "2"], tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "was damaged" in proc.stderr and "rewriting it" in proc.stderr
    fixed = json.loads(plan.read_text())
    assert fixed["version"] == 2 and fixed["units"] >= 1 and fixed["lease_s"] == 120


def test_a_damaged_plan_under_a_live_runner_is_refused_naming_the_file(
        tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    first = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow", "--workers", "1"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    plan = tmp_path / ".spotfan/tasks/slow/plan.json"
    deadline = time.monotonic() + 60
    while not (plan.exists() and (tmp_path / "slow").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    plan.write_text("")
    second = run_cli(["run", "t:slow", "--workers", "1"], tmp_path, timeout=60)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 3, second.stderr
    assert f"delete {plan}" in second.stderr and "a live runner holds this task" in second.stderr


def test_the_state_file_tells_what_the_runner_does(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    state = tmp_path / "state.json"
    runner = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow", "--workers", "2",
                               "--state-file", str(state)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[RunState] = []
    deadline = time.monotonic() + 60
    while runner.poll() is None and time.monotonic() < deadline:
        s = RunState.read(state)
        if s is not None and (not seen or s != seen[-1]):
            seen.append(s)
        time.sleep(0.2)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 0, err
    final = RunState.read(state)
    assert final is not None and final.phase == "finished" and final.pid == runner.pid
    assert (final.task, final.total, final.done, final.failed) == ("slow", 40, 40, 0)
    assert any(s.phase == "working" and s.running for s in seen), seen[:3]
    # a state file is rewritten at least every 2 s while the runner lives
    times = [s.time for s in seen]
    assert max(b - a for a, b in zip(times, times[1:])) < 2.5


@pytest.mark.parametrize("text", ["", "[]", '{"version": 1}', '{"version": 2, "phase": "working"}',
                                  json.dumps({"version": 1, "time": 1.0, "pid": 1, "task": "t",
                                              "phase": "idle", "total": 1, "done": 0, "failed": 0,
                                              "running": [], "waiting": []})])
def test_a_garbage_state_file_reads_as_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    assert RunState.read(path) is None
    with pytest.raises(ValueError):
        RunState.from_json(text)
