"""The runner: find what is left, register as an owner, claim units, dispatch, clean up.

Several `run` processes on one root, on one machine or many, cooperate through the
root alone: each claims units of keys before running them and skips keys whose output
exists (see dispatch.py for the loop, claims.py, plan.py and owners.py for the rules).
"""
from __future__ import annotations

import errno
import logging
import os
import random
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks import gpus as gpu_groups
from tasks import plan as plans
from tasks.claims import Claims, listing, parse_claim_name
from tasks.runreport import DispatchOptions, RunReport
from tasks.errors import SpecError
from tasks.fs import ENV_ERRNOS, FsClock, fault, is_network, probe_publish
from tasks.layout import Layout, new_owner_id
from tasks.bounds import (MAX_ATTEMPTS_LIMIT, MAX_CHUNK_SIZE, MAX_LEASE_S, MAX_LIMIT,
                          MAX_TIMEOUT_S, MIN_LEASE_S, MIN_TIMEOUT_S, START_METHODS, check_count,
                          check_seconds, worker_count)
from tasks.plan import DEFAULT_LEASE_S
from tasks.progress import ProgressFn
from tasks.records import ExecLog, FailureStore, OwnerRecord, Stamp
from tasks.runstate import StateFile
from tasks.scan import scan_done
from tasks.spec import Task

if TYPE_CHECKING:
    from concurrent.futures import Future

    from tasks.direct import Direct
    from tasks.dispatch import Dispatch
    from tasks.pool import Pool

logger = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3

__all__ = ["run", "RunOptions", "RunReport", "DEFAULT_LEASE_S", "DEFAULT_MAX_ATTEMPTS",
           "START_METHODS"]


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

    def check(self, root: Path) -> int:
        """Refuse options out of their bounds (tasks.bounds: nan, inf, negative, huge);
        return how many workers to start."""
        if not root.is_dir():
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


def run(task: Task, *, root: str | Path = ".", workers: int | None = None,
        executor: Literal["process", "thread"] = "process",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS, lease_s: float | None = None,
        limit: int | None = None, retry_failed: bool = False, fsync: bool = False,
        chunk_size: int | None = None, start_method: str = "forkserver",
        timeout_s: float | None = None, progress: ProgressFn | None = None,
        state_file: Path | None = None, seed: int | None = None, gpus: int | None = None,
        gpus_per_worker: int = 1) -> RunReport:
    """Run every key of `task` under `root` whose output does not exist yet (the options
    are RunOptions' fields, documented there).

    Returns a report; keys that fail are recorded and retried up to `max_attempts`
    times, and never stop the others. Raises SpecError before any work if the task or
    the options are wrong, RootError (exit 3) when the root or its disk cannot be used.
    """
    opts = RunOptions(workers=workers, executor=executor, max_attempts=max_attempts,
                      lease_s=lease_s, limit=limit, retry_failed=retry_failed, fsync=fsync,
                      chunk_size=chunk_size, start_method=start_method, timeout_s=timeout_s,
                      progress=progress, state_file=state_file, seed=seed, gpus=gpus,
                      gpus_per_worker=gpus_per_worker)
    return run_with(task, Path(root).resolve(), opts)


def run_with(task: Task, root: Path, opts: RunOptions) -> RunReport:
    started = time.monotonic()
    workers = opts.check(root)
    timeout_s = opts.timeout_s if opts.timeout_s is not None else task.timeout
    if timeout_s is not None and opts.executor == "thread":
        raise SpecError(f"task {task.name} has timeout={timeout_s:g}, which needs --executor "
                        "process (a thread cannot be stopped)")
    if opts.executor == "process":
        task.check_importable()
    items = task.items(root)
    layout = Layout(root, task.name)
    report = RunReport(task.name, root, total=len(items))
    try:
        layout.ensure()
        markers_before = listing(layout.done)  # before the outputs: see UnitView
        done = scan_done(root, items)
        store = FailureStore(layout.failed, layout.tmp)
        failures = store.load()
    except OSError as e:
        raise _as_fault(e, root) from e
    report.done_before = len(done)
    attempts = {k: (0 if opts.retry_failed else f.attempts) for k, f in failures.items()}
    gave_up = {k for k, f in failures.items()
               if f.gave_up and not opts.retry_failed and k not in done}
    report.failed = sorted(gave_up)
    pending = [it for it in done.left if it.key not in gave_up]
    logger.info("%s: %d keys, %d done, %d failed earlier, %d to run", task.name, len(items),
                len(done), len(gave_up), len(pending))
    if not pending:
        if opts.state_file is not None:
            with StateFile(opts.state_file, task=task.name, total=len(items)) as st:
                st.update(phase="finished", done=len(done), failed=len(gave_up), running=[],
                          waiting=[])
        report.seconds = time.monotonic() - started
        return report
    # With work to do, and only then, the dispatch loop, the pool, the SSH session and what
    # they import (~0.15 s): a re-run that finds every key done (each VM's restart) never
    # uses them.
    from tasks.direct import Direct
    from tasks.dispatch import Dispatch, UnitView
    from tasks.owners import Heartbeat, Owner, heartbeat_interval, live_owners, sweep
    from tasks.pool import Pool
    from tasks.publish import Publisher
    from tasks.staging import Staging
    from tasks.staging import sweep as sweep_staging
    from tasks.worker import WorkerSetup

    _raise_fd_limit()
    done_now = set(done)  # the dispatch adds the keys it finishes
    del done  # and the keys left are in `pending`: no second set of them while the work runs

    owner_id = new_owner_id()
    stamp = Stamp.mine()
    clock = FsClock()
    owner = Owner(layout, OwnerRecord(owner_id, stamp.host, stamp.pid, stamp.started, task.name,
                                      workers, time.time()), clock)
    network = is_network(root)
    if network:
        _search_root_last(root)
    local = Staging(owner_id) if network else None  # the tasks' own writes go to local disk
    staging = local.path if local is not None else owner.tmp
    state = StateFile(opts.state_file, task=task.name, total=len(items)) if opts.state_file else None
    old_term = _raise_on_sigterm()
    dispatch: Dispatch | None = None
    claims: Claims | None = None
    direct: Direct | None = None
    starting: Future[Direct] | None = None
    pool: Pool | None = None
    log = ExecLog(layout.log / f"{owner_id}.jsonl", owner_id)
    try:
        if state is not None:
            state.__enter__()  # left in the finally below, after everything else
        owner.register()
        method = probe_publish(owner.tmp)
        remote = Direct.wanted(root) if network and not (opts.fsync or task.fsync) else None
        if remote is not None:  # its ssh handshake overlaps the set-up below and the pool's start
            starting = Direct.begin(root=root, remote=remote, tmp=owner.tmp, fallback=Publisher(
                root, method=method, share_tmp=owner.tmp, fsync=False))
        plan = plans.load_or_create(
            layout.plan, total=len(items), lease_s=opts.lease_s,
            runner_alive=lambda: any(o.record.owner != owner_id for o in live_owners(
                layout, lease_s=max(DEFAULT_LEASE_S, opts.lease_s or 0), clock=clock,
                task=task.name)))
        sweep(layout, lease_s=plan.lease_s, clock=clock, done_units=set(), me=owner_id)
        if local is not None:
            sweep_staging()
            local.create()
        unit_of = {it.key: plan.unit(it.key) for it in pending}
        claims = Claims(layout.claims, layout.done, lease_s=plan.lease_s, clock=clock,
                        pipelined=network)
        setup = WorkerSetup(task.ref(), str(root), str(staging),
                            str(owner.tmp) if network else None, method, opts.fsync, os.getpid(),
                            gpu_groups=opts.gpu_groups(), direct=starting is not None)
        pool = Pool(setup, executor=opts.executor, workers=workers,
                    start_method=opts.start_method, timeout_s=timeout_s)
        pool.start()  # its workers start (import, load the task) while the session starts
        if starting is not None:
            direct, starting = starting.result(), None
        if task.fetch:
            logger.info("fetch: %s", "small inputs are fetched in batches over the direct SFTP "
                        "session" if direct and not direct.lost else "no direct SFTP session here, "
                        "so the task reads its inputs through the mount")
        dispatch = Dispatch(
            root=root, pending=pending, unit_of=unit_of, done=done_now, attempts=attempts,
            report=report, claims=claims, view=UnitView(claims.done, claims.folder, markers_before,
                                                       lister=direct.listings if direct else None),
            pool=pool, store=store, log=log, owner=owner_id, started=started,
            rng=random.Random(opts.seed), direct=direct,
            opts=DispatchOptions(workers=workers, max_attempts=opts.max_attempts,
                                 limit=opts.limit, chunk_size=opts.chunk_size,
                                 timeout_s=timeout_s, lease_s=plan.lease_s,
                                 progress=opts.progress, state=state,
                                 fetch_into=staging if direct and task.fetch else None))
        with Heartbeat(owner, claims, heartbeat_interval(plan.lease_s)):
            try:
                dispatch.loop()
            finally:
                pool.shutdown(kill=True)
    except OSError as e:
        raise _as_fault(e, root) from e
    finally:
        if claims is not None:
            claims.release_all()
            claims.close()
        if pool is not None:
            pool.shutdown(kill=True)  # (done already, unless set-up failed after its start)
        if starting is not None:  # set-up failed before the session was taken
            starting.add_done_callback(lambda f: f.exception() or f.result().close())
        if direct is not None:
            direct.close()
        log.close()
        owner.close()
        if local is not None:
            local.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if state is not None:  # the runner is gone, however it ended
            state.update(phase="finished", done=len(done_now), failed=len(report.failed),
                         running=[], waiting=[])
            state.__exit__(None, None, None)
    assert dispatch is not None
    _finish(report, dispatch, layout, len(items))
    _sweep_stale_claims(layout, claims, set(unit_of.values()) - set(dispatch.open))
    report.seconds = time.monotonic() - started
    return report


def _finish(report: RunReport, dispatch: Dispatch, layout: Layout, total: int) -> None:
    """Keys of units peers marked done: done, or given up there (their failure records)."""
    settled = dispatch.peer_settled - dispatch.done
    if settled:
        records = FailureStore(layout.failed, layout.tmp).load(settled)
        failed = {k for k, f in records.items() if f.gave_up}
        report.failed.extend(sorted(failed - set(report.failed)))
        dispatch.done.update(settled - failed)
    report.left = total - len(dispatch.done) - len(report.failed)


def _sweep_stale_claims(layout: Layout, claims: Claims | None, finished: set[str]) -> None:
    """Stale claims on units this run saw finished (left by runners that died after
    publishing): removed once older than the lease."""
    if claims is None or not finished:
        return
    try:
        for name in listing(layout.claims):
            parsed = parse_claim_name(name)
            if parsed is None or parsed[0] not in finished:
                continue
            path = layout.claims / name
            try:
                if claims.clock.age(path.stat().st_mtime) > claims.lease_s:
                    path.unlink()
            except FileNotFoundError:
                pass
    except OSError as e:
        logger.warning("could not sweep stale claims: %s", e)


def _search_root_last(root: Path) -> None:
    """On a network root every import would first look in the root (the current folder
    of `python -m`), each lookup a round trip, in the runner and in every worker: search
    it last. The task's own module is already imported; its worker imports still find it."""
    here = [p for p in sys.path if p in ("", ".") or _under(Path(p or "."), root)]
    sys.path[:] = [p for p in sys.path if p not in here] + here


def _under(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False


def _as_fault(e: OSError, root: Path) -> Exception:
    if e.errno in ENV_ERRNOS:
        return fault(e.errno, root)
    if e.errno in (errno.EACCES, errno.EPERM):
        return fault(errno.EROFS, root) if not os.access(root, os.W_OK) else e
    return e


def _raise_fd_limit() -> None:
    """Each held claim keeps its file open for heartbeats."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _raise_on_sigterm():  # type: ignore[no-untyped-def]
    """Turn SIGTERM into KeyboardInterrupt so claims are released and temporaries removed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)
