"""SIGKILL of a whole `run` at random moments never leaves a partial output, and a final
run ends with exactly the right outputs, each one whole."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import run_cli

KEYS = [f"k{i:03d}" for i in range(60)]
START_TIMEOUT_S = 60  # a round's run begins writing within this

TASK = """
import hashlib, time
from pathlib import Path
from tasks import filetask

def content(key: str) -> bytes:
    block = hashlib.sha256(key.encode()).digest() * 512  # 16 KiB
    return block * 4 + b"END:" + key.encode()

@filetask(keys=[f"k{i:03d}" for i in range(60)], out="out/{key}.bin")
def slow_write(key: str, out: Path) -> None:
    data = content(key)
    with open(out, "wb") as f:
        for i in range(0, len(data), 8192):   # written in pieces, slowly,
            f.write(data[i:i + 8192])         # so kills land mid-write
            f.flush()
            time.sleep(0.002)
"""


def expected(key: str) -> bytes:
    block = hashlib.sha256(key.encode()).digest() * 512
    return block * 4 + b"END:" + key.encode()


def check_outputs_whole(root: Path) -> set[str]:
    out = root / "out"
    names = set(os.listdir(out)) if out.exists() else set()
    for name in names:
        assert name.endswith(".bin") and name[:-4] in KEYS, f"unexpected file at a final path: {name}"
        assert (out / name).read_bytes() == expected(name[:-4]), f"partial or wrong output: {name}"
    return names


def temporaries(root: Path) -> set[Path]:
    tmp = root / ".spotfan/tmp"
    return {p for p in tmp.rglob("*") if p.is_file()} if tmp.exists() else set()


def test_sigkill_at_random_moments_then_a_final_run(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    rng = random.Random(20261123)
    killed_with_work_done = 0
    killed_mid_write = 0
    for round_ in range(8):
        seen = temporaries(tmp_path)
        proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow_write",
                                 "--workers", "2", "--lease", "5"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        # Kill at a random moment after this round's run began writing (its start-up alone can
        # take a second on a loaded machine): a temporary that was not there before appears.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (temporaries(tmp_path) - seen) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        with contextlib.suppress(ProcessLookupError):  # unless it ended first: every key done
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, at once
        proc.wait()
        before = len(check_outputs_whole(tmp_path))
        killed_with_work_done += before > 0
        # a temporary left behind by this round's run: a kill that landed mid-write
        killed_mid_write += any(p.is_file() for p in (tmp_path / ".spotfan/tmp").rglob("*"))
    assert killed_with_work_done, "the kills all landed before any work: the test proved nothing"
    assert killed_mid_write or len(check_outputs_whole(tmp_path)) == len(KEYS), \
        "no kill ever interrupted a write; raise the task's write time"

    final = run_cli(["run", "t:slow_write", "--workers", "2", "--lease", "5"], tmp_path, timeout=180)
    assert final.returncode == 0, final.stderr
    assert check_outputs_whole(tmp_path) == {f"{k}.bin" for k in KEYS}
    # the dead runs' temporaries are swept, never published
    assert [p for p in (tmp_path / ".spotfan/tmp").rglob("*") if p.is_file()] == []
    st = run_cli(["status", "t:slow_write", "--json"], tmp_path)
    assert '"done": 60' in st.stdout and '"pending": 0' in st.stdout
