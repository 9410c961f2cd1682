"""How long a runner takes to start its first key on a lab VM, alone and with its peers.

Brings up a lab cluster (as bench_fleet.py does) and times, from the launch of
`python -m tasks run fleet_task:tiny --fetch --limit N` on 1 VM and on --vms VMs at once
to the first key's start in the execution logs, --rounds times each. With --code A,B it
runs two checkouts side by side (PYTHONPATH=A or B in front of the installed spotfan),
alternated round by round, to compare a change's start with the code before it.
Usage: python bench/bench_start.py [--vms 4] [--rounds 7] [--code /old/checkout,/new/checkout]
The lab uses 127.$SPOTFAN_TEST_OCTET.0.x and head port $SPOTFAN_TEST_PORT_BASE + 90. Needs root.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetlab import clean, commands, lab, prepare_inputs  # noqa: E402


def first_key_after(fleet, n_vms: int, cmd: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds from the launch on n_vms VMs to the first key's start on any of them."""
    clean(fleet.share)
    launched = time.time()  # the lab's VMs share this machine's clock
    fleet.run_all(n_vms, f"cd {shlex.quote(fleet.config.mount_point)} && {cmd}")
    starts = [json.loads(line)["start"] for p in fleet.share.glob(".spotfan/tasks/tiny/log/*.jsonl")
              for line in p.read_text().splitlines() if line.strip()]
    return min(starts) - launched


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=4)
    p.add_argument("--workers-per-vm", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inputs", type=int, default=2000, help="inputs listed at the start")
    p.add_argument("--slow-ms", type=float, default=50)
    p.add_argument("--code", default="", help="two checkouts to compare, comma-separated (default: this one)")
    a = p.parse_args()
    trees = [c for c in a.code.split(",") if c] or [""]
    for tree in trees:
        if tree and not (Path(tree) / "tasks" / "__main__.py").is_file():
            p.error(f"--code {tree}: no tasks/__main__.py there; give the root of a spotfan checkout")
    w = a.workers_per_vm
    with lab("start", a.vms, w) as (_, fleet):
        folder = prepare_inputs(fleet.share, a.inputs)
        cmd = commands(folder, w, a.slow_ms)["spotfan --fetch"] + f" --limit {2 * w}"
        print(f"lab cluster: {a.vms} VMs x {w} workers; {a.inputs} inputs; the first key's start "
              f"after the launch of `tasks run --fetch`, median of {a.rounds} rounds")
        got: dict[tuple[int, str], list[float]] = {}
        for r in range(a.rounds):
            for n in sorted({1, a.vms}):
                for tree in (trees if r % 2 == 0 else trees[::-1]):
                    env = f"PYTHONPATH={shlex.quote(tree)} " if tree else ""
                    got.setdefault((n, tree), []).append(first_key_after(fleet, n, env + cmd))
        for (n, tree), v in sorted(got.items()):
            print(f"  {n} VM(s) at once{', ' + tree if tree else ''}: {statistics.median(v):.2f} s "
                  f"(rounds {', '.join(f'{x:.2f}' for x in v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
