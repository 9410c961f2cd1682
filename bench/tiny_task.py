"""The benchmark's task: 20,000 tiny keyed tasks, each writing a small file."""
from __future__ import annotations

import os
from pathlib import Path

from tasks import filetask

N_KEYS = int(os.environ.get("BENCH_KEYS", "20000"))


def keys() -> list[str]:
    return [f"k{i:06d}" for i in range(N_KEYS)]


@filetask(keys=keys, out="out/{key}.txt")
def tiny(key: str, out: Path) -> None:
    out.write_text(key)


def naive_one(args: tuple[str, str]) -> None:
    """The usual hand-made pattern: one exists() per key, then write in place."""
    root, key = args
    path = os.path.join(root, "out", f"{key}.txt")
    if os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(key)
