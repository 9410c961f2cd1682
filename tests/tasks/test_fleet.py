"""Runners of one task that disagree or stall: a frozen owner, a shorter --lease, a skewed
clock, a killed runner, a hung key. On a local disk and over real SSHFS (two mounts of
one share are two machines), asserting what a user sees: exit codes, messages, files."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tasks.records import read_logs
from tasks.direct import COMMAND_ENV
from tests.tasks.two_mounts import sftp_command, two_machines  # noqa: F401 (a fixture)
from tasks.runstate import RunState
from tests.conftest import all_gone, wait_for

DEADLINE_S = 180  # every wait in these tests ends by then
DIE_WITHIN_S = 10  # processes of a SIGKILLed runner are gone within this

SLOW = """
import os, time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:03d}" for i in range(__N__)], out="out/{key}.txt")
def slow(key: str, out: Path) -> None:
    time.sleep(__SLEEP__)
    out.write_text(f"{key} by {os.getpid()}")
"""


@dataclass(frozen=True)
class Machines:
    """Where the test's files are (`share`) and the roots two machines see it at."""

    share: Path
    a: Path
    b: Path


@pytest.fixture(params=["local", "sshfs", "sshfs-direct"])
def machines(request, tmp_path: Path, monkeypatch) -> Machines:
    """sshfs-direct: the runners also publish over their own SFTP session (tasks.direct)."""
    if request.param == "local":
        return Machines(tmp_path, tmp_path, tmp_path)
    share, a, b = request.getfixturevalue("two_machines")
    if request.param == "sshfs-direct":
        monkeypatch.setenv(COMMAND_ENV, sftp_command(share))
    sub = request.node.name.replace("[", "-").replace("]", "")
    shutil.rmtree(share / sub, ignore_errors=True)
    (share / sub).mkdir()
    return Machines(share / sub, a / sub, b / sub)


def write_task(m: Machines, name: str = "t", **values: object) -> None:
    text = SLOW
    for k, v in values.items():
        text = text.replace(f"__{k}__", repr(v))
    (m.share / f"{name}.py").write_text(textwrap.dedent(text))


def start(root: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "tasks", "run", *args], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(p: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = p.communicate(timeout=DEADLINE_S)
    lines = out.strip().splitlines()
    return p.returncode, (json.loads(lines[-1]) if lines else {}), err


def outputs(share: Path) -> dict[str, tuple[int, bytes]]:
    folder = share / "out"
    if not folder.exists():
        return {}
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in folder.iterdir()}


def executions(share: Path, task: str) -> Counter:
    return Counter(r["key"] for r in read_logs(share / f".spotfan/tasks/{task}/log") if r["ok"])


def test_a_frozen_owner_never_replaces_what_its_successor_published(machines: Machines) -> None:
    """SIGSTOP past the lease, a peer takes over and publishes, SIGCONT: nothing published
    changes (inodes and bytes), and the woken runner reports no done key as failed."""
    m = machines
    write_task(m, N=24, SLEEP=0.4)
    a = start(m.a, "t:slow", "--workers", "2", "--lease", "5")
    wait_for(lambda: len(outputs(m.share)) >= 2, "runner A publishes its first keys", alive=a)
    os.killpg(a.pid, signal.SIGSTOP)  # the whole VM freezes: runner and workers
    try:
        b = start(m.b, "t:slow", "--workers", "2")
        code_b, rep_b, err_b = finish(b)
        assert code_b == 0, err_b
        before = outputs(m.share)
        assert len(before) == 24
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    code_a, rep_a, err_a = finish(a)
    assert code_a == 0, err_a
    assert rep_a["failed"] == 0 and rep_b["failed"] == 0
    assert outputs(m.share) == before, "a late finisher replaced a published output"
    assert not list((m.share / ".spotfan/tasks/slow/failed").iterdir()), "a done key was charged"
    assert rep_b["succeeded"] >= 1, "B took nothing over: the test proved nothing"


def test_a_shorter_lease_is_refused_and_the_plans_lease_adopted(machines: Machines) -> None:
    m = machines
    write_task(m, N=48, SLEEP=0.4)  # units of 16 keys: 6.4 s per unit per worker, > 5 s
    a = start(m.a, "t:slow", "--workers", "1")
    wait_for(lambda: (m.share / ".spotfan/tasks/slow/plan.json").exists()
             and len(outputs(m.share)) >= 1, "runner A starts working", alive=a)
    b = start(m.b, "t:slow", "--workers", "1", "--lease", "5")
    (code_a, rep_a, err_a), (code_b, rep_b, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (0, 0), (err_a, err_b)
    assert "--lease 5s differs from the lease of 120s" in err_b and "using 120s" in err_b
    runs = executions(m.share, "slow")
    assert len(runs) == 48 and max(runs.values()) == 1, "a live claim was taken over"
    assert rep_a["failed"] == rep_b["failed"] == 0


def test_a_runner_with_a_skewed_clock_steals_no_live_claim(machines: Machines) -> None:
    if not shutil.which("faketime"):
        pytest.skip("needs faketime (apt-get install faketime)")
    m = machines
    write_task(m, N=48, SLEEP=0.4)
    a = start(m.a, "t:slow", "--workers", "1", "--lease", "20")
    wait_for(lambda: len(outputs(m.share)) >= 1, "runner A starts working", alive=a)
    b = start(m.b, "t:slow", "--workers", "1", prefix=("faketime", "-f", "+600s"))
    (code_a, rep_a, err_a), (code_b, rep_b, err_b) = finish(a), finish(b)
    assert (code_a, code_b) == (0, 0), (err_a, err_b)
    runs = executions(m.share, "slow")
    assert len(runs) == 48 and max(runs.values()) == 1, "the skewed runner stole a live claim"
    assert rep_b["succeeded"] >= 1, "the skewed runner did no work: the test proved nothing"


@pytest.mark.parametrize("kind", ["function", "command"])
def test_sigkill_of_the_runner_alone_leaves_no_worker_and_no_late_output(
        machines: Machines, kind: str) -> None:
    m = machines
    write_task(m, N=12, SLEEP=3.0)
    state = Path("/tmp") / f"sf-state-{os.getpid()}-{kind}.json"
    args = (["t:slow"] if kind == "function" else
            ["--cmd", "sleep 3; echo {key} > {out}", "--keys", "keys.txt", "--out", "out/{key}.txt"])
    (m.share / "keys.txt").write_text("".join(f"c{i}\n" for i in range(12)))
    runner = start(m.a, *args, "--workers", "2", "--state-file", str(state))
    try:
        wait_for(lambda: (s := RunState.read(state)) is not None and len(s.running) > 0,
                 "the runner reports keys running", alive=runner)
        family = psutil.Process(runner.pid).children(recursive=True)
        assert family, "the runner started no process"
        before = outputs(m.share)
        os.kill(runner.pid, signal.SIGKILL)  # the runner alone: its workers are not signalled
        runner.wait()

        wait_for(lambda: all_gone(family), "every process of the killed runner is gone", DIE_WITHIN_S)
        time.sleep(4)  # longer than a key: a surviving worker would publish by now
        assert outputs(m.share) == before, "an output appeared after its runner was killed"
    finally:
        state.unlink(missing_ok=True)
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_key_that_hangs_times_out_and_the_others_finish(machines: Machines) -> None:
    m = machines
    (m.share / "t.py").write_text(textwrap.dedent("""
        import time
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i}" for i in range(10)], out="out/{key}.txt", timeout=60)
        def hang(key: str, out: Path) -> None:
            if key == "k3":
                time.sleep(3600)
            out.write_text(key)
    """))
    t = time.monotonic()
    code, rep, err = finish(start(m.a, "t:hang", "--workers", "2", "--timeout", "2",
                                  "--max-attempts", "2"))
    assert time.monotonic() - t < 60, "the --timeout option did not override timeout=60"
    assert code == 1, err
    assert rep["failed"] == 1 and rep["succeeded"] == 9
    assert "1 key(s) failed after 2 attempt(s): 'k3'" in err
    f = run_cli_json(m.a, ["failures", "t:hang", "--json"])
    group = f["groups"][0]
    assert group["keys"] == ["k3"] and group["error"] == "timed out after 2 s"
    assert sorted(outputs(m.share)) == sorted(f"k{i}.txt" for i in range(10) if i != 3)


def run_cli_json(root: Path, args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-m", "tasks", *args], cwd=root, capture_output=True,
                       text=True, timeout=DEADLINE_S)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)
