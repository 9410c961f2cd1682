"""A run on an object-store root, end to end through the command line, on both stores."""
from __future__ import annotations
import os, textwrap, json
from tests.conftest import run_cli

TASK = """
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:03d}" for i in range(40)], out="out/{key}.txt")
def make(key: str, out: Path) -> None:
    out.write_text("v:" + key)

@filetask(src="in/*.txt", out="res/{stem}.up")
def upper(src: Path, out: Path) -> None:
    out.write_text(src.read_text().upper())
"""

def test_a_run_publishes_every_key_and_status_counts_them(backend, tmp_path):
    (tmp_path / "t.py").write_text(textwrap.dedent(TASK))
    env = {**os.environ, **backend.env}
    url = f"{backend.scheme}://{backend.bucket_name}/runs/a"
    r = run_cli(["-v", "run", "t:make", "--root", url, "--workers", "2"], cwd=tmp_path, env=env)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0
    for i in range(40):
        assert backend.body(f"runs/a/out/k{i:03d}.txt") == f"v:k{i:03d}".encode()
    r = run_cli(["status", "t:make", "--root", url, "--json"], cwd=tmp_path, env=env)
    print(r.stdout, r.stderr[-2000:])
    assert json.loads(r.stdout)["done"] == 40
    for i in range(5):
        backend.seed(f"runs/a/in/f{i}.txt", b"abc%d" % i)
    r = run_cli(["run", "t:upper", "--root", url, "--workers", "2"], cwd=tmp_path, env=env)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0
    assert backend.body("runs/a/res/f3.up") == b"ABC3"
