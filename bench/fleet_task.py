"""The fleet benchmark's tasks and its naive contender, run inside lab VMs on the share.

BENCH_IN (inputs folder), BENCH_OUT (outputs folder) and BENCH_SLEEP_MS choose the run.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tasks import filetask

IN = os.environ.get("BENCH_IN", "in")
OUT = os.environ.get("BENCH_OUT", "out")
SLEEP_S = float(os.environ.get("BENCH_SLEEP_MS", "0")) / 1000
PAD = b"x" * 90  # each output is ~100 bytes


@filetask(src=f"{IN}/*.txt", out=f"{OUT}/{{stem}}.txt", key="stem")
def tiny(src: Path, out: Path) -> None:
    """Read the input, write ~100 bytes (and sleep BENCH_SLEEP_MS, for the slow-keys run)."""
    data = src.read_bytes()
    if SLEEP_S:
        time.sleep(SLEEP_S)
    out.write_bytes(data + PAD)


def _naive_worker(args: tuple[str, str, str, int]) -> int:
    """The seed's loop, as users write it: list, shuffle, exists(), write in place."""
    root, src_dir, out_dir, seed = args
    names = os.listdir(os.path.join(root, src_dir))
    random.Random(seed).shuffle(names)
    wrote = 0
    for name in names:
        if not name.endswith(".txt"):
            continue
        out = os.path.join(root, out_dir, name)
        if os.path.exists(out):
            continue
        with open(os.path.join(root, src_dir, name), "rb") as f:
            data = f.read()
        if SLEEP_S:
            time.sleep(SLEEP_S)
        with open(out, "wb") as f:
            f.write(data + PAD)
        wrote += 1
    return wrote


def naive(root: str, workers: int) -> dict[str, float]:
    os.makedirs(os.path.join(root, OUT), exist_ok=True)
    t = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        wrote = sum(pool.map(_naive_worker, [(root, IN, OUT, os.getpid() * 100 + i)
                                             for i in range(workers)]))
    return {"wrote": wrote, "seconds": time.perf_counter() - t}


if __name__ == "__main__":
    print(json.dumps(naive(sys.argv[1], int(sys.argv[2]))))
