"""@memo: a shared sub-result computed once on the whole root, whatever the callers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tasks import MemoError, memo
from tasks.memo import MEMO_DIR, call_hash

TASK = """
import os, time
from pathlib import Path
from tasks import filetask, memo

@memo
def shared(arg: int) -> str:
    with open(os.environ["CALLS"], "a") as f:  # one line per execution of the body
        f.write(f"{arg} {os.getpid()}\\n")
    time.sleep(1.0)
    return f"value-{arg}"

@filetask(keys=[f"k{i:03d}" for i in range(60)], out="out/{key}")
def use(key: str, out: Path) -> None:
    out.write_text(f"{key}:{shared(int(key[1:]) % 2)}")
"""


def test_two_runners_over_many_keys_run_the_body_once_per_argument(tmp_path: Path, write_module) -> None:
    write_module("t", TASK)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "CALLS": str(calls)}
    cmd = [sys.executable, "-m", "tasks", "run", "t:use", "--workers", "2"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    lines = calls.read_text().splitlines()
    assert sorted(ln.split()[0] for ln in lines) == ["0", "1"], lines  # 4 processes, 2 bodies
    for i in range(60):
        assert (tmp_path / "out" / f"k{i:03d}").read_text() == f"k{i:03d}:value-{i % 2}"
    results = sorted(p.name for p in (tmp_path / MEMO_DIR / "t.shared").glob("*.pkl"))
    assert len(results) == 2
    assert list((tmp_path / MEMO_DIR / "t.shared" / "claims").iterdir()) == []


CALLER = """
import sys, time
from pathlib import Path
from tasks import memo

root = Path(sys.argv[1])

@memo(root=root, lease_s=5)
def slow(n: int) -> list:
    (root / f"started-{time.time_ns()}").write_text("")
    if (root / "hang").exists():
        time.sleep(600)  # killed by the test
    return list(range(n))

print(slow(5))
"""


def test_a_caller_killed_mid_body_leaves_no_result_and_the_next_caller_computes_it(tmp_path: Path) -> None:
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    (tmp_path / "hang").write_text("")
    first = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("started-*")):
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    base = tmp_path / MEMO_DIR / "__main__.slow"
    assert list(base.glob("*.pkl")) == [], "no result from a body that never returned"
    assert list((base / "claims").iterdir()), "its claim is left behind"
    (tmp_path / "hang").unlink()
    t0 = time.monotonic()
    second = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "[0, 1, 2, 3, 4]"
    assert len(list(tmp_path.glob("started-*"))) == 2
    assert time.monotonic() - t0 < 60  # the holder is gone on this host: taken over, not waited out
    third = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                           timeout=120)
    assert third.stdout.strip() == "[0, 1, 2, 3, 4]" and len(list(tmp_path.glob("started-*"))) == 2


def test_arguments_are_keyed_by_content_the_same_in_every_process() -> None:
    a = call_hash((1, "x", {"b": [1.5, None], "a": b"\x00"}, np.arange(4, dtype=np.int32)), {"k": {3, 1}})
    b = call_hash((1, "x", {"a": b"\x00", "b": [1.5, None]}, np.arange(4, dtype=np.int32)), {"k": {1, 3}})
    assert a == b
    assert call_hash((1,), {}) != call_hash((True,), {}) != call_hash(("1",), {})
    assert call_hash((np.arange(4, dtype=np.int32),), {}) != call_hash((np.arange(4, dtype=np.int64),), {})
    code = ("import numpy as np; from tasks.memo import call_hash; print(call_hash((1, 'x', "
            "{'a': b'\\x00', 'b': [1.5, None]}, np.arange(4, dtype=np.int32)), {'k': {3, 1}}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"})
    assert other.stdout.strip() == a
    with pytest.raises(TypeError, match="cannot key a call on a object argument"):
        call_hash((object(),), {})


@memo
def plain(x: int) -> int:
    return x


def double(x: int) -> int:
    return 2 * x


def test_no_root_a_nested_function_and_a_bad_lease_are_refused_with_the_fix(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPOTFAN_ROOT", raising=False)
    with pytest.raises(MemoError, match=r"no run root\. Call it from a task that `tasks run` runs, or give the root"):
        plain(1)

    def nested(x: int) -> int:
        return x

    with pytest.raises(MemoError, match="needs a top-level function"):
        memo(nested)
    with pytest.raises(MemoError, match="lease_s must be 5 to"):
        memo(root=tmp_path, lease_s=1)
    rooted = memo(root=tmp_path)(double)
    assert rooted(3) == 6 and rooted(3) == 6
    assert len(list((tmp_path / MEMO_DIR / f"{__name__}.double").glob("*.pkl"))) == 1
