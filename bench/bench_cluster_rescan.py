"""Re-scanning a finished 20,000-key run over SSHFS: the engine's scan vs one exists() per key.

Brings up a one-VM lab cluster, puts 20,000 inputs and their 20,000 outputs on the head,
then, inside the VM over its SSHFS mount (mounted with spotfan's many-writer options, so
no attribute cache helps either side), times:
  - the engine's re-scan, `tasks.scan.scan_done` (one listing per output folder);
  - the usual loop, `os.path.exists(output)` once per key;
  - the whole command a user runs again, `python -m tasks run` on the finished run,
    against a script that lists the inputs and calls exists() per key.
Goal: the re-scan at least 50x faster than exists() per key. Needs root.
Usage: python bench/bench_cluster_rescan.py [--keys 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STATE = Path("/tmp/spotfan-bench-rescan")
CMD, SRC, OUT = "cp {src} {out}", "in/*.txt", "out/{stem}.txt"
NAIVE = """
import glob, os, sys
os.chdir(sys.argv[1])
print(sum(os.path.exists("out/" + os.path.basename(p)[:-4] + ".txt") for p in glob.glob("in/*.txt")))
"""


def inside(root: Path, repeat: int) -> dict[str, object]:
    """Run in the VM: time each way of finding what is done, `repeat` times."""
    from tasks.scan import scan_done
    from tasks.spec import load_spec

    task = load_spec(None, cmd=CMD, src=SRC, out=OUT)
    t = time.perf_counter()
    items = task.items(root)
    list_inputs = time.perf_counter() - t
    scan, exists, cli, naive = [], [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        done = scan_done(root, items)
        scan.append(time.perf_counter() - t)
        t = time.perf_counter()
        present = sum(os.path.exists(root / it.out) for it in items)
        exists.append(time.perf_counter() - t)
        assert len(done) == present == len(items), (len(done), present, len(items))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tasks", "run", "--cmd", CMD, "--src", SRC, "--out", OUT,
                            "--root", str(root), "--workers", "1"], capture_output=True, text=True)
        cli.append(time.perf_counter() - t)
        assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["ran"] == 0, r.stderr
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", NAIVE, str(root)], capture_output=True, text=True)
        naive.append(time.perf_counter() - t)
        assert int(r.stdout) == len(items)
    return {"keys": len(items), "list_inputs": list_inputs, "scan": scan, "exists": exists,
            "cli": cli, "naive": naive}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--inside", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inside:
        print(json.dumps(inside(a.inside, a.repeat)))
        return 0

    from cluster import lifecycle
    from cluster.config import load
    from cluster.session import Cluster

    if (STATE / "cluster.toml").exists():
        with Cluster(load(STATE / "cluster.toml")) as leftover:
            lifecycle.down(leftover)
    shutil.rmtree(STATE, ignore_errors=True)
    STATE.mkdir(parents=True)
    (STATE / "cluster.toml").write_text(f"""
[cluster]
name = "rescan"
provider = "lab"
workers = 1
idle_timeout = 600
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"
[head]
address = "127.0.0.1"
port = 2398
share = "share"
[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/known_hosts"
command_timeout = 900
[lab]
state_dir = "state"
address_prefix = "127.0.98."
""")
    config = load(STATE / "cluster.toml")
    share = config.head.share
    for d in ("in", "out"):
        (share / d).mkdir(parents=True)
    for i in range(a.keys):
        (share / "in" / f"{i:06d}.txt").write_text(f"{i}\n")
        (share / "out" / f"{i:06d}.txt").write_text(f"{i}\n")
    cluster = Cluster(config)
    try:
        lifecycle.up(cluster)
        vm = lifecycle.running_hosts(cluster)[0]
        remote = cluster.remote
        cmd = (f"PYTHONPATH={shlex.quote(str(REPO))} {shlex.quote(sys.executable)} "
               f"{shlex.quote(str(Path(__file__).resolve()))} --inside {shlex.quote(config.mount_point)} "
               f"--repeat {a.repeat}")
        with remote.open(vm) as conn:
            out = remote.run_on(conn, vm, cmd, timeout=900)
        r = json.loads(out.stdout)
    finally:
        lifecycle.down(cluster)
        cluster.close()
        shutil.rmtree(STATE, ignore_errors=True)
    med = {k: statistics.median(r[k]) for k in ("scan", "exists", "cli", "naive")}
    print(f"finished run, {r['keys']} keys, over SSHFS inside a lab VM (median of {a.repeat}):")
    print(f"  engine re-scan (scan_done, one listing per folder): {med['scan'] * 1000:8.1f} ms")
    print(f"  one exists() per key:                               {med['exists'] * 1000:8.1f} ms")
    print(f"  -> re-scan is {med['exists'] / med['scan']:.0f}x faster "
          f"(goal >= 50x: {'met' if med['exists'] / med['scan'] >= 50 else 'NOT met'})")
    print(f"  (listing the {r['keys']} inputs, common to both: {r['list_inputs'] * 1000:.1f} ms)")
    print(f"  whole command: `python -m tasks run` on the finished run {med['cli']:.2f}s vs "
          f"a glob + exists() script {med['naive']:.2f}s ({med['naive'] / med['cli']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
