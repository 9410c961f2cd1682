"""Unmodified command-line programs over files, via --cmd: inputs for them, and a reader
that turns `sha256sum` outputs into rows for `collect`.

    python -m examples.commands prepare --root DIR [--n 500]
    python -m tasks run --cmd 'gzip -c {src} > {out}' --src 'logs/*.log' \\
        --out 'gz/{name}.gz' --name gzip-logs --root DIR
    python -m tasks run --cmd 'sha256sum < {src} > {out}' --src 'logs/*.log' \\
        --out 'sha256/{stem}.sha256' --name sha256-logs --root DIR
    python -m tasks collect --cmd 'sha256sum < {src} > {out}' --src 'logs/*.log' \\
        --out 'sha256/{stem}.sha256' --name sha256-logs --root DIR \\
        --reader examples.commands:read_sha256 --to sums.parquet

Placeholders are substituted shell-quoted; the command runs in the run root and must
write {out} (a temporary that the engine renames into place when the command exits 0).
`prepare` writes generated application logs, ROOT/logs/app-NNNN.log (about 20 KB each).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_N = 500  # log files made by `prepare`
LINES = 250  # lines per log file
LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARNING", "ERROR")
WORDS = ("request", "user", "cache", "miss", "hit", "timeout", "db", "query", "ok", "retry",
         "shard", "upload", "token", "session", "worker")


def read_sha256(path: Path) -> dict[str, str]:
    """A `collect` reader: one row with the digest `sha256sum` wrote."""
    digest = path.read_text(encoding="ascii").split()[0]
    if len(digest) != 64:
        raise ValueError(f"not a sha256sum output: {digest[:20]!r}...")
    return {"sha256": digest}


def prepare(root: str | Path, *, n: int = DEFAULT_N, seed: int = 0) -> int:
    """Write `n` log files under ROOT/logs/ (those already there are kept)."""
    folder = Path(root) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for i in range(n):
        path = folder / f"app-{i:04d}.log"
        if path.exists():
            continue
        rng = np.random.default_rng([seed, i])
        secs = np.sort(rng.integers(0, 86400, LINES))
        lines = [f"2024-05-{1 + i % 28:02d}T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d} "
                 f"{LEVELS[rng.integers(len(LEVELS))]} "
                 + " ".join(WORDS[w] for w in rng.integers(0, len(WORDS), 8))
                 + f" id={rng.integers(1 << 30)} ms={rng.integers(1, 900)}" for s in secs]
        tmp = path.with_name(f".{path.name}")
        tmp.write_text("\n".join(lines) + "\n", encoding="ascii")
        tmp.rename(path)
        written += 1
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.commands", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--root", required=True, help="run root to write logs/ into")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"log files (default {DEFAULT_N})")
    args = parser.parse_args(argv)
    written = prepare(args.root, n=args.n)
    print(f"wrote {written} log files ({args.n} in all) under {args.root}/logs; next:\n"
          f"  python -m tasks run --cmd 'gzip -c {{src}} > {{out}}' --src 'logs/*.log' "
          f"--out 'gz/{{name}}.gz' --name gzip-logs --root {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
