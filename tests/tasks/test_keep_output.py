"""--keep-output keeps what each --cmd key printed, bounded; `tasks logs` prints it."""
from __future__ import annotations

import re
from pathlib import Path

from tasks.cmdout import KEEP_BYTES
from tests.conftest import run_cli


def test_each_keys_output_is_kept_bounded_and_printed_by_tasks_logs(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "loud", "bad"):
        (tmp_path / "in" / f"{name}.txt").write_text(name)
    cmd = ("case {stem} in loud) head -c 3000000 /dev/zero | tr '\\\\0' x;; "
           "bad) echo about to fail; echo 'no such thing' >&2; exit 4;; esac; "
           "echo out of {stem}; echo err of {stem} >&2; cp {src} {out}")
    args = ["--cmd", cmd, "--src", "in/*.txt", "--out", "out/{stem}.txt", "--name", "k"]
    r = run_cli(["run", *args, "--keep-output", "--max-attempts", "1"], tmp_path)
    assert r.returncode == 1, r.stderr  # `bad` failed
    a = run_cli(["logs", *args, "a.txt"], tmp_path)
    assert a.returncode == 0, a.stderr
    assert "==> stdout of 'a.txt'" in a.stdout and "out of a\n" in a.stdout
    assert "==> stderr of 'a.txt'" in a.stdout and "err of a\n" in a.stdout
    assert a.stdout.startswith("==> 'a.txt' succeeded: its output 'out/a.txt' exists\n"), a.stdout
    bad = run_cli(["logs", *args, "bad.txt"], tmp_path)
    assert bad.returncode == 0, bad.stderr
    head = bad.stdout.splitlines()[0]
    assert re.fullmatch(r"==> 'bad.txt': attempt 1 of 1 failed at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC on "
                        r"\S+: exit status 4; given up: `tasks failures --retry` sends it back", head), head
    assert "about to fail" in bad.stdout and "no such thing" in bad.stdout, "a failed key's last attempt"
    assert bad.stdout.index("attempt 1 of 1") < bad.stdout.index("about to fail"), "the verdict comes first"
    loud = run_cli(["logs", *args, "loud.txt"], tmp_path)
    assert "earlier output dropped: only the last 1048576 bytes are kept" in loud.stdout
    kept = sorted((tmp_path / ".spotfan/tasks/k/output").iterdir())
    assert len(kept) == 8 and max(p.stat().st_size for p in kept) <= KEEP_BYTES + 100
    none = run_cli(["logs", *args, "nothing.txt"], tmp_path)
    assert none.returncode == 1 and "'nothing.txt' is not a key of k (4 keys)" in none.stderr
    (tmp_path / "in" / "new.txt").write_text("new")
    new = run_cli(["logs", *args, "new.txt"], tmp_path)
    assert new.returncode == 0 and new.stdout == (
        "==> 'new.txt' has not run yet: no output at 'out/new.txt', no failed attempt recorded\n"), new.stdout


def test_without_keep_output_logs_shows_the_failure_and_function_tasks_refuse_it(tmp_path: Path,
                                                                              write_module) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    args = ["--cmd", "echo broken >&2; exit 3", "--src", "in/*.txt", "--out", "out/{stem}"]
    args[1] = "echo broken >&2; exit 3 # {out}"
    assert run_cli(["run", *args, "--max-attempts", "1"], tmp_path).returncode == 1
    r = run_cli(["logs", *args, "x.txt"], tmp_path)
    assert r.returncode == 0 and "==> 'x.txt': attempt 1 of 1 failed at " in r.stdout, r.stdout
    assert "broken" in r.stdout and "run the task with --keep-output" in r.stdout
    assert run_cli(["failures", *args, "--retry"], tmp_path).returncode == 0
    assert run_cli(["run", *args, "--max-attempts", "3"], tmp_path).returncode == 1
    r = run_cli(["logs", *args, "x.txt"], tmp_path)
    assert "==> 'x.txt': attempt 3 of 3 failed at " in r.stdout, r.stdout
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["a"], out="o/{key}")
        def f(key: str, out: Path) -> None:
            out.write_text(key)
    """)
    r = run_cli(["run", "t:f", "--keep-output"], tmp_path)
    assert r.returncode == 2 and "--keep-output is for --cmd tasks" in r.stderr
