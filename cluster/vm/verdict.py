"""A verdict on what limits the run on one sampled VM, with the advice that follows from it, and the
sample and verdict as a person reads them (what `fab top` prints per VM)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cluster.errors import ResultError
from cluster.records import Fields
from cluster.vm.sample import SAMPLE_HINT, Sample

SATURATED_PCT = 85.0  # machine CPU busy percent from which the CPU counts as saturated
CPU_BOUND_SHARE = 0.6  # workers runnable this share of the time are CPU-bound
IOWAIT_PCT = 10.0  # iowait percent from which the CPU counts as waiting on I/O
BLOCKED_WORKERS = 0.5  # mean worker processes in uninterruptible (D) sleep that count
IO_PRESSURE_PCT = 20.0  # Linux PSI: share of time some task stalled on I/O
MEM_AVAILABLE_MIN = 0.10  # less available memory than this share is memory pressure
SWAP_BPS = 1 << 20  # swapping faster than this (bytes/s) is memory pressure
MEM_PRESSURE_PCT = 10.0  # Linux PSI: share of time some task stalled on memory
GPU_BUSY_PCT = 80.0  # mean GPU utilisation from which the GPUs count as the limit
GPU_MEM_FULL = 0.95  # a GPU with this share of its memory in use is memory-bound
VERDICT_KINDS = ("idle", "memory", "gpu-memory", "gpu-bound", "input-bound", "cpu-bound", "too-few", "io-wait",
                 "waiting", "ok")
MAX_ADVICE = 20
MAX_ADVICE_CHARS = 4096


@dataclass(frozen=True)
class Verdict:
    """What limits the run on one machine, and what to do about it."""

    kind: str  # one of VERDICT_KINDS: idle | memory | gpu-memory | gpu-bound | input-bound | cpu-bound | ...
    summary: str  # one line a person reads first
    advice: tuple[str, ...]  # concrete next steps, most useful first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, *, source: str) -> Verdict:
        """A verdict another machine sent as JSON (`fab top`), validated."""
        f = Fields(d, source, error=ResultError, hint=SAMPLE_HINT)
        advice = f.raw.get("advice")
        if not isinstance(advice, list) or len(advice) > MAX_ADVICE or not all(
                isinstance(a, str) and len(a) <= MAX_ADVICE_CHARS for a in advice):
            raise f.refused("advice", f"must be a list of at most {MAX_ADVICE} lines")
        return cls(kind=f.choice("kind", VERDICT_KINDS), summary=f.text("summary", max_len=MAX_ADVICE_CHARS),
                   advice=tuple(advice))


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
    io_busy = (s.iowait >= IOWAIT_PCT or w.blocked >= BLOCKED_WORKERS
               or (s.io_pressure or 0.0) >= IO_PRESSURE_PCT)
    on_gpus = _gpu_verdict(s, cpu_busy=cpu_bound or saturated, io_busy=io_busy, others=others)
    if on_gpus is not None:
        return on_gpus
    if cpu_bound and saturated:
        return Verdict("cpu-bound", f"CPU-bound and saturated: {n} worker process(es) use "
                       f"{used}; the machine is {s.cpu:.0f}% busy",
                       ("this VM does all it can: more VMs (or more cores per VM) make the run "
                        "faster, more processes per VM would not",
                        "make each task cheaper: vectorize with numpy, avoid per-row Python "
                        "loops, skip work whose result is not used") + others)
    if cpu_bound and n < cores:
        return _too_few(n, cores, s, others)
    if not cpu_bound and io_busy:
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


def _gpu_verdict(s: Sample, *, cpu_busy: bool, io_busy: bool, others: tuple[str, ...]) -> Verdict | None:
    """On a VM whose GPUs report: what limits them (None: no GPU, or none reports its use)."""
    full = [g for g in s.gpus if g.mem_used_mib is not None and g.mem_total_mib
            and g.mem_used_mib >= GPU_MEM_FULL * g.mem_total_mib]
    if full:
        g = full[0]
        assert g.mem_used_mib is not None and g.mem_total_mib is not None
        return Verdict("gpu-memory", f"GPU memory-bound: {len(full)} of {len(s.gpus)} GPU(s) nearly full, GPU "
                       f"{g.index} holds {g.mem_used_mib / 1024:.1f} of {g.mem_total_mib / 1024:.1f} GiB",
                       ("smaller batches, or half precision (float16/bfloat16) weights and activations: a full "
                        "GPU runs out of memory or falls back to slower kernels",
                        "one model per worker process, loaded once in init= on its own GPU (one worker "
                        "process per GPU is the default)",
                        "a framework that reserves all GPU memory up front (TensorFlow does by default) looks "
                        "full here: let it allocate on demand to see what the task needs",
                        "a GPU type with more memory per GPU") + others)
    utils = [g.util_pct for g in s.gpus if g.util_pct is not None]
    if not utils:
        return None
    mean = sum(utils) / len(utils)
    each = ", ".join(f"GPU {g.index} {g.util_pct:.0f}%" for g in s.gpus if g.util_pct is not None)
    if mean >= GPU_BUSY_PCT:
        return Verdict("gpu-bound", f"GPU-bound: {len(utils)} GPU(s) {mean:.0f}% busy ({each}); the CPU is "
                       f"{s.cpu:.0f}% busy",
                       ("this VM's GPUs do all they can: more GPU VMs make the run faster, more CPU or a "
                        "faster disk would not",
                        "make each GPU faster: bigger batches, half precision, a compiled model, or a "
                        "faster GPU type") + others)
    if cpu_busy or io_busy:
        why = (f"the CPU is {s.cpu:.0f}% busy" if cpu_busy else "") + (" and " if cpu_busy and io_busy else "") \
            + (f"I/O waits (iowait {s.iowait:.0f}%, {s.workers.blocked:.1f} worker process(es) blocked, disk "
               f"{_mib(s.disk_read_bps)} read)" if io_busy else "")
        cpu_advice = ("more data-loading workers: decode and preprocess the next inputs in parallel while the "
                      "GPU works (a DataLoader's num_workers, a thread pool in the task), or do less per "
                      "input on the CPU",)
        io_advice = ("a faster disk: copy the inputs to the VM's local SSD first instead of reading each over "
                     "the shared mount, and prefetch the next batch",)
        return Verdict("input-bound", f"input-bound: the GPU(s) wait for input, {mean:.0f}% busy ({each}), "
                       f"while {why}",
                       (cpu_advice + io_advice if cpu_busy else io_advice + cpu_advice) + others)
    return Verdict("waiting", f"GPU(s) and CPU idle, workers waiting: GPU(s) {mean:.0f}% busy ({each}), the "
                   f"CPU {s.cpu:.0f}% busy, without disk wait: they wait on the network, the shared mount, a "
                   "remote service or a sleep",
                   ("read inputs locally instead of over the shared mount",
                    "bigger batches per GPU call; bigger chunks (--chunk-size) if each key is tiny") + others)


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
        *_gpu_lines(s),
        f"verdict: {v.summary}",
    ]
    lines += [f"  - {a}" for a in v.advice]
    return "\n".join(lines)


def _gpu_lines(s: Sample) -> list[str]:
    """One line per GPU, or one that says there is none, and why: never a made-up 0 %."""
    if not s.gpus:
        return [f"  gpu      no GPU ({s.gpu_problem or 'the driver shows none'})"]
    return [f"  gpu {g.index:<4} {g.name}: " + ("busy unknown" if g.util_pct is None else f"{g.util_pct:.0f}% busy")
            + ", memory " + ("unknown" if g.mem_used_mib is None or g.mem_total_mib is None else
                             f"{g.mem_used_mib / 1024:.1f} of {g.mem_total_mib / 1024:.1f} GiB used")
            for g in s.gpus]
