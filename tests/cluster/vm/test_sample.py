"""cluster.vm.sample, cluster.vm.verdict and cluster.vm.top on real runs: a CPU-bound task, a task that waits, and recorded samples."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from cluster.vm.sample import sample
from cluster.vm.top import record
from cluster.vm.verdict import verdict
from tasks.report import read_metrics

REPO = Path(__file__).resolve().parents[3]
CORES = os.cpu_count() or 1
START_TIMEOUT_S = 15.0  # until the run's pool processes are busy
POLL_S = 0.1
SAMPLE_S = 2.0

MODULE = """
    import time
    from pathlib import Path
    from tasks import filetask

    KEYS = [f"k{i}" for i in range(32)]

    @filetask(keys=KEYS, out="spun/{key}")
    def spin(key: str, out: Path) -> None:
        end = time.monotonic() + 15
        n = 0
        while time.monotonic() < end:
            n += 1
        out.write_text(str(n))

    @filetask(keys=KEYS, out="slept/{key}")
    def nap(key: str, out: Path) -> None:
        time.sleep(15)
        out.write_text("")
"""


def start_run(root: Path, task: str, workers: int = CORES) -> subprocess.Popen[bytes]:
    """`python -m tasks run` with `workers` pool processes; returns once they all run."""
    (root / "t.py").write_text(textwrap.dedent(MODULE))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", f"t:{task}", "--workers",
                             str(workers)], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pool = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if c.ppid() != proc.pid]  # pool processes are the forkserver's children
        if len(pool) >= workers and (root / ".spotfan/tasks" / task / "claims").exists():
            time.sleep(0.5)  # let them import the module and start on their keys
            return proc
        if proc.poll() is not None:
            pytest.fail(f"tasks run exited with {proc.returncode} before its pool started")
        time.sleep(POLL_S)
    stop(proc)
    pytest.fail(f"the pool of tasks run did not start within {START_TIMEOUT_S:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the run we started and everything it started, by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    proc.wait(timeout=10)


@pytest.fixture
def spinning(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_run(tmp_path, "spin")
    yield proc
    stop(proc)


@pytest.fixture
def napping(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_run(tmp_path, "nap")
    yield proc
    stop(proc)


def test_a_cpu_bound_run_is_saturated(spinning: subprocess.Popen[bytes]) -> None:
    s = sample(SAMPLE_S, pids=[spinning.pid])
    v = verdict(s)
    assert s.workers.runs == 1 and s.workers.pool == CORES
    assert s.workers.runnable >= 0.6 * CORES and s.cpu >= 85
    assert v.kind == "cpu-bound", v
    assert v.summary.startswith(f"CPU-bound and saturated: {CORES} worker process(es) use")
    assert "more VMs" in v.advice[0]
    # told it should run more processes than cores, the verdict stays: the CPU is the limit
    assert verdict(s, workers=4 * CORES).kind == "cpu-bound"


def test_a_waiting_run_is_idle_and_told_to_overlap(napping: subprocess.Popen[bytes]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cluster.vm.top", "--seconds", str(SAMPLE_S),
                           "--json", "--pid", str(napping.pid)], cwd=REPO, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    workers, v = got["sample"]["workers"], got["verdict"]
    assert workers["pool"] == CORES and workers["runnable"] < 0.5 and workers["cpu"] < 30
    # machine-wide iowait from other processes may name the disk; both say the CPU waits
    assert v["kind"] in ("waiting", "io-wait"), v
    assert v["summary"].startswith("CPU idle, ") and "wait" in v["summary"]
    assert any("more processes per VM" in a for a in v["advice"])


@pytest.mark.skipif(CORES < 2, reason="one core is never too many for one process")
def test_too_few_processes_for_the_cores(tmp_path: Path) -> None:
    proc = start_run(tmp_path, "spin", workers=1)
    try:
        s = sample(SAMPLE_S, pids=[proc.pid])
    finally:
        stop(proc)
    if s.cpu >= 85:
        pytest.skip(f"other processes keep this machine {s.cpu:.0f}% busy: an idle core "
                    "cannot be seen")
    v = verdict(s)
    assert v.kind == "too-few", v
    assert v.summary.startswith(f"too few processes for the cores: 1 worker process(es) on {CORES}")
    assert f"--workers {CORES}" in v.advice[0]


def test_idle_machine_and_recorded_samples(tmp_path: Path) -> None:
    assert verdict(sample(0.3, pids=[])).kind == "idle"
    path = tmp_path / ".spotfan/metrics/vm-a.jsonl"
    written = record(path, 0.3, threading.Event(), pids=[], max_samples=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == 3 and len(rows) == 3
    assert {"t", "host", "cpu", "iowait", "cpu_per_core", "mem_available", "workers_cpu"} <= set(rows[0])
    assert rows[0]["t"] < rows[1]["t"] < rows[2]["t"] and 0 <= rows[0]["cpu"] <= 100
    host = rows[0]["host"]
    assert [s["t"] for s in read_metrics(tmp_path)[host]] == [r["t"] for r in rows]
    stop_now = threading.Event()
    stop_now.set()
    assert record(path, 5.0, stop_now) == 0  # a set event stops it before any sample


def test_verdicts_on_memory_pressure_and_blocked_reads(spinning: subprocess.Popen[bytes]) -> None:
    """The rules that a test machine cannot safely provoke, on a real sample's numbers."""
    s = sample(0.5, pids=[spinning.pid])
    starved = replace(s, mem_available=s.mem_total // 50, swap_bps=50 * 2**20)
    v = verdict(starved)
    assert v.kind == "memory" and v.summary.startswith("memory pressure: 2% of memory available")
    assert "fewer processes per VM" in v.advice[0]
    blocked = replace(s, cpu=20.0, workers=replace(s.workers, runnable=0.0, blocked=1.5, cpu=10.0))
    v = verdict(blocked)
    assert v.kind == "io-wait"
    assert v.summary.startswith("CPU idle, waiting on disk or the shared mount")
    assert "read inputs locally" in v.advice[0] and "a faster disk" in v.advice[1]
