"""Bootstrap wall time of a lab cluster for 1, 4, 8 (and 16) VMs; goal: 8 VMs within 1.5x of 1.

Bootstrap = what `fab up` does from no VMs to every VM working: create the VMs (host
keys, namespaces, sshd), write known_hosts, then on all VMs at once wait for SSH, put the
boot files, mount the share over SSHFS and start the agent. The head is started once
before timing. Needs root. Usage: python bench/bench_cluster_bootstrap.py [--sizes 1,4,8,16]
[--octet 0 --port 2399]: every VM address is 127.OCTET.99.N (the head 127.0.0.1:PORT), so
side-by-side runs need their own --octet and --port.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402

from cluster import lifecycle  # noqa: E402
from cluster.config import load  # noqa: E402
from cluster.session import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STATE = Path("/tmp/spotfan-bench-bootstrap")


def write_config(folder: Path, workers: int, kex: str = "", *, octet: int = 99, port: int = 2399) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.toml"
    path.write_text(f"""
[cluster]
name = "bench"
provider = "lab"
workers = {workers}
idle_timeout = 600
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"
[head]
address = "127.0.0.1"
port = {port}
share = "share"
user = "spotfan-bench{octet}"
jail = "/srv/spotfan/bench{octet}"
[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/known_hosts"
kex_algorithms = "{kex}"
[lab]
state_dir = "state"
address_prefix = "127.{octet}.99."
""")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,4,8,16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kex", default="", help='e.g. "curve25519-sha256" (default: OpenSSH\'s own)')
    p.add_argument("--octet", type=int, default=0, help="VMs on 127.OCTET.99.N (default 0)")
    p.add_argument("--port", type=int, default=2399, help="the head's port (default 2399)")
    a = p.parse_args()
    state = STATE.with_name(f"{STATE.name}-{a.octet}")
    sizes = [int(s) for s in a.sizes.split(",")]
    if (state / "cluster.toml").exists():
        with Cluster(load(state / "cluster.toml")) as leftover:
            lifecycle.down(leftover)  # a crashed earlier run's leftovers
    shutil.rmtree(state, ignore_errors=True)
    config = load(write_config(state, 1, a.kex, octet=a.octet, port=a.port))
    cluster = Cluster(config)
    lifecycle.prepare(cluster)  # keys and the head, outside the timing
    results: dict[int, list[float]] = {}
    cpu: dict[int, list[tuple[float, float]]] = {}  # (this process, whole machine) CPU seconds
    try:
        for n in sizes:
            for _ in range(a.repeat):
                box0, me0 = psutil.cpu_times(), time.process_time()
                t = time.perf_counter()
                reports = lifecycle.up(cluster, count=n)
                results.setdefault(n, []).append(time.perf_counter() - t)
                box1 = psutil.cpu_times()
                cpu.setdefault(n, []).append((time.process_time() - me0, (box1.user + box1.system)
                                              - (box0.user + box0.system)))
                assert sum("agent: ok" in r.boot for r in reports) == n, reports
                cluster.provider.delete(config.vm_names(n))
    finally:
        lifecycle.down(cluster)
        cluster.close()
        shutil.rmtree(state, ignore_errors=True)
    base = statistics.median(results[sizes[0]])
    print(f"lab bootstrap (create + SSH + boot files + SSHFS mount + agent), median of {a.repeat}, "
          f"mount kex: {a.kex or 'OpenSSH default'}:")
    cores = psutil.cpu_count() or 1
    for n in sizes:
        m = statistics.median(results[n])
        laptop = statistics.median(c[0] for c in cpu[n])
        box = statistics.median(c[1] for c in cpu[n])
        print(f"  {n:3d} VMs: {m:5.2f}s  ({m / base:.2f}x of {sizes[0]} VM)  "
              f"runs: {', '.join(f'{x:.2f}' for x in results[n])}  |  laptop-side CPU {laptop:.2f}s, "
              f"machine CPU {box:.2f}s of {cores * m:.2f}s available ({box / (cores * m):.0%} busy)")
    print(f"  (lab VMs share this machine's {cores} cores; on a cloud each VM boots on its own CPU)")
    if 8 in results:
        ratio = statistics.median(results[8]) / base
        print(f"goal 8 VMs within 1.5x of 1: {'met' if ratio <= 1.5 else 'NOT met'} ({ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
