"""The parts of a run that every kind of root shares: its options and their checks, what
is left to run, the dispatch loop with its heartbeat, the end of a run. tasks/runner.py
assembles them on a folder, tasks/store/run.py on an object store.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks import gpus as gpu_groups
from tasks.bounds import (MAX_ATTEMPTS_LIMIT, MAX_CHUNK_SIZE, MAX_LEASE_S, MAX_LIMIT,
                          MAX_TIMEOUT_S, MIN_LEASE_S, MIN_TIMEOUT_S, START_METHODS, check_count,
                          check_seconds, worker_count)
from tasks.errors import SpecError
from tasks.progress import ProgressFn
from tasks.records import Failure, FailureStore
from tasks.runreport import RunReport
from tasks.runstate import StateFile
from tasks.spec import Task

if TYPE_CHECKING:
    from tasks.dispatch import Dispatch
    from tasks.items import Item
    from tasks.owners import Heartbeat
    from tasks.pool import Pool
    from tasks.scan import DoneKeys
    from tasks.store.records import BucketFailures

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The options of one `run`, checked before any work (see `check`)."""

    workers: int | None = None  # pool size; default one per core
    executor: Literal["process", "thread"] = "process"
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # tries per key before it is given up
    lease_s: float | None = None  # asked for by this runner; the plan's lease wins
    limit: int | None = None  # run at most this many keys
    retry_failed: bool = False  # also run keys given up earlier
    fsync: bool = False  # flush each output before publishing it
    chunk_size: int | None = None  # keys per chunk; default adaptive
    start_method: str = "forkserver"
    timeout_s: float | None = None  # a key running longer is killed and charged an attempt
    progress: ProgressFn | None = None
    state_file: Path | None = None  # write a RunState here (on a local disk) while running
    seed: int | None = None  # of the shuffle of pending keys (tests)
    gpus: int | None = None  # GPUs to share out, one group per worker process (tasks.gpus); None: leave CUDA alone
    gpus_per_worker: int = 1  # GPUs in each worker process's group

    def gpu_groups(self) -> tuple[str, ...]:
        """Each worker process's CUDA_VISIBLE_DEVICES, or () without --gpus."""
        if self.gpus is None:
            if self.gpus_per_worker != 1:
                raise SpecError("--gpus-per-worker needs --gpus N (how many GPUs to share out)")
            return ()
        return gpu_groups.split(self.gpus, self.gpus_per_worker,
                                visible=os.environ.get(gpu_groups.CUDA_ENV)).groups

    def check(self, root: Path | None) -> int:
        """Refuse options out of their bounds (tasks.bounds: nan, inf, negative, huge);
        return how many workers to start. `root`: a folder root (None: an object store)."""
        if root is not None and not root.is_dir():
            raise SpecError(f"run root {root} is not a directory; pass --root DIR (on a "
                            "cluster, the shared mount point)")
        if self.executor not in ("process", "thread"):
            raise SpecError(f"--executor must be process or thread, got {self.executor!r}")
        check_count("--max-attempts", self.max_attempts, 1, MAX_ATTEMPTS_LIMIT)
        if self.lease_s is not None:
            check_seconds("--lease", self.lease_s, MIN_LEASE_S, MAX_LEASE_S)
        if self.limit is not None:
            check_count("--limit", self.limit, 1, MAX_LIMIT)
        if self.chunk_size is not None:
            check_count("--chunk-size", self.chunk_size, 1, MAX_CHUNK_SIZE)
        if self.start_method not in START_METHODS:
            raise SpecError(f"--start-method must be one of {', '.join(START_METHODS)}")
        if self.timeout_s is not None:
            check_seconds("--timeout", self.timeout_s, MIN_TIMEOUT_S, MAX_TIMEOUT_S)
            if self.executor == "thread":
                raise SpecError("--timeout needs --executor process: a thread cannot be "
                                "stopped, a worker process can")
        groups = self.gpu_groups()
        if groups:
            if self.executor == "thread":
                raise SpecError("--gpus needs --executor process: threads share one CUDA_VISIBLE_DEVICES")
            if self.workers is not None and self.workers != len(groups):
                raise SpecError(f"--workers {self.workers} with --gpus {self.gpus} --gpus-per-worker "
                                f"{self.gpus_per_worker}: there is one worker process per GPU group, "
                                f"{len(groups)}; leave --workers out")
            return len(groups)
        return worker_count(self.workers)


def task_timeout(task: Task, opts: RunOptions) -> float | None:
    """The per-key timeout (--timeout, else the task's), refused with threads; the task's
    module checked importable by name (process workers import it so)."""
    timeout_s = opts.timeout_s if opts.timeout_s is not None else task.timeout
    if timeout_s is not None and opts.executor == "thread":
        raise SpecError(f"task {task.name} has timeout={timeout_s:g}, which needs --executor "
                        "process (a thread cannot be stopped)")
    if opts.executor == "process":
        task.check_importable()
    return timeout_s


def left_to_run(task: Task, opts: RunOptions, report: RunReport, done: DoneKeys,
                failures: dict[str, Failure], *, total: int) -> tuple[list[Item], dict[str, int]]:
    """The items to run (not done, not given up) and each key's attempts so far."""
    report.done_before = len(done)
    attempts = {k: (0 if opts.retry_failed else f.attempts) for k, f in failures.items()}
    gave_up = {k for k, f in failures.items()
               if f.gave_up and not opts.retry_failed and k not in done}
    report.failed = sorted(gave_up)
    pending = [it for it in done.left if it.key not in gave_up]
    logger.info("%s: %d keys, %d done, %d failed earlier, %d to run", task.name, total,
                len(done), len(gave_up), len(pending))
    return pending, attempts


def finish_early(report: RunReport, opts: RunOptions, started: float, *, done: int) -> RunReport:
    """Nothing to run: the state file says so, and the report is returned."""
    if opts.state_file is not None:
        with StateFile(opts.state_file, task=report.task, total=report.total) as st:
            st.update(phase="finished", done=done, failed=len(report.failed), running=[],
                      waiting=[])
    report.seconds = time.monotonic() - started
    return report


def drive(dispatch: Dispatch, pool: Pool, beat: Heartbeat) -> None:
    """The dispatch loop, with the heartbeat going; the pool is stopped however it ends."""
    with beat:
        try:
            dispatch.loop()
        finally:
            pool.shutdown(kill=True)


def end_state(state: StateFile | None, done: int, report: RunReport) -> None:
    if state is not None:  # the runner is gone, however it ended
        state.update(phase="finished", done=done, failed=len(report.failed), running=[],
                     waiting=[])
        state.__exit__(None, None, None)


def finish(report: RunReport, dispatch: Dispatch, store: FailureStore | BucketFailures,
           total: int) -> None:
    """Keys of units peers marked done: done, or given up there (their failure records)."""
    settled = dispatch.peer_settled - dispatch.done
    if settled:
        records = store.load(settled)
        failed = {k for k, f in records.items() if f.gave_up}
        report.failed.extend(sorted(failed - set(report.failed)))
        dispatch.done.update(settled - failed)
    report.left = total - len(dispatch.done) - len(report.failed)


def raise_on_sigterm():  # type: ignore[no-untyped-def]
    """Turn SIGTERM into KeyboardInterrupt so claims are released and temporaries removed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(old: object) -> None:
    if old is not None:
        signal.signal(signal.SIGTERM, old)  # type: ignore[arg-type]
