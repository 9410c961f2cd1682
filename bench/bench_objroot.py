"""spotfan over an object-store root (S3 on moto) against spotfan over the SSHFS share, side by side.

Brings up a lab cluster as bench/bench_fleet.py does (bench/fleetlab.py: the head's sshd on
loopback, every VM mounting the share) and, in this process, moto's S3 server behind the
request-recording S3 proxy on 127.0.0.1 (tests/objstore/moto_s3.py; with --gcs also the GCS
emulator, tests/objstore/gcs_emulator.py). Then, for tiny keys (--keys: read the input, write
~100 bytes) and --slow-keys of --slow-ms each (sleep), bench/fleet_task.py:tiny on the same
VMs and workers for every contender, contenders alternated round by round:
  sshfs: `python -m tasks run` in each VM's mount of the share, as bench_fleet runs spotfan;
  s3:    `python -m tasks run ... --root s3://BUCKET/PREFIX` in each VM over SSH, with
         AWS_ENDPOINT_URL at the proxy and moto's test keys (the lab VMs share this machine's
         network namespace); nothing goes through the mount;
  gcs:   the same with --root gs://BUCKET/PREFIX at the GCS emulator (--gcs).
Inputs are seeded before each round, outside the timed part (a fresh prefix per round, written
into the server's memory without a request). After each round every output is checked exact,
none missing, none extra; keys run twice are counted from the runs' execution logs. Requests
per key: the stores' from their servers' request logs (every round), by kind and by the part
of the layout they touch; SSHFS's from one extra round over a `sshfs_debug` mount (as
bench_fleet counts them). The store servers are Python on this machine's 2 cores ("server
CPU": this process, which also holds the SSH clients); a real store answers in 10-100 ms
from machines of its own. Exits 1 if any output is wrong or missing. Needs root.
Usage: python bench/bench_objroot.py [--vms 4] [--keys 4000] [--slow-keys 2000] [--rounds 3] [--gcs]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_task import PAD  # noqa: E402
from fleetlab import REPO, Fleet, clean, commands, count_requests, input_bytes, lab, prepare_inputs  # noqa: E402

PREFIX = "run"  # the root is s3://<a bucket per round>/run
TASK = "tiny"  # fleet_task.tiny's task name: its bookkeeping is .spotfan/tasks/tiny/
MAX_KEYS = 200_000  # every object lives in this process's memory
MAX_ROUNDS = 20
# No probe of a cloud metadata server from the VMs' SDKs: those addresses point at a closed
# loopback port, so no request leaves 127.0.0.0/8.
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9",
               "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


@dataclass(frozen=True)
class Workload:
    """One side-by-side comparison: `keys` inputs, each task sleeping `sleep_ms`."""

    label: str  # "tiny" or "50 ms"
    keys: int
    sleep_ms: float


@dataclass(frozen=True)
class Round:
    """One contender's run on every VM, and what was checked after it."""

    wall: float  # launch to the last VM's runner done
    tail: float  # first VM done to last VM done
    startup: float  # launch to the first key's start, on any VM
    lab_cpu: float | None  # every lab process (VMs and head), from the lab's cpuacct group
    server_cpu: float  # this process: the store servers, the proxy and the SSH clients
    executions: int  # rows in the execution logs
    twice: int  # keys with more than one execution
    by_peers: int  # claimed, run, but a peer had published first (the runners' reports)
    wrong: tuple[str, ...]  # outputs missing, not exact, or not expected (empty: all exact)
    requests: Counter = field(default_factory=Counter)  # (kind, area) -> requests; stores only
    refused: Counter = field(default_factory=Counter)  # (kind, status) of answers not 2xx; stores only


def expected(keys: int) -> dict[str, bytes]:
    return {f"k{i:06d}.txt": input_bytes(i) + PAD for i in range(keys)}


def area(rel: str) -> str:
    """The part of the layout a root-relative name (or listed prefix) is in: in, out,
    claims, done, log, failed, plan.json, owners, ..."""
    parts = rel.split("/")
    if not rel:
        return "bucket"
    if parts[0] != ".spotfan":
        return "in" if parts[0].startswith("in-") else parts[0]
    if len(parts) > 3 and parts[1] == "tasks":
        return parts[3] or "task"
    return parts[1] if len(parts) > 1 else ".spotfan"


def log_rows(texts: list[str]) -> list[dict[str, Any]]:
    rows = []
    for text in texts:
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "key" in row:
                rows.append(row)
    return rows


class ShareSide:
    """spotfan on the SSHFS share, run in each VM's mount."""

    name = "sshfs"

    def __init__(self, fleet: Fleet, workers: int) -> None:
        self.fleet = fleet
        self.workers = workers

    def prepare(self, load: Workload, round_no: int) -> str:
        folder = prepare_inputs(self.fleet.share, load.keys)
        clean(self.fleet.share)
        cmd = commands(folder, self.workers, load.sleep_ms)["spotfan"]
        return f"cd {shlex.quote(self.fleet.config.mount_point)} && {cmd}"

    def outputs(self) -> dict[str, bytes]:
        out = self.fleet.share / "out"
        return {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else {}

    def logs(self) -> list[str]:
        return [p.read_text() for p in sorted(self.fleet.share.glob(f".spotfan/tasks/{TASK}/log/*.jsonl"))]

    def records(self) -> list[Any]:
        return []


class StoreSide:
    """spotfan on a bucket prefix of a test server (moto behind the proxy, or the GCS emulator)."""

    def __init__(self, name: str, scheme: str, server: Any, workers: int) -> None:
        self.name = name
        self.scheme = scheme  # "s3" or "gs"
        self.server = server  # moto_s3.S3Server or gcs_emulator.GcsEmulator
        self.workers = workers
        self.bucket = ""  # this round's
        self.log = server.proxy.requests if scheme == "s3" else server.requests

    def prepare(self, load: Workload, round_no: int) -> str:
        # A bucket per round: moto scans every object of a bucket for each listing, so one
        # bucket for all rounds would make each round's listings slower than the last's.
        tag = load.label.replace(" ", "")
        self.bucket = f"bench-{tag}-{load.keys}-{self.name}-r{round_no}"
        self.server.make_bucket(self.bucket) if self.scheme == "s3" else self.server.create_bucket(self.bucket)
        folder = f"in-{load.keys}"
        for i in range(load.keys):
            self._put(f"{PREFIX}/{folder}/k{i:06d}.txt", input_bytes(i))
        self.log.clear()
        env = {**self.server.env, **NO_METADATA, "BENCH_IN": folder, "BENCH_OUT": "out",
               "BENCH_SLEEP_MS": f"{load.sleep_ms:g}"}
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        url = f"{self.scheme}://{self.bucket}/{PREFIX}"
        # In the folder of fleet_task.py (`python -m` imports from there), not in the mount.
        return (f"cd {shlex.quote(str(REPO / 'bench'))} && env {assigns} {shlex.quote(sys.executable)} "
                f"-m tasks run fleet_task:{TASK} --root {url} --workers {self.workers}")

    def _put(self, name: str, data: bytes) -> None:
        if self.scheme == "s3":
            self.server.seed(self.bucket, name, data)
        else:
            self.server.put(self.bucket, name, data)

    def _names(self, prefix: str) -> list[str]:
        return self.server.names(self.bucket, prefix)

    def _body(self, name: str) -> bytes | None:
        if self.scheme == "s3":
            return self.server.body(self.bucket, name)
        obj = self.server.get(self.bucket, name)
        return None if obj is None else obj.data

    def outputs(self) -> dict[str, bytes]:
        base = f"{PREFIX}/out/"
        return {n[len(base):]: self._body(n) or b"" for n in self._names(base)}

    def logs(self) -> list[str]:
        names = self._names(f"{PREFIX}/.spotfan/tasks/{TASK}/log/")
        return [(self._body(n) or b"").decode("utf-8", "replace") for n in names if n.endswith(".jsonl")]

    def records(self) -> list[Any]:
        return [r for r in self.log.all() if r.bucket == self.bucket]

    def where(self, record: Any) -> str:
        name = record.key or record.query.get("prefix") or record.query.get("name") or ""
        rel = name[len(PREFIX) + 1:] if name.startswith(PREFIX + "/") else name
        return area(rel)


def one_round(fleet: Fleet, side: ShareSide | StoreSide, load: Workload, round_no: int, n_vms: int) -> Round:
    cmd = side.prepare(load, round_no)  # inputs seeded, outputs cleared: not timed
    me = psutil.Process()
    cpu0, mine0 = fleet.cpu.seconds(), me.cpu_times()
    launched = time.time()  # the lab's VMs share this machine's clock
    results = fleet.run_all(n_vms, cmd)
    cpu1, mine1 = fleet.cpu.seconds(), me.cpu_times()
    wall = max(t for t, _ in results)
    reports = [json.loads(out.strip().splitlines()[-1]) for _, out in results]
    want, got = expected(load.keys), side.outputs()
    wrong = sorted({k for k, v in want.items() if got.get(k) != v} | (set(got) - set(want)))
    rows = log_rows(side.logs())
    runs = Counter(r["key"] for r in rows)
    requests: Counter = Counter()
    refused: Counter = Counter()
    if isinstance(side, StoreSide):
        for r in side.records():
            requests[(r.kind, side.where(r))] += 1
            if not 200 <= r.status < 300:
                refused[(r.kind, r.status)] += 1
    return Round(
        wall=wall, tail=wall - min(t for t, _ in results),
        startup=(min(r["start"] for r in rows) - launched) if rows else float("nan"),
        lab_cpu=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        server_cpu=(mine1.user + mine1.system) - (mine0.user + mine0.system),
        executions=len(rows), twice=sum(1 for c in runs.values() if c > 1),
        by_peers=sum(int(r.get("by_peers", 0)) for r in reports), wrong=tuple(wrong[:5]) + (
            (f"... {len(wrong) - 5} more",) if len(wrong) > 5 else ()),
        requests=requests, refused=refused)


def med(rows: list[Round], attr: str) -> float:
    values = [getattr(r, attr) for r in rows]
    return statistics.median(values) if None not in values else float("nan")


def report(load: Workload, sides: list[Any], rows: dict[str, list[Round]], share_requests: tuple[int, Counter] | None,
           *, n_vms: int, workers: int) -> bool:
    """Print one workload's table; True if every round of every contender was exact."""
    n = load.keys
    rounds = len(next(iter(rows.values())))
    print(f"\n{n} {load.label} keys on {n_vms} VMs x {workers} workers, median of {rounds} rounds "
          f"(contenders alternated), load average {os.getloadavg()[0]:.1f}:")
    if load.sleep_ms:
        print(f"  ideal (keys x {load.sleep_ms:g} ms / {n_vms * workers} workers): "
              f"{n * load.sleep_ms / 1000 / (n_vms * workers):.2f} s")
    print(f"  {'contender':9} {'wall s':>7} {'keys/s':>7} {'/ sshfs':>7} {'1st key':>7} {'tail':>5} "
          f"{'lab CPU':>7} {'srv CPU':>7} {'execs':>6} {'twice':>5} {'peers':>5}  outputs; rounds")
    base = med(rows["sshfs"], "wall")
    ok = True
    for side in sides:
        rs = rows[side.name]
        wall = med(rs, "wall")
        bad = [r.wrong for r in rs if r.wrong]
        ok = ok and not bad
        check = "all exact, none missing" if not bad else f"NOT exact: {bad[0]}"
        print(f"  {side.name:9} {wall:7.2f} {n / wall:7.0f} {wall / base:6.2f}x {med(rs, 'startup'):6.2f}s "
              f"{med(rs, 'tail'):5.2f} {med(rs, 'lab_cpu'):6.1f}s {med(rs, 'server_cpu'):6.1f}s "
              f"{max(r.executions for r in rs):6d} {max(r.twice for r in rs):5d} {max(r.by_peers for r in rs):5d}"
              f"  {check}; " + ", ".join(f"{r.wall:.2f}" for r in rs))
    if share_requests is not None:
        total, kinds = share_requests
        print(f"  SFTP requests per key, sshfs (one sshfs_debug round): {total / n:.1f}  ("
              + ", ".join(f"{k} {v / n:.2f}" for k, v in kinds.most_common(8)) + ")")
    for side in sides[1:]:
        rs = rows[side.name]
        per: Counter = Counter()
        for r in rs:
            per.update(r.requests)
        by_kind: Counter = Counter()
        for (kind, _), v in per.items():
            by_kind[kind] += v
        scale = 1 / (n * len(rs))
        each = sum(by_kind.values()) / len(rs)
        print(f"  {side.name} requests per key (server log, mean of rounds): {each / n:.2f}; CPU per request: "
              f"server {med(rs, 'server_cpu') / each * 1000:.1f} ms, lab {med(rs, 'lab_cpu') / each * 1000:.1f} ms")
        for kind, v in by_kind.most_common():
            parts = sorted(((a, c) for (k, a), c in per.items() if k == kind), key=lambda x: -x[1])
            print(f"    {kind:22} {v * scale:6.3f}  ({v / len(rs):.0f} a round: "
                  + ", ".join(f"{a} {c / len(rs):.0f}" for a, c in parts) + ")")
        refused: Counter = Counter()
        for r in rs:
            refused.update(r.refused)
        if refused:
            print("    answered not 2xx, a round: " + ", ".join(
                f"{k} {s} x{c / len(rs):.1f}" for (k, s), c in refused.most_common()))
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=4)
    p.add_argument("--workers-per-vm", type=int, default=2)
    p.add_argument("--keys", default="4000", help="tiny-key sizes, comma-separated ('' for none)")
    p.add_argument("--slow-keys", type=int, default=2000, help="keys of --slow-ms each (0 for none)")
    p.add_argument("--slow-ms", type=float, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gcs", action="store_true", help="also a GCS root on the GCS emulator")
    p.add_argument("--count-requests", action=argparse.BooleanOptionalAction, default=True,
                   help="one extra sshfs_debug round per workload for the SSHFS request counts")
    a = p.parse_args()
    loads = [Workload("tiny", int(s), 0) for s in a.keys.split(",") if s]
    if a.slow_keys:
        loads.append(Workload(f"{a.slow_ms:g} ms", a.slow_keys, a.slow_ms))
    if not loads or any(not 0 < w.keys <= MAX_KEYS for w in loads) or not 0 < a.rounds <= MAX_ROUNDS:
        p.error(f"give 1 to {MAX_KEYS} keys per workload and 1 to {MAX_ROUNDS} rounds")
    from tests.objstore.gcs_emulator import GcsEmulator
    from tests.objstore.moto_s3 import moto_s3

    w = a.workers_per_vm
    ok = True
    with ExitStack() as stack:
        s3 = stack.enter_context(moto_s3())
        gcs = stack.enter_context(GcsEmulator()) if a.gcs else None
        _, fleet = stack.enter_context(lab("objroot", a.vms, w))
        sides: list[Any] = [ShareSide(fleet, w), StoreSide("s3", "s3", s3, w)]
        if gcs is not None:
            sides.append(StoreSide("gcs", "gs", gcs, w))
        print(f"lab cluster: {a.vms} VMs x {w} workers; sshfs: one head (sshd on loopback), caching off; "
              f"s3: moto behind the recording proxy ({s3.endpoint}), in this process"
              + ("; gcs: the GCS emulator, in this process" if a.gcs else "")
              + f"; {psutil.cpu_count()} cores for everything")
        for load in loads:
            rows: dict[str, list[Round]] = {s.name: [] for s in sides}
            for r in range(a.rounds):
                for side in (sides if r % 2 == 0 else sides[::-1]):
                    rows[side.name].append(one_round(fleet, side, load, r + 1, a.vms))
                    print(f"  ({load.keys} {load.label} keys, round {r + 1}, {side.name}: "
                          f"{rows[side.name][-1].wall:.2f} s)", file=sys.stderr, flush=True)
            share_requests = None
            if a.count_requests:
                folder = prepare_inputs(fleet.share, load.keys)
                share_requests = count_requests(fleet, a.vms, commands(folder, w, load.sleep_ms)["spotfan"], load.keys)
            ok = report(load, sides, rows, share_requests, n_vms=a.vms, workers=w) and ok
    print(f"\nthis process's peak RSS (every store's objects live in it): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if not ok:
        print("\nFAILED: some outputs were missing or not exact (above)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
