"""Running tasks: outputs published whole, skips, failures recorded, pools that survive."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.layout import key_id
from tests.conftest import run_cli


def inputs(root: Path, n: int, folder: str = "data") -> list[str]:
    (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"img{i:03d}.txt" for i in range(n)]
    for name in names:
        (root / folder / name).write_text(name)
    return names


def summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_run_publishes_every_output_and_skips_done_keys(tmp_path: Path, write_module) -> None:
    inputs(tmp_path, 30)
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(src="data/*.txt", out="features/{stem}.npy")
        def feat(src: Path, out: Path) -> None:
            assert out.suffix == ".npy" and out.name.endswith(src.stem + ".npy")
            assert not str(out).startswith(str(Path.cwd() / "features"))  # a temporary
            out.write_text(src.read_text()[::-1])
    """)
    first = run_cli(["run", "t:feat", "--workers", "2"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert summary(first)["succeeded"] == 30
    outs = sorted(p.name for p in (tmp_path / "features").iterdir())
    assert outs == [f"img{i:03d}.npy" for i in range(30)]
    assert (tmp_path / "features/img007.npy").read_text() == "txt.700gmi"
    # a second run finds everything done and runs nothing
    (tmp_path / "features/img007.npy").write_text("kept")
    second = run_cli(["run", "t:feat"], tmp_path)
    assert second.returncode == 0 and summary(second)["ran"] == 0
    assert (tmp_path / "features/img007.npy").read_text() == "kept"
    # nothing outside the outputs and .spotfan/ was written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == \
        [".spotfan", "data", "features", "t.py"]
    assert list((tmp_path / ".spotfan/tmp").iterdir()) == []


def test_only_names_that_are_a_keys_output_count_as_done(tmp_path: Path) -> None:
    """The scan turns each listed name back into its key: names without the template's
    prefix or suffix, or too short to hold a key, are not any key's output."""
    out = tmp_path / "o"
    out.mkdir()
    strays = {"b.txt": "no prefix", "zb.txt": "another prefix", "xc": "no suffix",
              "xcnope": "another suffix", "x.txt": "no key", "xz.txt": "not a key",
              "xa.txt.tmp": "longer", "y": "a folder"}
    for name, text in strays.items():
        if name == "y":
            (out / name).mkdir()
        else:
            (out / name).write_text(text)
    (out / "xa.txt").write_text("done before\n")
    (tmp_path / "keys.txt").write_text("a\nb\nc\nx\n.txt\n")
    args = ["--cmd", "printf '%s' {key} > {out}", "--keys", "keys.txt", "--out", "o/x{key}.txt"]
    st = json.loads(run_cli(["status", *args, "--json"], tmp_path).stdout)
    assert (st["total"], st["done"], st["pending"]) == (5, 1, 4)
    dry = json.loads(run_cli(["run", *args, "--dry-run", "--json"], tmp_path).stdout)
    assert (dry["done"], dry["left"]) == (1, 4), dry
    proc = run_cli(["run", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["done_before"], report["succeeded"]) == (1, 4), report
    assert (out / "xa.txt").read_text() == "done before\n", "a done key is not run again"
    for key in ("b", "c", "x", ".txt"):
        assert (out / f"x{key}.txt").read_text() == key
    for name, text in strays.items():
        assert name == "y" or (out / name).read_text() == text, f"{name} is left alone"


def test_a_failing_key_does_not_stop_the_others(tmp_path: Path, write_module) -> None:
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i}" for i in range(20)], out="out/{key}")
        def flaky(key: str, out: Path) -> None:
            if key == "k13":
                raise ValueError("cannot parse k13: bad header")
            out.write_text(key)
    """)
    proc = run_cli(["run", "t:flaky", "--max-attempts", "2", "--workers", "2"], tmp_path)
    assert proc.returncode == 1
    assert "1 key(s) failed after 2 attempt(s): 'k13'" in proc.stderr
    assert "--retry-failed" in proc.stderr
    assert len(list((tmp_path / "out").iterdir())) == 19
    record = json.loads((tmp_path / f".spotfan/tasks/flaky/failed/{key_id('k13')}.json").read_text())
    assert record["attempts"] == 2 and record["gave_up"] is True
    assert record["error"] == "ValueError: cannot parse k13: bad header"
    assert "Traceback" in record["detail"] and "raise ValueError" in record["detail"]
    st = json.loads(run_cli(["status", "t:flaky", "--json"], tmp_path).stdout)
    assert (st["total"], st["done"], st["failed"], st["running"], st["pending"]) == (20, 19, 1, 0, 0)
    # a later run skips the failed key unless asked to retry it
    again = run_cli(["run", "t:flaky"], tmp_path)
    assert again.returncode == 1 and summary(again)["ran"] == 0
    retry = run_cli(["run", "t:flaky", "--retry-failed", "--max-attempts", "1"], tmp_path)
    assert retry.returncode == 1 and summary(retry)["ran"] == 1


def test_fixed_failure_is_retried_and_its_record_cleared(tmp_path: Path, write_module) -> None:
    (tmp_path / "broken").write_text("1")
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["a", "b"], out="out/{key}")
        def f(key: str, out: Path) -> None:
            if key == "b" and Path("broken").exists():
                raise RuntimeError("still broken")
            out.write_text(key)
    """)
    assert run_cli(["run", "t:f", "--max-attempts", "1"], tmp_path).returncode == 1
    (tmp_path / "broken").unlink()
    proc = run_cli(["run", "t:f", "--retry-failed"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out/b").read_text() == "b"
    assert list((tmp_path / ".spotfan/tasks/f/failed").iterdir()) == []


def test_directory_outputs(tmp_path: Path, write_module) -> None:
    inputs(tmp_path, 5)
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(src="data/*.txt", out="tiles/{stem}/")
        def tiles(src: Path, out: Path) -> None:
            assert out.is_dir()
            for i in range(3):
                (out / f"tile{i}.txt").write_text(f"{src.stem}-{i}")
    """)
    assert run_cli(["run", "t:tiles"], tmp_path).returncode == 0
    d = tmp_path / "tiles/img004"
    assert sorted(p.name for p in d.iterdir()) == ["tile0.txt", "tile1.txt", "tile2.txt"]
    assert (d / "tile2.txt").read_text() == "img004-2"
    st = json.loads(run_cli(["status", "t:tiles", "--json"], tmp_path).stdout)
    assert st["done"] == 5


def test_initializer_runs_once_per_process(tmp_path: Path, write_module) -> None:
    write_module("t", """
        import os
        from pathlib import Path
        from tasks import filetask

        def load_model():
            Path("inits").mkdir(exist_ok=True)
            Path(f"inits/{os.getpid()}").write_text("loaded")
            return {"weights": 42, "pid": os.getpid()}

        @filetask(keys=[str(i) for i in range(200)], out="out/{key}", init=load_model)
        def predict(key: str, out: Path, ctx) -> None:
            assert ctx["pid"] == os.getpid()
            out.write_text(str(ctx["weights"] + int(key)))
    """)
    proc = run_cli(["run", "t:predict", "--workers", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "inits").iterdir())) == 2  # two processes, one load each
    assert (tmp_path / "out/100").read_text() == "142"


def test_a_worker_that_dies_does_not_break_the_run(tmp_path: Path, write_module) -> None:
    write_module("t", """
        import os, signal
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i:02d}" for i in range(40)], out="out/{key}")
        def fragile(key: str, out: Path) -> None:
            if key == "k17":
                os.kill(os.getpid(), signal.SIGKILL)  # like the OOM killer
            out.write_text(key)
    """)
    proc = run_cli(["run", "t:fragile", "--workers", "2", "--max-attempts", "2",
                    "--chunk-size", "5"], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        [f"k{i:02d}" for i in range(40) if i != 17]
    record = json.loads((tmp_path / f".spotfan/tasks/fragile/failed/{key_id('k17')}.json").read_text())
    assert record["error"].startswith("worker process died") and record["attempts"] == 2


def test_initializer_that_always_fails_stops_with_a_clear_error(tmp_path: Path, write_module) -> None:
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        def init():
            raise OSError("model file missing")

        @filetask(keys=["a"], out="out/{key}", init=init)
        def f(key: str, out: Path, ctx) -> None:
            out.write_text(key)
    """)
    proc = run_cli(["run", "t:f"], tmp_path)
    assert proc.returncode == 1
    assert "worker processes die before finishing any work" in proc.stderr
    assert "model file missing" in proc.stderr


def test_hash_keys_and_fsync(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.bin").write_bytes(b"same")
    (tmp_path / "in/b.bin").write_bytes(b"same")  # identical content: one key
    (tmp_path / "in/c.bin").write_bytes(b"other")
    proc = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "in/*.bin", "--key", "hash",
                    "--out", "by-hash/{key}.bin", "--fsync"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    outs = sorted((tmp_path / "by-hash").iterdir())
    assert len(outs) == 2 and {p.read_bytes() for p in outs} == {b"same", b"other"}
    assert all(len(p.stem) == 16 for p in outs)


def test_cmd_failure_records_stderr(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("good\nbad\n")
    proc = run_cli(["run", "--cmd", "test {key} = good || (echo 'no such frame' >&2; exit 3) || exit 3; "
                    "echo {key} > {out}", "--keys", str(keys), "--out", "o/{key}",
                    "--max-attempts", "1", "--name", "conv"], tmp_path)
    assert proc.returncode == 1
    record = json.loads((tmp_path / f".spotfan/tasks/conv/failed/{key_id('bad')}.json").read_text())
    assert record["error"] == "exit status 3" and "no such frame" in record["detail"]
    assert (tmp_path / "o/good").read_text() == "good\n"


def test_leftover_temporaries_of_dead_workers_are_swept(tmp_path: Path, write_module) -> None:
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["a", "b"], out="out/{key}.txt")
        def f(key: str, out: Path) -> None:
            out.write_text(key)
    """)
    dead = tmp_path / ".spotfan/tmp/deadhost-1-abc"
    dead.mkdir(parents=True)
    (dead / "7-0.a.txt").write_text("half wri")  # a dead worker's partial temporary
    old = time.time() - 3600
    os.utime(dead, (old, old))
    proc = run_cli(["run", "t:f"], tmp_path)
    assert proc.returncode == 0
    assert not dead.exists()
    assert (tmp_path / "out/a.txt").read_text() == "a"


def test_limit_and_status_show_live_claims(tmp_path: Path, write_module) -> None:
    write_module("t", """
        import time
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i}" for i in range(6)], out="out/{key}")
        def slow(key: str, out: Path) -> None:
            if Path("go-slow").exists():
                time.sleep(300)  # killed at the end of the test
            out.write_text(key)
    """)
    proc = run_cli(["run", "t:slow", "--limit", "2", "--workers", "1"], tmp_path)
    assert proc.returncode == 0 and summary(proc)["succeeded"] == 2
    (tmp_path / "go-slow").write_text("1")
    # one worker holds the claim of the unit whose key it runs and of the next one queued for
    # it: two keys. Units are crc32(key) % 6 and k0, k2 share unit 3, so when the first run did
    # neither, those two keys may be one claim file.
    runner = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow", "--workers", "1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90  # generous: the machine may be busy
        st: dict = {}
        while time.monotonic() < deadline:
            st = json.loads(run_cli(["status", "t:slow", "--json"], tmp_path).stdout)
            claims = list((tmp_path / ".spotfan/tasks/slow/claims").glob("*"))
            if st["running"] >= 2:
                break
            time.sleep(0.3)
        assert 1 <= len(claims) <= 2, claims
        assert (st["total"], st["done"]) == (6, 2)
        assert st["running"] >= 2 and st["running"] + st["pending"] == 4, st
        assert len(st["owners"]) == 1
    finally:
        os.killpg(runner.pid, 9)
        runner.wait()


def test_thread_executor_and_parent_placeholder(tmp_path: Path) -> None:
    for sub in ("a", "a/b", ""):
        (tmp_path / "in" / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / sub / "x.txt").write_text(f"in {sub}")
    proc = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "in/**/*.txt",
                    "--out", "mirror/{parent}/{stem}.copy", "--executor", "thread"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = sorted(str(p.relative_to(tmp_path / "mirror")) for p in (tmp_path / "mirror").rglob("*.copy"))
    assert got == ["a/b/x.copy", "a/x.copy", "x.copy"]
    assert (tmp_path / "mirror/a/b/x.copy").read_text() == "in a/b"


def test_sigterm_releases_claims_and_removes_temporaries(tmp_path: Path, write_module) -> None:
    write_module("t", """
        import time
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i}" for i in range(8)], out="out/{key}")
        def slow(key: str, out: Path) -> None:
            out.write_text("partial")
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "run", "t:slow", "--workers", "2"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    claims = tmp_path / ".spotfan/tasks/slow/claims"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (claims.exists() and any(claims.iterdir())):
        time.sleep(0.1)
    time.sleep(0.5)  # let the workers start writing their temporaries
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    assert list(claims.iterdir()) == [], "claims must be released on SIGTERM"
    assert list((tmp_path / ".spotfan/tmp").iterdir()) == []
    assert list((tmp_path / ".spotfan/owners").iterdir()) == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_an_unusable_root_exits_3_not_failed(tmp_path: Path, write_module) -> None:
    """A root that cannot be written (here: the claims folder is a file) is not a task
    failure: exit 3 says "try again", so a cluster agent restarts rather than gives up."""
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["a", "b"], out="out/{key}")
        def f(key: str, out: Path) -> None:
            out.write_text(key)
    """)
    (tmp_path / ".spotfan/tasks/f").mkdir(parents=True)
    (tmp_path / ".spotfan/tasks/f/claims").write_text("not a folder")
    proc = run_cli(["run", "t:f"], tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "the run root could not be used" in proc.stderr and "run the same command again" in proc.stderr
    assert not (tmp_path / "out").exists()
