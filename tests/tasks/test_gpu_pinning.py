"""One worker process per GPU group: each process sees its own CUDA_VISIBLE_DEVICES for its whole
life (already in `init=`), and a pool rebuilt after a worker died hands out the same groups."""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from tests.conftest import run_cli

KEYS = 45
TASK = f"""
import os, signal, time
from pathlib import Path
from tasks import filetask

SEEN_AT_INIT = {{}}

def remember() -> None:
    SEEN_AT_INIT["cvd"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    SEEN_AT_INIT["t"] = time.time()

@filetask(keys=[f"k{{i:03d}}" for i in range({KEYS})], out="out/{{key}}.txt", init=remember)
def record(key: str, out: Path) -> None:
    now = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if os.environ.get("KILL_GROUP") == now:
        try:  # once per run: the first worker of that group dies, which breaks the pool
            fd = os.open("killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, repr(time.time()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        except FileExistsError:
            pass
    time.sleep(0.03)
    out.write_text(f"{{os.getpid()}} {{SEEN_AT_INIT['cvd']}} {{now}} {{SEEN_AT_INIT['t']!r}}")
"""


def outputs(root: Path) -> list[tuple[int, str, str, float]]:
    rows = []
    for p in sorted((root / "out").iterdir()):
        pid, at_init, now, t = p.read_text().split(" ")
        rows.append((int(pid), at_init, now, float(t)))
    return rows


def groups_by_pid(rows: list[tuple[int, str, str, float]]) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = defaultdict(set)
    for pid, at_init, now, _t in rows:
        assert at_init == now, f"pid {pid} saw {at_init!r} in init= but {now!r} later"
        seen[pid].add(now)
    return seen


def run(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    return run_cli(["run", "t:record", *args], tmp_path, timeout=180,
                   env={**os.environ, **(env or {})})


def test_each_worker_process_gets_its_own_gpu(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    r = run(tmp_path, "--gpus", "3", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    rows = outputs(tmp_path)
    assert len(rows) == KEYS
    seen = groups_by_pid(rows)
    assert all(len(g) == 1 for g in seen.values()), seen  # one group per process, for its life
    assert len(seen) == 3  # --gpus 3: three worker processes
    assert sorted(g for gs in seen.values() for g in gs) == ["0", "1", "2"]  # distinct


def test_rebuilt_pool_hands_out_the_same_groups(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    r = run(tmp_path, "--gpus", "4", "--gpus-per-worker", "2", env={"KILL_GROUP": "2,3"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "killed").exists(), "no worker died: the test proved nothing"
    killed_at = float((tmp_path / "killed").read_text())
    rows = outputs(tmp_path)
    assert len(rows) == KEYS  # the killed key was run again
    seen = groups_by_pid(rows)
    assert all(len(g) == 1 for g in seen.values()), seen
    after = {pid: g for pid, g in seen.items() if next(t for p, *_, t in rows if p == pid) > killed_at}
    before = {pid: g for pid, g in seen.items() if pid not in after}
    assert sorted(g for gs in after.values() for g in gs) == ["0,1", "2,3"]  # the same two groups
    groups_before = [g for gs in before.values() for g in gs]
    assert len(groups_before) == len(set(groups_before)) and set(groups_before) <= {"0,1", "2,3"}


def test_groups_come_from_the_runners_own_visible_devices(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    r = run(tmp_path, "--gpus", "2", env={"CUDA_VISIBLE_DEVICES": "5,7,9"})
    assert r.returncode == 0, r.stderr
    seen = groups_by_pid(outputs(tmp_path))
    assert sorted(g for gs in seen.values() for g in gs) == ["5", "7"]


def test_bad_gpu_options_are_refused_before_any_work(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    for args, message in [
        (["--gpus", "3", "--gpus-per-worker", "2"], "does not split into groups"),
        (["--gpus", "4", "--workers", "2"], "one worker process per GPU group, 4; leave --workers out"),
        (["--gpus", "2", "--executor", "thread"], "--gpus needs --executor process"),
        (["--gpus-per-worker", "2"], "--gpus-per-worker needs --gpus"),
    ]:
        r = run(tmp_path, *args, env={"CUDA_VISIBLE_DEVICES": ""})
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = run(tmp_path, "--gpus", "3", env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert r.returncode == 2 and "shows only 2" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
