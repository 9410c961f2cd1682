"""What one VM is busy with, sampled for a few seconds with psutil, and a verdict on what
limits the run there, with the advice that follows from it.

    python -m cluster.top --seconds 3 --json          # what `fab top` runs on every VM
    python -m cluster.top record --to FILE --interval 5   # what the worker agent runs

The worker's processes are every `python -m tasks run` process and its descendants
(pool processes, the programs they start), less multiprocessing's own helpers.

`record` appends one JSON object per line to FILE, normally
ROOT/.spotfan/cluster/metrics/<host>.jsonl, which tasks/report.py draws:

    {"t": 1700000000.0,          end of the sample, seconds since the epoch
     "host": "vm-3",             socket.gethostname(), as in the tasks' execution logs
     "seconds": 5.0,             length of the sample
     "cpu": 97.5,                busy percent of the whole machine (0-100)
     "cpu_per_core": [98.0, 97.0], "iowait": 0.4, "steal": 0.0,   percent
     "load1": 2.1, "mem_used": 123, "mem_available": 456, "swap_used": 0,   bytes
     "disk_read_bps": 0.0, "disk_write_bps": 1e5, "net_recv_bps": 0.0, "net_sent_bps": 0.0,
     "workers": 2, "workers_cpu": 195.0, "workers_rss": 789}   count, percent of one core, bytes
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

DEFAULT_SECONDS = 3.0
MAX_SECONDS = 600.0  # one sample never takes longer than this
TICK_S = 0.25  # how often process states are looked at within a sample
RECORD_TICK_S = 1.0  # the same while recording (cheaper, runs for hours)
BUSY_PCT = 20.0  # a process using at least this percent of one core counts as busy
SATURATED_PCT = 85.0  # machine CPU busy percent from which the CPU counts as saturated
CPU_BOUND_SHARE = 0.6  # workers runnable this share of the time are CPU-bound
IOWAIT_PCT = 10.0  # iowait percent from which the CPU counts as waiting on I/O
BLOCKED_WORKERS = 0.5  # mean worker processes in uninterruptible (D) sleep that count
IO_PRESSURE_PCT = 20.0  # Linux PSI: share of time some task stalled on I/O
MEM_AVAILABLE_MIN = 0.10  # less available memory than this share is memory pressure
SWAP_BPS = 1 << 20  # swapping faster than this (bytes/s) is memory pressure
MEM_PRESSURE_PCT = 10.0  # Linux PSI: share of time some task stalled on memory
OTHERS_SHOWN = 3  # busiest other processes kept in a sample
OTHERS_MIN_PCT = 5.0  # ... if they use at least this percent of one core
VERDICT_KINDS = ("idle", "memory", "cpu-bound", "too-few", "io-wait", "waiting", "ok")


@dataclass(frozen=True)
class ProcessUse:
    """A process that is not the worker's, and how much CPU it took."""

    pid: int
    name: str  # e.g. "sshfs"
    cpu: float  # percent of one core over the sample


@dataclass(frozen=True)
class WorkerUse:
    """The worker's own processes: `python -m tasks run` and what it started."""

    runs: int  # `python -m tasks run` processes
    pool: int  # their pool processes (each runs one key at a time)
    processes: int  # pool processes and the programs they started
    busy: int  # processes that used at least BUSY_PCT of a core
    runnable: float  # mean processes running or ready to run (state R), over the sample
    blocked: float  # mean processes in uninterruptible sleep (state D, usually disk or FUSE)
    cpu: float  # CPU they used, in percent of one core (200 = two cores), run processes included
    rss: int  # resident memory of all of them, bytes


@dataclass(frozen=True)
class Sample:
    """What one machine did during a few seconds."""

    host: str  # socket.gethostname()
    time: float  # end of the sample, seconds since the epoch
    seconds: float  # length of the sample
    cores: int  # logical CPUs
    cpu: float  # busy percent of the whole machine, 0-100
    cpu_per_core: tuple[float, ...]  # busy percent per logical CPU
    iowait: float  # percent of CPU time idle while I/O was pending
    steal: float  # percent of CPU time taken by the hypervisor (a crowded host)
    load: tuple[float, float, float]  # load average over 1, 5, 15 minutes
    mem_total: int  # bytes
    mem_used: int  # bytes
    mem_available: int  # bytes that can be had without swapping
    swap_used: int  # bytes
    swap_bps: float  # bytes swapped in and out per second
    disk_read_bps: float  # bytes per second, all disks
    disk_write_bps: float
    net_recv_bps: float  # bytes per second, all interfaces but loopback
    net_sent_bps: float
    blocked: float  # mean processes in state D, whole machine
    io_pressure: float | None  # Linux PSI: percent of the time some task stalled on I/O
    mem_pressure: float | None  # Linux PSI: percent of the time some task stalled on memory
    workers: WorkerUse  # the worker's own processes
    others: tuple[ProcessUse, ...]  # the busiest other processes

    def to_dict(self) -> dict[str, Any]:
        return _rounded(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        """The inverse of `to_dict`: a sample another machine sent as JSON (`fab top`)."""
        return cls(**{**d, "cpu_per_core": tuple(d["cpu_per_core"]), "load": tuple(d["load"]),
                      "workers": WorkerUse(**d["workers"]),
                      "others": tuple(ProcessUse(**o) for o in d["others"])})

    def metric_row(self) -> dict[str, Any]:
        """One line of a metrics file (the format tasks/report.py reads)."""
        return {"t": round(self.time, 3), "host": self.host, "seconds": round(self.seconds, 3),
                "cpu": round(self.cpu, 1), "cpu_per_core": [round(c, 1) for c in self.cpu_per_core],
                "iowait": round(self.iowait, 1), "steal": round(self.steal, 1),
                "load1": round(self.load[0], 2), "mem_used": self.mem_used,
                "mem_available": self.mem_available, "swap_used": self.swap_used,
                "disk_read_bps": round(self.disk_read_bps), "disk_write_bps": round(self.disk_write_bps),
                "net_recv_bps": round(self.net_recv_bps), "net_sent_bps": round(self.net_sent_bps),
                "workers": self.workers.processes, "workers_cpu": round(self.workers.cpu, 1),
                "workers_rss": self.workers.rss}


@dataclass(frozen=True)
class Verdict:
    """What limits the run on one machine, and what to do about it."""

    kind: str  # one of VERDICT_KINDS: idle | memory | cpu-bound | too-few | io-wait | waiting | ok
    summary: str  # one line a person reads first
    advice: tuple[str, ...]  # concrete next steps, most useful first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(kind=d["kind"], summary=d["summary"], advice=tuple(d["advice"]))


def _rounded(value: Any) -> Any:
    """Floats to 3 decimals, for JSON a person may read."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


# -- sampling ----------------------------------------------------------------------------

@dataclass
class _Snap:
    """Counters at one instant."""

    wall: float
    mono: float
    cpu: list[Any]
    disk: Any
    net: dict[str, Any]
    swap: Any
    psi_io: float | None
    psi_mem: float | None
    proc_cpu: dict[int, tuple[float, float, float, str]]  # pid -> (create_time, own cpu
    # seconds, cpu seconds with its reaped children, name)


def sample(duration_s: float = DEFAULT_SECONDS, *, pids: Iterable[int] | None = None,
           tick_s: float = TICK_S, stop: threading.Event | None = None) -> Sample:
    """Sample this machine for `duration_s` seconds (less if `stop` is set).

    `pids` names the worker's main processes (default: every `python -m tasks run`
    process found); they and their descendants are the worker's processes.
    """
    if not 0 < duration_s <= MAX_SECONDS:
        raise ValueError(f"duration_s must be in (0, {MAX_SECONDS:.0f}], got {duration_s}")
    me = os.getpid()
    mains = set(pids) if pids is not None else _find_runs()
    helpers = _helpers(mains)
    first = _snap()
    tree_at_start = _tree(mains, _states()[1])
    runnable = blocked_w = blocked_all = 0.0
    ticks = 0
    deadline = first.mono + duration_s
    for _ in range(int(duration_s / tick_s) + 2):  # bounded; the deadline ends it first
        now = time.monotonic()
        if now >= deadline:
            break
        if stop is not None and stop.wait(min(tick_s, deadline - now)):
            break
        if stop is None:
            time.sleep(min(tick_s, deadline - now))
        states, parents = _states()
        tree = _tree(mains, parents) - mains - helpers
        runnable += sum(1 for p in tree if states.get(p) == psutil.STATUS_RUNNING)
        blocked_w += sum(1 for p in tree if states.get(p) == psutil.STATUS_DISK_SLEEP)
        blocked_all += sum(1 for p, s in states.items()
                           if s == psutil.STATUS_DISK_SLEEP and p != me)
        ticks += 1
    last = _snap()
    _, parents = _states()
    tree = _tree(mains, parents)
    ticks = max(ticks, 1)
    return _build(first, last, mains, helpers, tree_at_start, tree, parents, runnable / ticks,
                  blocked_w / ticks, blocked_all / ticks, me)


def _snap() -> _Snap:
    procs: dict[int, tuple[float, float, float, str]] = {}
    for p in psutil.process_iter(["name", "cpu_times", "create_time"]):
        t = p.info["cpu_times"]
        if t is None:
            continue
        own = t.user + t.system
        # With reaped children's time, short-lived programs a worker starts (one per key
        # with --cmd) show up in their parent's total.
        total = own + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        procs[p.pid] = (p.info["create_time"] or 0.0, own, total, p.info["name"] or "?")
    nets = psutil.net_io_counters(pernic=True) or {}
    return _Snap(time.time(), time.monotonic(), psutil.cpu_times(percpu=True),
                 psutil.disk_io_counters(), {k: v for k, v in nets.items() if k != "lo"},
                 psutil.swap_memory(), _psi_total("io"), _psi_total("memory"), procs)


def _psi_total(resource: str) -> float | None:
    """Cumulative microseconds some task stalled on `resource` (Linux PSI), or None."""
    try:
        with open(f"/proc/pressure/{resource}", encoding="ascii") as f:
            for line in f:
                if line.startswith("some "):
                    return float(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _states() -> tuple[dict[int, str], dict[int, int]]:
    states: dict[int, str] = {}
    parents: dict[int, int] = {}
    for p in psutil.process_iter(["ppid", "status"]):
        if p.info["status"] is not None:
            states[p.pid] = p.info["status"]
            parents[p.pid] = p.info["ppid"] or 0
    return states, parents


def _find_runs() -> set[int]:
    """Pids of `python -m tasks run` processes (the agent starts them so)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        for i, arg in enumerate(cmd[:-2]):
            if arg == "-m" and cmd[i + 1] == "tasks" and "run" in cmd[i + 2:]:
                found.add(p.pid)
                break
    return found


def _helpers(mains: set[int]) -> set[int]:
    """multiprocessing's forkserver and resource tracker under the run processes: they
    hold no key, so they count neither as workers nor as missing ones."""
    helpers = set()
    for pid in mains:
        try:
            children = psutil.Process(pid).children()
        except psutil.Error:
            continue
        for c in children:
            try:
                cmd = " ".join(c.cmdline())
            except psutil.Error:
                continue
            if "forkserver" in cmd or "resource_tracker" in cmd:
                helpers.add(c.pid)
    return helpers


def _tree(mains: set[int], parents: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen = set()
    todo = [m for m in mains if m in parents]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, ()))
    return seen


def _rate(a: float, b: float, seconds: float) -> float:
    return max(0.0, (b - a) / seconds) if seconds > 0 else 0.0


def _build(first: _Snap, last: _Snap, mains: set[int], helpers: set[int],
           tree_at_start: set[int], tree: set[int], parents: dict[int, int],
           runnable: float, blocked_w: float, blocked_all: float,
           me: int) -> Sample:
    secs = max(last.mono - first.mono, 1e-6)
    per_core, iowait, steal = [], 0.0, 0.0
    for a, b in zip(first.cpu, last.cpu):
        total = sum(b) - sum(a) - (getattr(b, "guest", 0) - getattr(a, "guest", 0)) \
            - (getattr(b, "guest_nice", 0) - getattr(a, "guest_nice", 0))
        idle = (b.idle - a.idle) + (getattr(b, "iowait", 0) - getattr(a, "iowait", 0))
        per_core.append(100.0 * (1 - idle / total) if total > 0 else 0.0)
        if total > 0:
            iowait += 100.0 * (getattr(b, "iowait", 0) - getattr(a, "iowait", 0)) / total
            steal += 100.0 * (getattr(b, "steal", 0) - getattr(a, "steal", 0)) / total
    cores = len(per_core) or 1

    def cpu_delta(pid: int, *, children: bool = True) -> float:
        """CPU seconds of `pid` (with its reaped children) during the sample."""
        col = 2 if children else 1
        end = last.proc_cpu[pid]
        begin = first.proc_cpu.get(pid)
        start = begin[col] if begin is not None and abs(begin[0] - end[0]) < 1e-3 else 0.0
        return max(0.0, end[col] - start)

    # The worker's CPU: what every process of the tree used during the sample. A child
    # that ended meanwhile was reaped by its parent, whose total now holds the child's
    # whole life: take off what the child had used before the sample began.
    alive_tree = [p for p in tree if p in last.proc_cpu]
    w_cpu = sum(cpu_delta(p) for p in alive_tree)
    w_cpu -= sum(first.proc_cpu[p][2] for p in tree_at_start
                 if p in first.proc_cpu and p not in last.proc_cpu)
    workers = [p for p in alive_tree if p not in mains and p not in helpers]
    rss = 0
    for pid in alive_tree:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    pool = sum(1 for p in workers if parents.get(p) in mains | helpers)
    # Others by their own time: init and shells reap many children we know nothing of.
    others = sorted((ProcessUse(p, last.proc_cpu[p][3], 100.0 * cpu_delta(p, children=False) / secs)
                     for p in last.proc_cpu if p not in tree and p != me),
                    key=lambda u: -u.cpu)
    vm = psutil.virtual_memory()
    disk_r = disk_w = 0.0
    if first.disk and last.disk:  # None where the kernel shows no disks (some containers)
        disk_r = _rate(first.disk.read_bytes, last.disk.read_bytes, secs)
        disk_w = _rate(first.disk.write_bytes, last.disk.write_bytes, secs)
    nics = [(first.net[k], v) for k, v in last.net.items() if k in first.net]
    recv = sum(_rate(a.bytes_recv, b.bytes_recv, secs) for a, b in nics)
    sent = sum(_rate(a.bytes_sent, b.bytes_sent, secs) for a, b in nics)
    swap_bps = _rate(first.swap.sin + first.swap.sout, last.swap.sin + last.swap.sout, secs)

    def psi(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else min(100.0, 100.0 * _rate(a, b, secs) / 1e6)

    return Sample(
        host=socket.gethostname(), time=last.wall, seconds=secs, cores=cores,
        cpu=sum(per_core) / cores, cpu_per_core=tuple(per_core), iowait=iowait / cores,
        steal=steal / cores, load=os.getloadavg(), mem_total=vm.total, mem_used=vm.used,
        mem_available=vm.available, swap_used=last.swap.used, swap_bps=swap_bps,
        disk_read_bps=disk_r, disk_write_bps=disk_w, net_recv_bps=recv, net_sent_bps=sent,
        blocked=blocked_all, io_pressure=psi(first.psi_io, last.psi_io),
        mem_pressure=psi(first.psi_mem, last.psi_mem),
        workers=WorkerUse(runs=len(mains & set(parents)), pool=pool, processes=len(workers),
                          busy=sum(1 for p in workers if 100.0 * cpu_delta(p) / secs >= BUSY_PCT),
                          runnable=runnable, blocked=blocked_w, cpu=100.0 * max(0.0, w_cpu) / secs,
                          rss=rss),
        others=tuple(u for u in others[:OTHERS_SHOWN] if u.cpu >= OTHERS_MIN_PCT))


# -- verdict -----------------------------------------------------------------------------

def verdict(s: Sample, *, workers: int | None = None) -> Verdict:
    """What limits the run on the sampled machine. `workers` is the number of pool
    processes the run was asked for (default: the pool processes found)."""
    w = s.workers
    n = workers if workers is not None else w.pool
    cores = s.cores
    used = f"{w.cpu / 100:.1f} of {cores} core(s)"
    others = _others_note(s)
    if w.runs == 0 and w.processes == 0:
        return Verdict("idle", "idle: no `python -m tasks run` process on this machine",
                       ("start the worker (fab run), or read its log if it stopped",))
    avail = s.mem_available / s.mem_total if s.mem_total else 1.0
    if (avail < MEM_AVAILABLE_MIN or s.swap_bps > SWAP_BPS
            or (s.mem_pressure or 0.0) >= MEM_PRESSURE_PCT):
        return Verdict("memory", f"memory pressure: {100 * avail:.0f}% of memory available, "
                       f"swapping {s.swap_bps / 2**20:.1f} MiB/s; the {n} worker process(es) "
                       f"hold {w.rss / 2**30:.1f} GiB",
                       (f"fewer processes per VM (--workers {max(1, n // 2)}), or a machine "
                        "type with more memory per core",
                        "hold less in memory per task: stream or memory-map inputs, free large "
                        "arrays, load a model once per process with init= rather than per key"))
    running = w.pool or n  # processes there are; `n` is how many there should be
    cpu_bound = running > 0 and w.runnable >= CPU_BOUND_SHARE * running
    saturated = s.cpu >= SATURATED_PCT
    if cpu_bound and saturated:
        return Verdict("cpu-bound", f"CPU-bound and saturated: {n} worker process(es) use "
                       f"{used}; the machine is {s.cpu:.0f}% busy",
                       ("this VM does all it can: more VMs (or more cores per VM) make the run "
                        "faster, more processes per VM would not",
                        "make each task cheaper: vectorize with numpy, avoid per-row Python "
                        "loops, skip work whose result is not used") + others)
    if cpu_bound and n < cores:
        return _too_few(n, cores, s, others)
    if not cpu_bound and (s.iowait >= IOWAIT_PCT or w.blocked >= BLOCKED_WORKERS
                          or (s.io_pressure or 0.0) >= IO_PRESSURE_PCT):
        return Verdict("io-wait", f"CPU idle, waiting on disk or the shared mount: workers use "
                       f"{used}, iowait {s.iowait:.0f}%, {w.blocked:.1f} worker process(es) "
                       f"blocked in I/O, disk {_mib(s.disk_read_bps)} read / "
                       f"{_mib(s.disk_write_bps)} written, network {_mib(s.net_recv_bps)} in",
                       ("read inputs locally: copy them to the VM's own disk first (or cache "
                        "them there) instead of reading each over the shared mount",
                        "a faster disk (SSD or local NVMe) if the inputs are already local",
                        f"more processes per VM (--workers {2 * cores}) so that waits overlap",
                        "bigger chunks (--chunk-size) if each task is tiny: fewer round trips "
                        "per key") + others)
    if n < cores and s.cpu < SATURATED_PCT:
        return _too_few(n, cores, s, others)
    if not cpu_bound:
        return Verdict("waiting", f"CPU idle, workers waiting: {n} worker process(es) on "
                       f"{cores} core(s) use only {used} and are rarely runnable "
                       f"({w.runnable:.1f} on average), without disk wait: they wait on the "
                       "network, the shared mount, a remote service or a sleep",
                       (f"more processes per VM (--workers {4 * cores}): waiting tasks overlap",
                        "read inputs locally instead of over the shared mount",
                        "bigger chunks (--chunk-size) if each task is tiny: the per-key claim "
                        "and publish round trips dominate") + others)
    return Verdict("ok", f"busy and balanced: {n} worker process(es) use {used}; the machine "
                   f"is {s.cpu:.0f}% busy", others)


def _too_few(n: int, cores: int, s: Sample, others: tuple[str, ...]) -> Verdict:
    return Verdict("too-few", f"too few processes for the cores: {n} worker process(es) on "
                   f"{cores} core(s), the machine is {s.cpu:.0f}% busy",
                   (f"more processes per VM: --workers {cores} (one per core, the default "
                    "when --workers is not given), more if tasks wait on I/O",) + others)


def _others_note(s: Sample) -> tuple[str, ...]:
    if not s.others:
        return ()
    top = ", ".join(f"{o.name} (pid {o.pid}) {o.cpu:.0f}%" for o in s.others)
    total = sum(o.cpu for o in s.others)
    if total < 25.0 * s.cores:  # other processes take under a quarter of the machine
        return ()
    hint = (" (sshfs encrypts every byte of the shared mount: read inputs locally, or "
            "mount with a cheaper cipher)" if any(o.name == "sshfs" for o in s.others) else "")
    return (f"other processes take CPU from the workers: {top}{hint}",)


def _mib(bps: float) -> str:
    return f"{bps / 2**20:.1f} MiB/s"


# -- recording ---------------------------------------------------------------------------

def metrics_path(root: str | Path, host: str | None = None) -> Path:
    """Where a host's metric samples go: ROOT/.spotfan/cluster/metrics/<host>.jsonl."""
    return Path(root) / ".spotfan" / "cluster" / "metrics" / f"{host or socket.gethostname()}.jsonl"


def record(path: str | Path, interval_s: float, stop_event: threading.Event, *,
           pids: Iterable[int] | None = None, max_samples: int | None = None) -> int:
    """Append one metric sample per `interval_s` to `path` until `stop_event` is set (or
    `max_samples` were written). Returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "a", encoding="utf-8") as f:
        while not stop_event.is_set() and (max_samples is None or written < max_samples):
            s = sample(interval_s, pids=pids, tick_s=min(RECORD_TICK_S, interval_s),
                       stop=stop_event)
            f.write(json.dumps(s.metric_row()) + "\n")
            f.flush()
            written += 1
    return written


# -- command line ------------------------------------------------------------------------

def describe(s: Sample, v: Verdict) -> str:
    """A sample and its verdict as a person reads them (also what `fab top` prints per VM)."""
    w = s.workers
    cores = " ".join(f"{c:.0f}" for c in s.cpu_per_core)
    lines = [
        f"{s.host}: sampled {s.seconds:.1f}s",
        f"  cpu      {s.cpu:.0f}% busy (per core: {cores}), iowait {s.iowait:.0f}%, "
        f"steal {s.steal:.0f}%, load {s.load[0]:.2f} {s.load[1]:.2f} {s.load[2]:.2f}",
        f"  memory   {s.mem_used / 2**30:.1f} GiB used, {s.mem_available / 2**30:.1f} GiB "
        f"available, swap {s.swap_used / 2**20:.0f} MiB used ({_mib(s.swap_bps)})",
        f"  disk     {_mib(s.disk_read_bps)} read, {_mib(s.disk_write_bps)} written; "
        f"{s.blocked:.1f} process(es) in D state",
        f"  network  {_mib(s.net_recv_bps)} in, {_mib(s.net_sent_bps)} out",
        f"  workers  {w.runs} run(s), {w.pool} pool process(es), {w.processes} in all, "
        f"{w.busy} busy; {w.cpu:.0f}% CPU, {w.rss / 2**20:.0f} MiB RSS",
        f"verdict: {v.summary}",
    ]
    lines += [f"  - {a}" for a in v.advice]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.top",
                                     description="What this machine is busy with, and a verdict.")
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"how long to sample (default {DEFAULT_SECONDS:.0f})")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--workers", type=int, help="pool processes the run was asked for")
    parser.add_argument("--pid", type=int, action="append", dest="pids",
                        help="a worker's main process (default: every `python -m tasks run`)")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="append a metric sample every --interval seconds")
    rec.add_argument("--to", required=True, help="file to append to, e.g. "
                     "ROOT/.spotfan/cluster/metrics/$(hostname).jsonl")
    rec.add_argument("--interval", type=float, default=5.0, help="seconds per sample (default 5)")
    rec.add_argument("--for", dest="duration", type=float,
                     help="stop after this many seconds (default: until SIGTERM or Ctrl-C)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS:.0f}]")
    if args.command == "record":
        if not 0 < args.interval <= MAX_SECONDS:
            parser.error(f"--interval must be in (0, {MAX_SECONDS:.0f}]")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        limit = None if args.duration is None else max(1, round(args.duration / args.interval))
        try:
            n = record(args.to, args.interval, stop, pids=args.pids, max_samples=limit)
        except KeyboardInterrupt:
            return 130
        print(f"wrote {n} sample(s) to {args.to}", file=sys.stderr)
        return 0
    s = sample(args.seconds, pids=args.pids)
    v = verdict(s, workers=args.workers)
    if args.json:
        print(json.dumps({"sample": s.to_dict(), "verdict": v.to_dict()}))
    else:
        print(describe(s, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
