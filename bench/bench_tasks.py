"""Throughput of spotfan on tiny keyed tasks, side by side with the naive pattern and GNU
Parallel, and the cost of re-running a finished run. Prints a table.

    .venv/bin/python bench/bench_tasks.py [--keys 20000] [--repeats 3] [--workers 2]

Every contender runs in a fresh directory on the same disk, interleaved round by round,
so that a noisy neighbour hurts all of them alike; medians are reported.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def spotfan(root: Path, workers: int, keys: int) -> float:
    env = {**os.environ, "BENCH_KEYS": str(keys), "PYTHONPATH": str(HERE)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tasks", "run", "tiny_task:tiny", "--root", str(root),
                    "--workers", str(workers)], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


NAIVE = """
import sys, time
from concurrent.futures import ProcessPoolExecutor
sys.path.insert(0, {here!r})
import tiny_task
root, n, workers = {root!r}, {keys}, {workers}
keys = [f"k{{i:06d}}" for i in range(n)]
with ProcessPoolExecutor(workers) as pool:
    list(pool.map(tiny_task.naive_one, [(root, k) for k in keys]))
"""


def naive(root: Path, workers: int, keys: int) -> float:
    (root / "out").mkdir()
    code = NAIVE.format(here=str(HERE), root=str(root), keys=keys, workers=workers)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def gnu_parallel(root: Path, workers: int, keys: int) -> float:
    (root / "out").mkdir()
    keyfile = root / "keys.txt"
    keyfile.write_text("".join(f"k{i:06d}\n" for i in range(keys)))
    t0 = time.perf_counter()
    subprocess.run(["parallel", "--will-cite", "-j", str(workers), "-a", str(keyfile),
                    "test -e out/{}.txt || echo -n {} > out/{}.txt"], cwd=root, check=True)
    return time.perf_counter() - t0


def rerun(root: Path, workers: int, keys: int) -> float:
    return spotfan(root, workers, keys)


def stat_calls(root: Path, workers: int, keys: int) -> tuple[int, int]:
    """(stat-family syscalls, directory reads) of a re-run over a finished root, by strace."""
    if not shutil.which("strace"):
        return -1, -1
    env = {**os.environ, "BENCH_KEYS": str(keys), "PYTHONPATH": str(HERE)}
    out = subprocess.run(["strace", "-f", "-c", "-e", "trace=%stat,getdents64", sys.executable,
                          "-m", "tasks", "run", "tiny_task:tiny", "--root", str(root),
                          "--workers", str(workers)], env=env, capture_output=True, text=True,
                         check=True).stderr
    stats = dirs = 0
    for line in out.splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m:
            if m.group(2) == "getdents64":
                dirs += int(m.group(1))
            else:
                stats += int(m.group(1))
    return stats, dirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel-repeats", type=int, default=1,
                    help="GNU Parallel is slow (a few ms per job): fewer repeats")
    ap.add_argument("--dir", default=None, help="where to make the scratch roots (default: /tmp)")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"spotfan": [], "naive": [], "parallel": [], "rerun": []}
    base = Path(tempfile.mkdtemp(prefix="spotfan-bench-", dir=args.dir))
    print(f"{args.keys} tiny tasks, {args.workers} workers, {args.repeats} rounds, in {base}",
          flush=True)
    try:
        for r in range(args.repeats):
            for name, fn in (("spotfan", spotfan), ("naive", naive), ("parallel", gnu_parallel)):
                if name == "parallel" and (r >= args.parallel_repeats or not shutil.which("parallel")):
                    continue
                root = base / f"{name}-{r}"
                root.mkdir()
                t = fn(root, args.workers, args.keys)
                n = len(os.listdir(root / "out"))
                assert n == args.keys, f"{name} produced {n} outputs, not {args.keys}"
                times[name].append(t)
                print(f"  round {r + 1}: {name:9s} {t:7.2f} s  ({args.keys / t:8.0f} tasks/s)", flush=True)
                if name == "spotfan":
                    times["rerun"].append(rerun(root, args.workers, args.keys))
            for name in ("naive", "parallel"):
                shutil.rmtree(base / f"{name}-{r}", ignore_errors=True)
        stats, dirs = stat_calls(base / "spotfan-0", args.workers, args.keys)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print()
    print(f"| contender ({args.keys} keys, {args.workers} workers) | median wall s | tasks/s | spotfan speed-up |")
    print("|---|---:|---:|---:|")
    for name, label in (("spotfan", "spotfan `python -m tasks run`"),
                        ("naive", "naive `ProcessPoolExecutor.map`, one submission + exists() per key"),
                        ("parallel", "GNU Parallel, one job per key")):
        if name in med:
            print(f"| {label} | {med[name]:.2f} | {args.keys / med[name]:.0f} | "
                  f"{med[name] / med['spotfan']:.1f}x |")
    print(f"| re-run over the finished run (nothing to do) | {med['rerun']:.3f} | - | - |")
    if stats >= 0:
        print(f"\nre-run syscalls (strace): {stats} stat-family calls for {args.keys} keys "
              f"({stats / args.keys:.3f} per key), {dirs} getdents64 calls")


if __name__ == "__main__":
    main()
