"""A million keys on one machine: what a runner pays before any work.

Makes a task of --keys keys (keys=, out="out/{key}.txt") whose outputs all exist, then
times, in fresh processes, a no-op re-run (`python -m tasks run`) and `status`, with
each one's peak RSS (goal at 1,000,000 keys: under 3 s and 300 MB); with --full, also a
whole run from nothing (wall time and peak RSS of the runner). Medians of --repeat.

--phases also prints where one no-op run and one `status` spend their time and memory
(imports, making the items, the scan, the rest), from one more process of each.
--against DIR times, round by round alternated with this checkout, another copy of the
`tasks` package (DIR/tasks, e.g. `git archive main tasks | tar -x -C DIR`): an A/B on the
same machine at the same moments, which is what a shared, noisy machine allows.

Usage: python bench/bench_million.py [--keys 1000000] [--dir /var/tmp/...] [--full]
       [--repeat 3] [--phases] [--against DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
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

# Run in the measured process: `python -c PHASES tasks-args...` runs the command line as
# `python -m tasks` does, and marks when the items are made and when the scan ends.
PHASES = r"""
import resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
marks = []
def mark(name):
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    marks.append((name, time.perf_counter() - t0, time.process_time() - c0, rss, peak))
sys.path.insert(0, "")
import tasks.cli, tasks.runner, tasks.spec, tasks.status
mark("imports")
items = tasks.spec.KeySource.items
def timed_items(self, root):
    mark("load the task")
    made = items(self, root)
    mark("make the items")
    return made
tasks.spec.KeySource.items = timed_items
for mod in (sys.modules["tasks.runner"], sys.modules["tasks.status"]):  # not the functions
    def timed_scan(root, found, scan=mod.scan_done):
        mark("(between)")
        done = scan(root, found)
        mark("scan the outputs")
        return done
    mod.scan_done = timed_scan
sys.argv[0] = "tasks"
code = tasks.cli.main(sys.argv[1:])
mark("the rest")
sys.stdout.flush()
print("PHASES " + repr(marks), file=sys.stderr)
sys.exit(code)
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, str, str]:
    """(seconds, peak RSS MB of the child, its last stdout line, its stderr) of one command
    in a fresh process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "dt = time.perf_counter() - t; "
               "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
               "print(p.stdout.strip().splitlines()[-1] if p.stdout.strip() else '', p.returncode); "
               "sys.stderr.write(p.stderr[-4000:])")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True,
                       text=True, check=True, env=env)
    first, second = p.stdout.splitlines()[:2]
    seconds, rss = (float(x) for x in first.split())
    if not second.endswith(" 0"):
        raise SystemExit(f"{' '.join(cmd)} failed: {second}\n{p.stderr}")
    return seconds, rss, second.rsplit(" ", 1)[0], p.stderr


def show_phases(name: str, stderr: str) -> None:
    """Print the phases one PHASES process marked: wall and CPU seconds, RSS after, peak."""
    line = next((ln for ln in stderr.splitlines() if ln.startswith("PHASES ")), None)
    if line is None:
        print(f"  {name}: no phases reported:\n{stderr}")
        return
    marks = eval(line[len("PHASES "):])  # our own repr of a list of tuples
    print(f"  {name}: phase                wall s   cpu s   RSS after MB   peak MB")
    wall0 = cpu0 = 0.0
    for phase, wall, cpu, rss, peak in marks:
        print(f"  {'':{len(name)}}  {phase:20s} {wall - wall0:6.2f}  {cpu - cpu0:6.2f}   {rss:8.0f}   {peak:8.0f}")
        wall0, cpu0 = wall, cpu
    print(f"  {'':{len(name)}}  {'total':20s} {marks[-1][1]:6.2f}  {marks[-1][2]:6.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp/spotfan-bench-million"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--full", action="store_true", help="also time a whole run from nothing")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--phases", action="store_true", help="print where the time and memory go")
    p.add_argument("--against", type=Path, help="a folder holding another copy of tasks/ to compare")
    p.add_argument("--keep", action="store_true",
                   help="keep --dir (and reuse its outputs next time if it has --keys of them)")
    a = p.parse_args()
    if a.against is not None and not (a.against / "tasks" / "__init__.py").is_file():
        raise SystemExit(f"--against {a.against}: no tasks/__init__.py there; make it with "
                         f"`git archive main tasks | tar -x -C {a.against}`")
    root = a.dir
    stamp = root / ".made"
    reuse = a.keep and not a.full and stamp.is_file() and stamp.read_text() == str(a.keys)
    if not reuse:
        shutil.rmtree(root, ignore_errors=True)
        (root / "out").mkdir(parents=True)
        (root / "million_task.py").write_text(TASK.format(n=a.keys))
    codes = {"this checkout": {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}}
    if a.against is not None:
        codes[f"{a.against}"] = {**os.environ, "PYTHONPATH": str(a.against.resolve())}
    py = [sys.executable, "-m", "tasks"]
    if a.full:
        s, rss, summary, _ = timed([*py, "run", "million_task:million", "--workers", str(a.workers)],
                                   root, codes["this checkout"])
        print(f"whole run of {a.keys} keys, {a.workers} workers: {s:.1f} s, runner peak RSS "
              f"{rss:.0f} MB  {summary}")
    elif not reuse:
        t = time.perf_counter()
        out = root / "out"
        for i in range(a.keys):
            with open(out / f"k{i:07d}.txt", "w") as f:
                f.write("x")
        print(f"(made {a.keys} outputs in {time.perf_counter() - t:.1f} s)")
    if a.keep:
        stamp.write_text(str(a.keys))
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    commands = (("no-op re-run", ["run", "million_task:million"]),
                ("status", ["status", "million_task:million", "--json"]))
    rows: dict[tuple[str, str], list[tuple[float, float, str, str]]] = {}
    for _ in range(a.repeat):  # round by round, every code and command in turn
        for code, env in codes.items():
            for name, args in commands:
                rows.setdefault((code, name), []).append(timed([*py, *args], root, env))
    for code in codes:
        if len(codes) > 1:
            print(f"{code}:")
        for name, _ in commands:
            got = rows[(code, name)]
            s = statistics.median(r[0] for r in got)
            rss = statistics.median(r[1] for r in got)
            detail = got[-1][2]
            if name == "status":
                st = json.loads(detail)
                detail = f"done {st['done']}/{st['total']}"
            print(f"{name:13s} {a.keys} keys: {s:6.2f} s (goal < 3 s: {'met' if s < 3 else 'NOT met'}), "
                  f"peak RSS {rss:5.0f} MB (goal < 300 MB: {'met' if rss < 300 else 'NOT met'}); "
                  f"rounds {', '.join(f'{r[0]:.2f}' for r in got)}; {detail}")
    if a.phases:
        for code, env in codes.items():
            print(f"phases, {code}:")
            for name, args in commands:
                show_phases(name, timed([sys.executable, "-c", PHASES, *args], root, env)[3])
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
