"""Runners of one task on an object-store root that stall, race or die: a frozen owner past
its lease, two concurrent runners, SIGKILL at random moments, a shorter --lease. Each on
S3 (moto) and GCS (our emulator), asserting what a user sees: exit codes, objects, logs."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import time

import psutil
import pytest

from tasks.runstate import RunState

from tests.conftest import all_gone, wait_for

from .bucket_runs import BucketRun, finish

SLOW = """
import os, time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:03d}" for i in range(__N__)], out="out/{key}.txt")
def slow(key: str, out: Path) -> None:
    time.sleep(__SLEEP__)
    out.write_text(f"{key} by {os.getpid()}")
"""


def slow_task(n: int, sleep: float) -> str:
    return SLOW.replace("__N__", str(n)).replace("__SLEEP__", repr(sleep))


@pytest.fixture
def run(backend, tmp_path, request) -> BucketRun:
    return BucketRun(backend, tmp_path, f"runs/{request.node.name.replace('[', '-').rstrip(']')}/")


def test_a_frozen_owner_never_replaces_what_its_successor_published(run: BucketRun) -> None:
    """SIGSTOP past the lease, a peer takes over and publishes, SIGCONT: no published object
    changes, and the woken runner reports no done key as failed."""
    run.write(slow_task(24, 0.4))
    a = run.start("t:slow", "--workers", "2", "--lease", "5")
    wait_for(lambda: len(run.outputs()) >= 2, "runner A publishes its first keys", alive=a)
    os.killpg(a.pid, signal.SIGSTOP)  # the whole machine freezes: runner and workers
    try:
        b = run.start("t:slow", "--workers", "2")
        code_b, rep_b, err_b = finish(b)
        assert code_b == 0, err_b
        before = run.outputs()
        assert len(before) == 24
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    code_a, rep_a, err_a = finish(a)
    assert code_a == 0, err_a
    assert rep_a["failed"] == 0 and rep_b["failed"] == 0
    assert run.outputs() == before, "a late finisher replaced a published object"
    assert run.names(".spotfan/tasks/slow/failed/") == [], "a done key was charged an attempt"
    assert rep_b["succeeded"] >= 1, "B took nothing over: the test proved nothing"
    assert rep_a["succeeded"] + rep_b["succeeded"] == 24, (rep_a, rep_b)


def test_two_concurrent_runs_split_the_work(run: BucketRun) -> None:
    run.write(slow_task(160, 0.01))
    procs = [run.start("t:slow", "--workers", "2") for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2] for r in results]
    assert sorted(run.outputs()) == [f"out/k{i:03d}.txt" for i in range(160)]
    runs = run.executions("slow")
    assert len(runs) == 160 and max(runs.values()) == 1, "a key ran twice although both runs were alive"
    assert min(r[1]["succeeded"] for r in results) > 0, "both runs must have done work"
    assert sum(r[1]["succeeded"] for r in results) == 160
    assert run.names(".spotfan/tasks/slow/claims/") == [], "a finished run left a claim"
    assert run.names(".spotfan/owners/") == [], "a finished run left its owner object"
    assert len(run.names(".spotfan/tasks/slow/done/")) > 0


def test_a_shorter_lease_is_refused_and_the_plans_lease_adopted(run: BucketRun) -> None:
    run.write(slow_task(32, 0.3))
    a = run.start("t:slow", "--workers", "1")
    wait_for(lambda: len(run.outputs()) >= 1, "runner A starts working", alive=a)
    b = run.start("t:slow", "--workers", "1", "--lease", "5")
    (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (0, 0), (err_a, err_b)
    assert "--lease 5s differs from the lease of 120s" in err_b and "using 120s" in err_b
    runs = run.executions("slow")
    assert len(runs) == 32 and max(runs.values()) == 1, "a live claim was taken over"


CHAOS = """
import hashlib, time
from pathlib import Path
from tasks import filetask

def content(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest() * 2048 + b"END:" + key.encode()  # 64 KiB

@filetask(keys=[f"k{i:03d}" for i in range(40)], out="out/{key}.bin")
def chaos(key: str, out: Path) -> None:
    data = content(key)
    with open(out, "wb") as f:
        for i in range(0, len(data), 8192):   # written in pieces, slowly,
            f.write(data[i:i + 8192])         # so kills land mid-write
            f.flush()
            time.sleep(0.002)
"""


def expected(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest() * 2048 + b"END:" + key.encode()


def test_sigkill_at_random_moments_then_a_final_run(run: BucketRun) -> None:
    """Whole runs SIGKILLed at random: no object at a final name is ever partial, and a final
    run ends with every output exact (a dead runner's claims are taken back at once)."""
    run.write(CHAOS)
    rng = random.Random(20261202)
    killed_with_work_done = 0
    for _ in range(5):
        before = len(run.outputs())
        p = run.start("t:chaos", "--workers", "2", "--lease", "5")
        wait_for(lambda: len(run.outputs()) > before or p.poll() is not None, "the run publishes", alive=None)
        time.sleep(rng.uniform(0.0, 0.4))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
        got = run.outputs()
        for name, data in got.items():
            assert data == expected(name[len("out/"):-len(".bin")]), f"a partial object at {name}"
        killed_with_work_done += bool(got)
    final = run.start("t:chaos", "--workers", "2")
    code, rep, err = finish(final)
    assert code == 0, err
    got = run.outputs()
    assert sorted(got) == [f"out/k{i:03d}.bin" for i in range(40)]
    assert all(data == expected(n[4:-4]) for n, data in got.items())
    assert killed_with_work_done >= 3, "the kills landed before any work: the test proved little"
    status = run.cli("status", "t:chaos", "--root", run.url, "--json")
    assert status.returncode == 0, status.stderr
    assert '"done": 40' in status.stdout and '"pending": 0' in status.stdout, status.stdout


def test_a_runner_with_a_skewed_clock_steals_no_live_claim(run: BucketRun) -> None:
    """Ages are judged on the store's clock (the `updated` of our own writes), never ours."""
    if not shutil.which("faketime"):
        pytest.skip("needs faketime (apt-get install faketime)")
    run.write(slow_task(32, 0.3))
    a = run.start("t:slow", "--workers", "1", "--lease", "20")
    wait_for(lambda: len(run.outputs()) >= 1, "runner A starts working", alive=a)
    b = run.start("t:slow", "--workers", "1", prefix=("faketime", "-f", "+600s"))
    (code_a, _, err_a), (code_b, rep_b, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (0, 0), (err_a, err_b)
    runs = run.executions("slow")
    assert len(runs) == 32 and max(runs.values()) == 1, "the skewed runner stole a live claim"
    assert rep_b["succeeded"] >= 1, "the skewed runner did no work: the test proved nothing"


def test_sigkill_of_the_runner_alone_leaves_no_worker_and_no_late_output(run: BucketRun, tmp_path) -> None:
    run.write(slow_task(12, 3.0))
    state = tmp_path / "state.json"
    runner = run.start("t:slow", "--workers", "2", "--state-file", str(state))
    try:
        wait_for(lambda: (s := RunState.read(state)) is not None and len(s.running) > 0,
                 "the runner reports keys running", alive=runner)
        family = psutil.Process(runner.pid).children(recursive=True)
        assert family, "the runner started no process"
        before = run.outputs()
        os.kill(runner.pid, signal.SIGKILL)  # the runner alone: its workers are not signalled
        runner.wait()

        wait_for(lambda: all_gone(family), "every process of the killed runner is gone", 10)
        time.sleep(4)  # longer than a key: a surviving worker would upload by now
        assert run.outputs() == before, "an output appeared after its runner was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)
