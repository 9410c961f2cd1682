"""`run --dry-run`: the counts, first keys and command lines of a run, with nothing claimed or written."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import run_cli


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every path under root with its kind, bytes and mtime (ns): byte-identical means equal."""
    got = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            got[str(p.relative_to(root))] = ("d" if p.is_dir() else "f",
                                             b"" if p.is_dir() else p.read_bytes(), st.st_mtime_ns)
    return got


def test_dry_run_of_a_command_says_what_would_run_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i in range(12):
        (tmp_path / "data" / f"f{i:02d}.txt").write_text(str(i))
    (tmp_path / "data" / "it's odd.txt").write_text("odd")
    cmd = ["--cmd", "grep -vq 3 {src} && cp {src} {out}", "--src", "data/*.txt",
           "--out", "out/{stem}.txt"]
    before = snapshot(tmp_path)
    fresh = run_cli(["run", *cmd, "--dry-run", "--json"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert snapshot(tmp_path) == before, "a dry run on a fresh root wrote something"
    got = json.loads(fresh.stdout)
    assert (got["total"], got["done"], got["failed"], got["left"]) == (13, 0, 0, 13)
    assert got["chunking"]["plan_exists"] is False and got["chunking"]["chunk_size"] is None

    # A real run: 12 done, f03 fails for good (one attempt), then a dry run of what is left.
    real = run_cli(["run", *cmd, "--max-attempts", "1"], tmp_path)
    assert real.returncode == 1, real.stderr
    (tmp_path / "data" / "new.txt").write_text("new")
    (tmp_path / "out" / "f05.txt").unlink()
    before = snapshot(tmp_path)
    dry = run_cli(["run", *cmd, "--dry-run", "--limit", "1", "--chunk-size", "7"], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert snapshot(tmp_path) == before, "a dry run after a run wrote something"
    lines = dry.stdout.splitlines()
    task = json.loads(real.stdout.splitlines()[-1])["task"]
    assert lines[0] == (f"dry run of {task} in {tmp_path}: 14 keys, 11 done, 1 failed, 2 left; --limit runs 1")
    assert lines[1] == "first keys that would run:"
    assert lines[2] in ("  'f05.txt'", "  'new.txt'")
    src = "data/" + lines[2].strip().strip("'")
    assert lines[3] == f"    $ grep -vq 3 {tmp_path}/{src} && cp {tmp_path}/{src} " \
                       f"{tmp_path}/out/{Path(src).stem}.txt"
    assert lines[4].startswith("chunking: ") and "7 key(s) per chunk (--chunk-size)" in lines[4]
    assert "(its plan)" in lines[4]
    assert lines[-1] == "nothing was claimed or written; run without --dry-run to start"

    retry = json.loads(run_cli(["run", *cmd, "--dry-run", "--json", "--retry-failed"], tmp_path).stdout)
    assert (retry["failed"], retry["left"], retry["retrying"]) == (0, 3, 1)
    assert "f03.txt" in retry["keys"]
    assert snapshot(tmp_path) == before


def test_dry_run_checks_options_like_a_run(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    bad = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "data/*", "--out", "o/{stem}",
                   "--dry-run", "--root", str(tmp_path / "nowhere")], tmp_path)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
    alone = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "data/*", "--out", "o/{stem}",
                     "--json"], tmp_path)
    assert alone.returncode == 2 and "--json goes with --dry-run" in alone.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / ".spotfan").exists()
