"""Claims and publishing over real SSHFS: two mounts of one share are two machines, each
with its own sshfs process and caches, talking to a real sshd."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from tasks.records import read_logs
from tasks.direct import COMMAND_ENV
from tests.tasks.two_mounts import sftp_command, two_machines  # noqa: F401 (a fixture)

TASKS = """
import time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:04d}" for i in range(300)], out="out/{key}.txt")
def per_key(key: str, out: Path) -> None:
    time.sleep(0.005)
    out.write_text(key)

@filetask(keys=[f"k{i:05d}" for i in range(5000)], out="many/{key}.txt")
def units(key: str, out: Path) -> None:
    out.write_text(key)
"""


@pytest.mark.parametrize("direct", [False, True], ids=["mount", "session"])
@pytest.mark.parametrize("task, n", [("per_key", 300), ("units", 5000)])
def test_two_machines_share_the_work_over_sshfs(two_machines, task: str, n: int,
                                                direct: bool) -> None:
    """session: the runners publish and list over their own SFTP sessions (tasks.direct)."""
    share, a, b = two_machines
    for name in ("out", "many", ".spotfan"):
        shutil.rmtree(share / name, ignore_errors=True)
    (share / "sf_tasks.py").write_text(TASKS)
    cmd = [sys.executable, "-m", "tasks", "run", f"sf_tasks:{task}", "--workers", "2"]
    env = {**os.environ, COMMAND_ENV: sftp_command(share) if direct else ""}
    procs = [subprocess.Popen(cmd, cwd=m, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for m in (a, b)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    folder = "out" if task == "per_key" else "many"
    names = sorted(os.listdir(share / folder))
    assert len(names) == n
    assert all((share / folder / f).read_text() == f[:-4] for f in names[:: max(1, n // 200)])
    rows = [r for r in read_logs(share / f".spotfan/tasks/{task}/log") if r["ok"]]
    per_key = Counter(r["key"] for r in rows)
    per_owner = Counter(r["owner"] for r in rows)
    twice = sum(1 for c in per_key.values() if c > 1)
    print(f"{task}: executions per machine {dict(per_owner)}, keys run twice: {twice}")
    assert len(per_key) == n and len(per_owner) == 2
    assert twice == 0
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r["succeeded"] for r in reports) == n
    peers = sum(r["by_peers"] for r in reports)
    print(f"{task}: keys claimed but found done by a peer: {peers}")
    # The goal (under 1%) is measured by bench/bench_fleet.py on a quiet machine; this bound
    # holds on a busy one too and still fails the old design (over half the keys).
    assert peers <= n // 20, f"{peers} of {n} keys claimed but found done by a peer (bound 5%)"
    assert list((share / f".spotfan/tasks/{task}/claims").iterdir()) == []


def test_a_module_in_the_shared_root_named_like_the_standard_library_is_not_imported(
        two_machines) -> None:
    """`python -m tasks` puts its current folder first in sys.path, and the forkserver's and
    resource tracker's `python -c` put "" there: on a share each import looked in the root
    first (a round trip each, ~200 at every start) and took a `secrets.py` found there."""
    share, a, _ = two_machines
    for name in ("out", ".spotfan"):
        shutil.rmtree(share / name, ignore_errors=True)
    (share / "sf_tasks.py").write_text(TASKS)
    (share / "secrets.py").write_text("raise SystemExit('the share root was searched before the standard library')\n")
    (share / "psutil.py").write_text("raise SystemExit('the share root was searched before site-packages')\n")
    try:
        p = subprocess.run([sys.executable, "-m", "tasks", "run", "sf_tasks:per_key", "--workers", "2"],
                           cwd=a, capture_output=True, text=True, timeout=240,
                           env={**os.environ, COMMAND_ENV: ""})
    finally:
        (share / "secrets.py").unlink()
        (share / "psutil.py").unlink()
    assert p.returncode == 0, p.stderr
    assert "searched" not in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["succeeded"] == 300
    assert len(os.listdir(share / "out")) == 300
