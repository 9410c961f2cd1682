"""Typed bookkeeping files: failure records, the per-execution log, owner files and the
holder stamp in a claim, all plain files under `.spotfan/`.

A failure record (`failed/<id>.json`) holds a key's latest error, its traceback or
stderr, and how many attempts failed; `gave_up` marks a key that reached
--max-attempts. The execution log (`log/<owner>.jsonl`) has one line per execution,
so anyone can count how many keys ran twice, and reports can plot progress over time.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from tasks.fs import atomic_write
from tasks.layout import key_id
from tasks.procs import boot_id, find_process, start_time



@dataclass(frozen=True)
class Stamp:
    """Who holds a claim: enough to tell, on the same host, that the holder is gone."""

    host: str  # socket.gethostname() of the holder (a lab VM has its own)
    pid: int  # the holder's process id, in its own PID namespace
    started: float  # the holder's start, seconds since boot (tasks.procs), so a reused pid is not mistaken
    boot: str = ""  # the boot it ran in ("": not recorded)

    @classmethod
    def mine(cls) -> "Stamp":
        return cls(socket.gethostname(), os.getpid(), start_time(os.getpid()), boot_id())

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started, "boot": self.boot})

    @classmethod
    def from_json(cls, text: str) -> "Stamp | None":
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), str(d.get("boot", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # empty (holder died between create and write) or foreign

    def gone(self) -> bool:
        """True if this holder ran on this host and its process is gone (or its pid now
        belongs to another process). Holders on other hosts are never judged gone here."""
        if self.host != socket.gethostname():
            return False
        try:
            return find_process(self.pid, self.started, self.boot) is None
        except psutil.Error:
            return False  # not ours to look at: it may well be alive


@dataclass(frozen=True)
class OwnerRecord:
    """`owners/<owner>.json`: one live `run` process. Its mtime is its heartbeat, on the
    filesystem's clock (a rewrite of its first byte, never utime)."""

    owner: str  # host-pid-random
    host: str  # machine it runs on
    pid: int  # its process id there
    pid_started: float  # the process's start, seconds since boot (with host and pid: is it gone?)
    task: str  # the task it runs
    workers: int  # its pool size
    started: float  # seconds since the epoch, by its own clock
    pid_boot: str = ""  # the boot it runs in ("": not recorded)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()  # starts with "{": the heartbeat byte

    @classmethod
    def from_json(cls, text: str) -> "OwnerRecord | None":
        try:
            d = json.loads(text)
            return cls(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["pid_started"]),
                       str(d["task"]), int(d["workers"]), float(d["started"]), str(d.get("pid_boot", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.host, self.pid, self.pid_started, self.pid_boot)


@dataclass(frozen=True)
class Failure:
    """The latest failure of one key."""

    key: str  # the key that failed
    attempts: int  # failed attempts so far, across every run and machine
    gave_up: bool  # reached --max-attempts: reported as failed, skipped until retried
    error: str  # one line: exception type and message, or exit status
    detail: str  # traceback, or the command's stderr tail
    host: str  # machine of the last attempt
    owner: str  # `run` process of the last attempt
    time: float  # seconds since the epoch
    max_attempts: int = 0  # the run's --max-attempts at that attempt (0: a record from before it was kept)


class FailureStore:
    """Read and write failure records; each write is a temp file renamed into place."""

    def __init__(self, failed_dir: Path, tmp_dir: Path) -> None:
        self.dir = failed_dir
        self.tmp_dir = tmp_dir

    def load(self, keys: Iterable[str] | None = None) -> dict[str, Failure]:
        """Failure records by key: all of them, or only those of `keys` (one listing, then
        one read per record that exists)."""
        found: dict[str, Failure] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return found
        wanted = None if keys is None else {f"{key_id(k)}.json" for k in keys}
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            if wanted is not None and name not in wanted:
                continue
            try:
                data = json.loads((self.dir / name).read_text(encoding="utf-8"))
                found[data["key"]] = Failure(**data)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # vanished or unreadable: treat as no record
        return found

    def record(self, failure: Failure) -> None:
        atomic_write(self.dir / f"{key_id(failure.key)}.json", json.dumps(asdict(failure)).encode())

    def clear(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                (self.dir / f"{key_id(key)}.json").unlink()
            except FileNotFoundError:
                pass


class ExecLog:
    """This process's execution log: opened once, appended per chunk."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self.host = socket.gethostname()
        self._f: IO[str] | None = None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._f is None:
            # one writer per file: "x" so two owners can never share one log
            self._f = open(self.path, "x", encoding="utf-8")
        lines = [json.dumps({**row, "owner": self.owner, "host": self.host}) for row in rows]
        if lines:
            self._f.write("\n".join(lines) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_jsonl(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, row) for every line of every `*.jsonl` file in a folder, in name order.
    A torn line (its writer was killed mid-line) or one that is not an object is skipped."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        try:
            text = (folder / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield name, row


def read_logs(log_dir: Path) -> Iterator[dict[str, Any]]:
    """Every execution row of every owner."""
    return (row for _, row in read_jsonl(log_dir))


def now() -> float:
    return time.time()


MAX_GPUS = 64  # GPUs one metric sample may list
MAX_GPU_MIB = float(1 << 40)


@dataclass(frozen=True)
class GpuMetric:
    """One GPU in a metric sample."""

    index: int  # the driver's index (what CUDA_VISIBLE_DEVICES names)
    util: float | None  # percent of the sample a kernel ran, 0-100; None: the card does not say
    mem_used_mib: float | None  # peak over the sample
    mem_total_mib: float | None


def gpu_metrics(raw: object) -> tuple[GpuMetric, ...] | None:
    """The `gpus` field of a metric sample read back from the share, validated: () when absent (a
    CPU host, or a sampler older than GPU sampling), None when it is not what a sampler writes."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_GPUS:
        return None
    out = []
    for g in raw:
        if not isinstance(g, dict):
            return None
        index, util, used, total = g.get("index"), g.get("util"), g.get("mem_used_mib"), g.get("mem_total_mib")
        if (isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_GPUS
                or not _maybe_number(util, 100.0) or not _maybe_number(used, MAX_GPU_MIB)
                or not _maybe_number(total, MAX_GPU_MIB)):
            return None
        out.append(GpuMetric(index, _float(util), _float(used), _float(total)))
    return tuple(out)


def _maybe_number(v: object, high: float) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= high)


def _float(v: object) -> float | None:
    return None if v is None else float(v)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MetricSample:
    """One line of a host's metrics file (`.spotfan/metrics/<host>.jsonl`, see layout.py) while
    it runs tasks: a cluster VM's sampler writes them, `tasks report` draws them (it needs "t"
    and "cpu", and uses "iowait" and "gpus"; other lines are skipped, the file may be torn or
    forged; "gpus" is optional, so samples written before it read as samples without GPUs)."""

    t: float  # end of the sample, epoch seconds
    host: str  # socket.gethostname(), as in the tasks' execution logs
    seconds: float  # length of the sample
    cpu: float  # busy percent of the whole machine (0-100)
    cpu_per_core: list[float]  # busy percent per logical CPU
    iowait: float  # percent
    steal: float  # percent
    load1: float  # load average over a minute
    mem_used: int  # bytes
    mem_available: int  # bytes
    swap_used: int  # bytes
    disk_read_bps: float  # bytes per second, all disks
    disk_write_bps: float
    net_recv_bps: float  # bytes per second, all interfaces but loopback
    net_sent_bps: float
    workers: int  # the worker's processes
    workers_cpu: float  # their CPU, percent of one core
    workers_rss: int  # their resident memory, bytes
    gpus: tuple[GpuMetric, ...] = ()  # each GPU of the host; () on a host without (or before GPU sampling)

    def to_json(self) -> str:
        return json.dumps(asdict(self))
