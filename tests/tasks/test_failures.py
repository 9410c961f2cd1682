"""Failed keys grouped by error, and --retry sending them back to the next run."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.failures import signature, tail
from tests.conftest import run_cli

MODULE = """
    from pathlib import Path
    from tasks import filetask

    TABLE = {f"k{i}": i for i in range(20) if i not in (3, 7, 13)}

    @filetask(keys=[f"k{i}" for i in range(20)], out="out/{key}")
    def lookup(key: str, out: Path) -> None:
        if key == "k5" and not Path("fixed").exists():
            raise ValueError(f"cannot parse {key}: bad header at byte 512")
        if Path("fixed").exists():
            out.write_text("fixed")
            return
        out.write_text(str(TABLE[key]))
"""


def test_signature_masks_what_differs_between_keys() -> None:
    assert signature("KeyError: 'k13'") == signature("KeyError: 'k17'") == "KeyError: '…'"
    assert signature("ValueError: cannot parse k13: bad header at byte 512") == \
        "ValueError: cannot parse k#: bad header at byte #"
    assert signature("FileNotFoundError: [Errno 2] No such file: '/data/a.npy'") == \
        signature("FileNotFoundError: [Errno 2] No such file: '/data/b c.npy'")
    assert signature("RuntimeError: object at 0x7f3a2b1c0d90") == "RuntimeError: object at 0x…"
    assert signature("KeyError: 'k1'") != signature("IndexError: 'k1'")
    # a command's error line is only its status: its stderr's last line tells them apart
    assert signature("exit status 1", "gzip: /r/a.txt: No such file or directory\n") == \
        "exit status 1: gzip: …/…: No such file or directory"
    assert signature("exit status 1", "x\nsh: 1: nosuchprog: not found\n") != \
        signature("exit status 1", "gzip: /r/a.txt: No such file or directory\n")


def test_tail_drops_the_engines_own_frames() -> None:
    import tasks.worker

    detail = ("Traceback (most recent call last):\n"
              f'  File "{tasks.worker.__file__}", line 70, in run_one\n'
              "    state.task.execute(item, tmp, state.root, state.ctx)\n"
              '  File "/home/me/t.py", line 9, in lookup\n'
              "    out.write_text(str(TABLE[key]))\n"
              "                       ~~~~~^^^^^\n"
              "KeyError: 'k3'\n")
    assert tail(detail).splitlines() == [
        "Traceback (most recent call last):", '  File "/home/me/t.py", line 9, in lookup',
        "    out.write_text(str(TABLE[key]))", "                       ~~~~~^^^^^", "KeyError: 'k3'"]


def test_failures_are_grouped_by_error_and_retry_sends_them_back(tmp_path: Path,
                                                                  write_module) -> None:
    write_module("t", MODULE)
    assert run_cli(["run", "t:lookup", "--max-attempts", "2"], tmp_path).returncode == 1

    proc = run_cli(["failures", "t:lookup"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "lookup: 4 of 20 keys failed (4 gave up), 2 distinct error(s)" in out
    assert "[1] 3 key(s): KeyError: '…'" in out
    assert "keys: 'k13', 'k3', 'k7'" in out
    assert "[2] 1 key(s): ValueError: cannot parse k#: bad header at byte #" in out
    assert "| KeyError: 'k13'" in out and "out.write_text(str(TABLE[key]))" in out
    assert "tasks/worker.py" not in out  # the engine's frames are left out

    data = json.loads(run_cli(["failures", "t:lookup", "--json"], tmp_path).stdout)
    assert (data["failed"], data["gave_up"]) == (4, 4)
    assert [(g["signature"], g["count"], g["keys"]) for g in data["groups"]] == [
        ("KeyError: '…'", 3, ["k13", "k3", "k7"]),
        ("ValueError: cannot parse k#: bad header at byte #", 1, ["k5"])]
    assert data["groups"][1]["error"] == "ValueError: cannot parse k5: bad header at byte 512"

    # A plain run skips given-up keys; after the fix, --retry sends them back.
    (tmp_path / "fixed").write_text("")
    again = run_cli(["run", "t:lookup"], tmp_path)
    assert again.returncode == 1 and json.loads(again.stdout.splitlines()[-1])["ran"] == 0
    proc = run_cli(["failures", "t:lookup", "--retry"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reset 4 key(s): the next `python -m tasks run` of this task retries them" in proc.stdout
    status = json.loads(run_cli(["status", "t:lookup", "--json"], tmp_path).stdout)
    assert (status["failed"], status["retrying"], status["pending"]) == (0, 4, 4)
    rerun = run_cli(["run", "t:lookup"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.splitlines()[-1])["succeeded"] == 4
    assert (tmp_path / "out/k13").read_text() == "fixed"
    assert "lookup: no failed keys (20 keys)" in run_cli(["failures", "t:lookup"], tmp_path).stdout
    assert list((tmp_path / ".spotfan/tasks/lookup/failed").iterdir()) == []
    assert list((tmp_path / ".spotfan/tmp").iterdir()) == []  # --retry's temporaries are gone
