"""What one VM is busy with, sampled for a few seconds with psutil: the machine, the worker's processes, the others.

The worker's processes are every `python -m tasks run` process and its descendants
(pool processes, the programs they start), less multiprocessing's own helpers. A
sample travels as JSON (`fab top` reads what `python -m cluster.vm.top --json` prints,
as untrusted input) and as one line of a metrics file (tasks.records.MetricSample).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import psutil

from cluster.errors import ResultError
from cluster.records import Fields
from cluster.vm.gpus import MAX_GPUS, MAX_NAME, Gpu, GpuMeter
from tasks.records import GpuMetric, MetricSample

DEFAULT_SECONDS = 3.0
MAX_SECONDS = 600.0  # one sample never takes longer than this
TICK_S = 0.25  # how often process states are looked at within a sample
BUSY_PCT = 20.0  # a process using at least this percent of one core counts as busy
OTHERS_SHOWN = 3  # busiest other processes kept in a sample
OTHERS_MIN_PCT = 5.0  # ... if they use at least this percent of one core
MAX_CORES = 4096  # what a sample read from a VM may claim
MAX_OTHERS = 100
SAMPLE_HINT = "A VM (or whoever controls it) can print anything: check that VM (`fab logs VM`, `fab exec`)"


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
    gpus: tuple[Gpu, ...] = ()  # each GPU: mean utilisation over the sample, peak memory used
    gpu_problem: str = ""  # why no GPU is shown ("nvidia-smi: not found" on a CPU VM); "" if the driver answered

    def to_dict(self) -> dict[str, Any]:
        return _rounded(asdict(self))

    @classmethod
    def from_dict(cls, d: object, *, source: str) -> Sample:
        """The inverse of `to_dict`: a sample another machine sent as JSON (`fab top`), validated."""
        f = _fields(d, source)
        workers = _fields(f.raw.get("workers"), f"{source}: workers")
        others = f.raw.get("others")
        if not isinstance(others, list) or len(others) > MAX_OTHERS:
            raise f.refused("others", f"must be a list of at most {MAX_OTHERS} processes")
        return cls(
            host=f.text("host"), time=f.number("time", 0, 1e11), seconds=f.number("seconds", 0, MAX_SECONDS * 2),
            cores=f.whole("cores", 1, MAX_CORES), cpu=_pct(f, "cpu"),
            cpu_per_core=_numbers(f, "cpu_per_core", MAX_CORES, 0, 100), iowait=_pct(f, "iowait"),
            steal=_pct(f, "steal"), load=_numbers(f, "load", 3, 0, 1e9, exactly=3),  # type: ignore[arg-type]
            mem_total=f.whole("mem_total", 0, 1 << 62), mem_used=f.whole("mem_used", 0, 1 << 62),
            mem_available=f.whole("mem_available", 0, 1 << 62), swap_used=f.whole("swap_used", 0, 1 << 62),
            swap_bps=_rate_of(f, "swap_bps"), disk_read_bps=_rate_of(f, "disk_read_bps"),
            disk_write_bps=_rate_of(f, "disk_write_bps"), net_recv_bps=_rate_of(f, "net_recv_bps"),
            net_sent_bps=_rate_of(f, "net_sent_bps"), blocked=f.number("blocked", 0, 1e9),
            io_pressure=f.number("io_pressure", 0, 100, optional=True),
            mem_pressure=f.number("mem_pressure", 0, 100, optional=True),
            workers=WorkerUse(
                runs=workers.whole("runs", 0, 1 << 32), pool=workers.whole("pool", 0, 1 << 32),
                processes=workers.whole("processes", 0, 1 << 32), busy=workers.whole("busy", 0, 1 << 32),
                runnable=workers.number("runnable", 0, 1e9), blocked=workers.number("blocked", 0, 1e9),
                cpu=workers.number("cpu", 0, 1e9), rss=workers.whole("rss", 0, 1 << 62)),
            others=tuple(_process(o, f"{source}: others[{i}]") for i, o in enumerate(others)),
            gpus=_gpus(f, source), gpu_problem=f.text("gpu_problem", optional=True) or "")

    def metric_sample(self) -> MetricSample:
        """This sample as one line of a metrics file (the format tasks/report.py reads)."""
        return MetricSample(
            t=round(self.time, 3), host=self.host, seconds=round(self.seconds, 3), cpu=round(self.cpu, 1),
            cpu_per_core=[round(c, 1) for c in self.cpu_per_core], iowait=round(self.iowait, 1),
            steal=round(self.steal, 1), load1=round(self.load[0], 2), mem_used=self.mem_used,
            mem_available=self.mem_available, swap_used=self.swap_used,
            disk_read_bps=round(self.disk_read_bps), disk_write_bps=round(self.disk_write_bps),
            net_recv_bps=round(self.net_recv_bps), net_sent_bps=round(self.net_sent_bps),
            workers=self.workers.processes, workers_cpu=round(self.workers.cpu, 1), workers_rss=self.workers.rss,
            gpus=tuple(GpuMetric(index=g.index, util=_round(g.util_pct, 1), mem_used_mib=_round(g.mem_used_mib, 0),
                                 mem_total_mib=_round(g.mem_total_mib, 0)) for g in self.gpus))


def _round(v: float | None, digits: int) -> float | None:
    return None if v is None else round(v, digits)


def _rounded(value: Any) -> Any:
    """Floats to 3 decimals, for JSON a person may read."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _fields(raw: object, source: str) -> Fields:
    return Fields(raw, source, error=ResultError, hint=SAMPLE_HINT)


def _pct(f: Fields, key: str) -> float:
    return f.number(key, 0, 100.0001)  # type: ignore[no-any-return]


def _rate_of(f: Fields, key: str) -> float:
    return f.number(key, 0, 1e15)  # type: ignore[no-any-return]


def _numbers(f: Fields, key: str, most: int, low: float, high: float, *, exactly: int | None = None) -> tuple[float, ...]:
    v = f.raw.get(key)
    if (not isinstance(v, list) or len(v) > most or (exactly is not None and len(v) != exactly)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high for x in v)):
        raise f.refused(key, f"must be a list of at most {most} numbers from {low:g} to {high:g}")
    return tuple(float(x) for x in v)


def _gpus(f: Fields, source: str) -> tuple[Gpu, ...]:
    """The optional `gpus` list (a sampler older than GPU sampling sends none)."""
    raw = f.raw.get("gpus")
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_GPUS:
        raise f.refused("gpus", f"must be a list of at most {MAX_GPUS} GPUs")
    out = []
    for i, one in enumerate(raw):
        g = _fields(one, f"{source}: gpus[{i}]")
        out.append(Gpu(index=g.whole("index", 0, MAX_GPUS), name=g.text("name", max_len=MAX_NAME),
                       util_pct=g.number("util_pct", 0, 100, optional=True),
                       mem_used_mib=g.number("mem_used_mib", 0, 1 << 40, optional=True),
                       mem_total_mib=g.number("mem_total_mib", 0, 1 << 40, optional=True)))
    return tuple(out)


def _process(raw: object, source: str) -> ProcessUse:
    f = _fields(raw, source)
    return ProcessUse(pid=f.whole("pid", 0, 1 << 32), name=f.text("name"), cpu=f.number("cpu", 0, 1e9))


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
           tick_s: float = TICK_S, stop: threading.Event | None = None,
           gpu: GpuMeter | None = None) -> Sample:
    """Sample this machine for `duration_s` seconds (less if `stop` is set).

    `pids` names the worker's main processes (default: every `python -m tasks run`
    process found); they and their descendants are the worker's processes. `gpu` looks at
    the GPUs (a recorder keeps one open across samples); default: one for this sample.
    """
    if not 0 < duration_s <= MAX_SECONDS:
        raise ValueError(f"duration_s must be in (0, {MAX_SECONDS:.0f}], got {duration_s}")
    me = os.getpid()
    mains = set(pids) if pids is not None else _find_runs()
    helpers = _helpers(mains)
    meter = gpu if gpu is not None else GpuMeter()
    meter.start()
    first = _snap()
    meter.look()
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
        meter.look()
    gpus = meter.result()
    if gpu is None:
        meter.close()
    last = _snap()
    _, parents = _states()
    tree = _tree(mains, parents)
    ticks = max(ticks, 1)
    return replace(_build(first, last, mains, helpers, tree_at_start, tree, parents, runnable / ticks,
                          blocked_w / ticks, blocked_all / ticks, me), gpus=gpus.gpus, gpu_problem=gpus.problem)


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
    """multiprocessing's forkserver and resource tracker, and the runner's own SFTP session
    (`ssh ... sftp`, tasks.direct), under the run processes: they hold no key, so they count
    neither as workers nor as missing ones."""
    helpers = set()
    for pid in mains:
        try:
            children = psutil.Process(pid).children()
        except psutil.Error:
            continue
        for c in children:
            try:
                argv = c.cmdline()
            except psutil.Error:
                continue
            cmd = " ".join(argv)
            session = bool(argv) and os.path.basename(argv[0]) == "ssh" and argv[-1] == "sftp"
            if "forkserver" in cmd or "resource_tracker" in cmd or session:
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
