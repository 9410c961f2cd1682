"""A million keys on one machine: what a runner pays before any work.

Makes a task of --keys keys (keys=, out="out/{key}.txt") whose outputs all exist, then
times, in fresh processes, a no-op re-run (`python -m tasks run`) and `status`, with
each one's peak RSS (goal at 1,000,000 keys: under 3 s and 300 MB); with --full, also a
whole run from nothing (wall time and peak RSS of the runner). Medians of --repeat.
Usage: python bench/bench_million.py [--keys 1000000] [--dir /var/tmp/...] [--full]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TASK = """
from pathlib import Path
from tasks import filetask

N = {n}

@filetask(keys=lambda: (f"k{{i:07d}}" for i in range(N)), out="out/{{key}}.txt")
def million(key: str, out: Path) -> None:
    out.write_text(key)
"""


def timed(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(seconds, peak RSS MB of the child, stdout) of one command in a fresh process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "dt = time.perf_counter() - t; "
               "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
               "print(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else '', p.returncode); "
               "sys.stderr.write(p.stderr[-2000:])")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True,
                       text=True, check=True)
    first, second = p.stdout.splitlines()[:2]
    seconds, rss = (float(x) for x in first.split())
    if not second.endswith(" 0"):
        raise SystemExit(f"{' '.join(cmd)} failed: {second}\n{p.stderr}")
    return seconds, rss, second.rsplit(" ", 1)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/spotfan-bench-million"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also time a whole run from nothing")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    root = a.dir
    shutil.rmtree(root, ignore_errors=True)
    (root / "out").mkdir(parents=True)
    (root / "million_task.py").write_text(TASK.format(n=a.keys))
    py = [sys.executable, "-m", "tasks"]
    if a.full:
        s, rss, summary = timed([*py, "run", "million_task:million", "--workers", str(a.workers)], root)
        print(f"whole run of {a.keys} keys, {a.workers} workers: {s:.1f} s, runner peak RSS "
              f"{rss:.0f} MB  {summary}")
    else:
        t = time.perf_counter()
        out = root / "out"
        for i in range(a.keys):
            with open(out / f"k{i:07d}.txt", "w") as f:
                f.write("x")
        print(f"(made {a.keys} outputs in {time.perf_counter() - t:.1f} s)")
    for name, cmd in (("no-op re-run", [*py, "run", "million_task:million"]),
                      ("status", [*py, "status", "million_task:million", "--json"])):
        rows = [timed(cmd, root) for _ in range(a.repeat)]
        s = statistics.median(r[0] for r in rows)
        rss = statistics.median(r[1] for r in rows)
        detail = rows[-1][2]
        if name == "status":
            st = json.loads(detail)
            detail = f"done {st['done']}/{st['total']}"
        print(f"{name:13s} {a.keys} keys: {s:6.2f} s (goal < 3 s: {'met' if s < 3 else 'NOT met'}), "
              f"peak RSS {rss:5.0f} MB (goal < 300 MB: {'met' if rss < 300 else 'NOT met'}); "
              f"rounds {', '.join(f'{r[0]:.2f}' for r in rows)}; {detail}")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
