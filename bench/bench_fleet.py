"""spotfan on a lab cluster versus the naive loop, side by side on one share (caching off).

Brings up a lab cluster (the head's sshd on loopback, each VM mounting the share with
cluster/vm/mount.sh's options), then, with the same VMs and workers for both contenders:
  1. tiny keys (read the input, write ~100 bytes), --keys sizes: `python -m tasks run`
     on every VM at once, against the seed's naive loop on every VM (list, shuffle,
     exists(), write in place); medians of --rounds, contenders alternated per round;
  2. one extra round of each over a second mount made with sshfs's `sshfs_debug`, whose
     request log gives SFTP requests per key;
  3. --slow-keys of --slow-ms each (sleep) with spotfan: wall time against the ideal
     (keys x ms / workers) and the tail (first VM done to last VM done);
  4. --curve: tiny keys on 1, 2, 4, ... VMs: keys/s, machine CPU, the head's CPU.
Lab VMs share this machine's cores; on a cloud each VM has its own. Needs root.
Usage: python bench/bench_fleet.py [--vms 4] [--keys 4000,20000] [--rounds 3] ...
The lab uses 127.$SPOTFAN_TEST_OCTET.0.x and head port $SPOTFAN_TEST_PORT_BASE + 90; its state
(the share too) lives in $SPOTFAN_BENCH_STATE (default /var/lib/spotfan-bench/fleet-OCTET).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetlab import Fleet, clean, commands, count_requests, lab, prepare_inputs  # noqa: E402


def one_round(fleet: Fleet, n_vms: int, name: str, cmd: str, keys: int) -> dict[str, float]:
    clean(fleet.share)
    mnt = shlex.quote(fleet.config.mount_point)
    cpu0 = fleet.cpu.seconds()
    launched = time.time()  # the lab's VMs share this machine's clock
    results = fleet.run_all(n_vms, f"cd {mnt} && {cmd}")
    cpu1 = fleet.cpu.seconds()
    wall = max(t for t, _ in results)
    first = min(t for t, _ in results)
    outs = [json.loads(o.strip().splitlines()[-1]) for _, o in results]
    got = len(os.listdir(fleet.share / "out"))
    assert got == keys, f"{name}: {got} outputs of {keys}"
    row = {"wall": wall, "tail": wall - first}
    if cpu0 is not None and cpu1 is not None:
        row["cpu"] = cpu1 - cpu0
    if name.startswith("spotfan"):
        logs = [json.loads(line) for p in fleet.share.glob(".spotfan/tasks/tiny/log/*.jsonl")
                for line in p.read_text().splitlines() if line.strip()]
        row["task_s"] = sum(r["seconds"] for r in logs) / max(1, len(logs))  # per execution
        first = min(r["start"] for r in logs)
        row["startup"] = first - launched  # to the first key's start, on any VM
        row["steady"] = max(r["start"] + r["seconds"] for r in logs) - first
        row["by_peers"] = sum(o["by_peers"] for o in outs)
        row["succeeded"] = sum(o["succeeded"] for o in outs)
    else:
        row["twice"] = sum(o["wrote"] for o in outs) - keys
    return row


def kind_of(cmdline: str, name: str) -> str:
    if "tasks" in cmdline and " run " in cmdline + " ":
        return "spotfan runner"
    if "multiprocessing" in cmdline or "forkserver" in cmdline:
        return "spotfan pool workers"
    if name == "ssh" and "ClearAllForwardings" not in cmdline:  # sshfs adds it to its ssh
        return "runner's SFTP session (ssh)"
    if "fleet_task.py" in cmdline:
        return "naive loop (python)"
    return {"sshfs": "mounts' sshfs", "ssh": "mounts' ssh", "sshd": "head sshd/sftp-server",
            "sftp-server": "head sshd/sftp-server"}.get(name, "other")


def cpu_split(fleet: Fleet, n_vms: int, cmd: str) -> Counter:
    """CPU seconds of one round by process kind. Every lab process is sampled from /proc
    every 50 ms (one that lives under 50 ms is missed): a process alive before the round
    counts its growth, one started during it its last sample."""
    clean(fleet.share)
    group = fleet.cpu.group / "cgroup.procs"

    def snapshot() -> dict[int, tuple[str, float]]:
        seen = {}
        for pid in group.read_text().split():
            try:
                p = psutil.Process(int(pid))
                t = p.cpu_times()
                seen[p.pid] = (kind_of(" ".join(p.cmdline()), p.name()), t.user + t.system)
            except (psutil.Error, ValueError):
                continue
        return seen

    before = snapshot()
    last: dict[int, tuple[str, float]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            last.update(snapshot())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    mnt = shlex.quote(fleet.config.mount_point)
    fleet.run_all(n_vms, f"cd {mnt} && {cmd}")
    stop.set()
    sampler.join()
    last.update(snapshot())
    out: Counter = Counter()
    for pid, (kind, used) in last.items():
        out[kind] += used - (before[pid][1] if pid in before else 0.0)
    return out


def head_cpu(config) -> float:  # type: ignore[no-untyped-def]
    """CPU seconds so far of the head's sshd and everything under it (sessions, sftp)."""
    marker = str(config.settings.state_dir)
    total = 0.0
    for p in psutil.process_iter(["cmdline"]):
        try:
            line = " ".join(p.info["cmdline"] or [])  # sshd retitles itself "sshd: ... [listener]"
            if "sshd" in line.split(" ", 1)[0] and marker in line and "listener" in line:
                for q in [p, *p.children(recursive=True)]:
                    t = q.cpu_times()
                    total += t.user + t.system
        except psutil.Error:
            continue
    return total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=4)
    p.add_argument("--workers-per-vm", type=int, default=2)
    p.add_argument("--keys", default="4000,20000", help="tiny-key sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--count-requests", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cpu-split", action="store_true",
                   help="one more round of each contender: CPU by process kind (and, with --slow-keys, of "
                        "each runner's start: a run of two keys per worker)")
    p.add_argument("--slow-keys", type=int, default=2000)
    p.add_argument("--slow-ms", type=float, default=50)
    p.add_argument("--curve", default="1,2,4,8,16", help="VM counts for the curve ('' for none)")
    p.add_argument("--curve-keys", type=int, default=4000)
    p.add_argument("--fetch", action="store_true",
                   help="also spotfan with `tasks run --fetch` (inputs fetched in batches over the "
                        "runner's session), in the same rounds")
    p.add_argument("--fetch-c25519", action="store_true",
                   help="also spotfan --fetch with the runner's session logging in with curve25519-sha256 "
                        "(as cluster.toml ssh.kex_algorithms sets it) instead of OpenSSH's default post-quantum "
                        "key exchange, in the same rounds")
    a = p.parse_args()
    names = ["spotfan", *(["spotfan --fetch"] if a.fetch else []),
             *(["spotfan --fetch c25519"] if a.fetch_c25519 else []), "naive"]
    sizes = [int(s) for s in a.keys.split(",") if s]
    curve = [int(s) for s in a.curve.split(",") if s]
    most = max([a.vms, *curve])
    w = a.workers_per_vm
    with lab("fleet", most, w) as (cluster, fleet):
        config = cluster.config
        share = config.head.share
        print(f"lab cluster: {a.vms} VMs x {w} workers, one head (sshd on loopback), SSHFS with "
              "caching off; this machine has", psutil.cpu_count(), "cores for everything")
        for n in sizes:
            folder = prepare_inputs(share, n)
            cmds = commands(folder, w)
            rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for r in range(a.rounds):
                order = names if r % 2 == 0 else names[::-1]
                for name in order:
                    rows[name].append(one_round(fleet, a.vms, name, cmds[name], n))
            med = {k: statistics.median(x["wall"] for x in v) for k, v in rows.items()}
            print(f"\n{n} tiny keys on {a.vms} VMs x {w} workers, median of {a.rounds} rounds:")
            for name in names:
                walls = ", ".join(f"{x['wall']:.2f}" for x in rows[name])
                extra = (f"claimed but found done by a peer: {max(x['by_peers'] for x in rows[name]):.0f}"
                         f" ({100 * max(x['by_peers'] for x in rows[name]) / n:.2f}%, max of rounds)"
                         if name != "naive" else
                         f"keys written twice: {min(x['twice'] for x in rows[name]):.0f}-"
                         f"{max(x['twice'] for x in rows[name]):.0f}")
                print(f"  {name:16s} {med[name]:7.2f} s  {n / med[name]:7.0f} keys/s  (rounds {walls}); {extra}")
            for name in names[:-1]:
                ratio = med["naive"] / med[name]
                print(f"  -> {name} is {ratio:.2f}x the naive loop (goal >= 2x: "
                      f"{'met' if ratio >= 2 else 'NOT met'}; 3x: {'met' if ratio >= 3 else 'not met'})")
            if all("cpu" in x for v in rows.values() for x in v):
                cpu = {k: statistics.median(x["cpu"] for x in v) for k, v in rows.items()}
                print("  lab cluster CPU (VMs + head, all processes), median: " + ", ".join(
                      f"{k} {cpu[k]:.1f} s" for k in names) + f"; {psutil.cpu_count()} cores "
                      f"for the lab, machine load {os.getloadavg()[0]:.1f}")
            if a.cpu_split and fleet.cpu.ok:
                for name in names:
                    split = cpu_split(fleet, a.vms, cmds[name])
                    print(f"  CPU by process kind, {name}: " + ", ".join(
                        f"{k} {v:.1f} s" for k, v in split.most_common() if v >= 0.05))
            if a.count_requests:
                for name in names:
                    total, kinds = count_requests(fleet, a.vms, cmds[name], n)
                    top = ", ".join(f"{k} {v / n:.1f}" for k, v in kinds.most_common(6))
                    print(f"  SFTP requests per key, {name}: {total / n:.1f}  ({top})")
        if a.slow_keys:
            folder = prepare_inputs(share, a.slow_keys)
            slow_cmds = commands(folder, w, a.slow_ms)
            slow_rows: dict[str, list[dict[str, float]]] = {name: [] for name in names[:-1]}
            for r in range(a.rounds):  # contenders alternated round by round, as above
                for name in (names[:-1] if r % 2 == 0 else names[-2::-1]):
                    slow_rows[name].append(one_round(fleet, a.vms, name, slow_cmds[name], a.slow_keys))
            for name in names[:-1]:
                rows_s = slow_rows[name]
                ideal = a.slow_keys * a.slow_ms / 1000 / (a.vms * w)
                wall = statistics.median(x["wall"] for x in rows_s)
                tail = statistics.median(x["tail"] for x in rows_s)
                own = statistics.median(x["task_s"] for x in rows_s)  # sleep + the input's read
                own_ideal = a.slow_keys * own / (a.vms * w)
                print(f"\n{name}: {a.slow_keys} keys of {a.slow_ms:g} ms on {a.vms} VMs x {w} workers, median of "
                      f"{a.rounds}: {wall:.2f} s against ideal {ideal:.2f} s = {wall / ideal:.2f}x "
                      f"(goal <= 1.1x: {'met' if wall / ideal <= 1.1 else 'NOT met'}); tail (first VM "
                      f"done to last VM done) {tail:.2f} s; rounds "
                      + ", ".join(f"{x['wall']:.2f}" for x in rows_s))
                print(f"  each key's own time (its input read and the sleep, from the execution logs): "
                      f"{own * 1000:.1f} ms; keys x that / workers = {own_ideal:.2f} s, so the engine "
                      f"adds {wall / own_ideal:.2f}x (start-up, dispatch, tail)")
                startup = statistics.median(x["startup"] for x in rows_s)
                steady = statistics.median(x["steady"] for x in rows_s)
                print(f"  first key started {startup:.2f} s after the launch; from the first key's "
                      f"start to the last key's end {steady:.2f} s = {steady / own_ideal:.2f}x the "
                      f"keys' own time / workers, {steady / ideal:.2f}x the ideal")
            if a.cpu_split and fleet.cpu.ok:
                per_runner = 2 * w  # two keys per worker: the start, and little else
                print(f"\nstart-up CPU by process kind: each VM's runner with --limit {per_runner}")
                for name in names[:-1]:
                    split = cpu_split(fleet, a.vms, f"{slow_cmds[name]} --limit {per_runner}")
                    print(f"  {name}: {sum(split.values()):.2f} s: " + ", ".join(
                        f"{k} {v:.2f}" for k, v in split.most_common() if v >= 0.01))
        if curve:
            folder = prepare_inputs(share, a.curve_keys)
            cmd = commands(folder, w)["spotfan"]
            print(f"\ncurve: {a.curve_keys} tiny keys, spotfan, {w} workers per VM, median of {a.rounds}:")
            for n_vms in curve:
                walls, busy, head = [], [], []
                for _ in range(a.rounds):
                    cpu0, h0 = psutil.cpu_times(), head_cpu(config)
                    walls.append(one_round(fleet, n_vms, "spotfan", cmd, a.curve_keys)["wall"])
                    cpu1, h1 = psutil.cpu_times(), head_cpu(config)
                    used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
                    busy.append(used / ((psutil.cpu_count() or 1) * walls[-1]))
                    head.append((h1 - h0) / walls[-1])
                m = statistics.median(walls)
                print(f"  {n_vms:3d} VMs: {m:6.2f} s  {a.curve_keys / m:6.0f} keys/s  machine CPU "
                      f"{statistics.median(busy):.0%} busy, head sshd+sftp {statistics.median(head):.2f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
