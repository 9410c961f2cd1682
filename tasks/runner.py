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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tasks import plan as plans
from tasks.claims import Claims, listing, parse_claim_name
from tasks.fs import ENV_ERRNOS, FsClock, fault, probe_publish
from tasks.mounts import is_network
from tasks.layout import Layout, is_object_url, new_owner_id
from tasks.bounds import START_METHODS
from tasks.plan import DEFAULT_LEASE_S
from tasks.progress import ProgressFn
from tasks.records import ExecLog, FailureStore, OwnerRecord, Stamp
from tasks.runparts import (DEFAULT_MAX_ATTEMPTS, RunOptions, drive, end_state, finish,
                            finish_early, left_to_run, raise_on_sigterm, restore_sigterm,
                            task_timeout)
from tasks.runreport import DispatchOptions, RunReport
from tasks.runstate import StateFile
from tasks.scan import scan_done
from tasks.spec import Task

if TYPE_CHECKING:
    from concurrent.futures import Future

    from tasks.direct import Direct
    from tasks.dispatch import Dispatch
    from tasks.pool import Pool
    from tasks.sftp import Session as SftpSession

logger = logging.getLogger(__name__)

__all__ = ["run", "RunOptions", "RunReport", "DEFAULT_LEASE_S", "DEFAULT_MAX_ATTEMPTS",
           "START_METHODS"]


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
    return run_with(task, root if is_object_url(str(root)) else Path(root).resolve(), opts)


def run_with(task: Task, root: Path | str, opts: RunOptions) -> RunReport:
    if not isinstance(root, Path):
        from tasks.store.run import run_on_bucket  # an object-store root (s3://, gs://)

        return run_on_bucket(task, str(root), opts)
    started = time.monotonic()
    workers = opts.check(root)
    timeout_s = task_timeout(task, opts)
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
    pending, attempts = left_to_run(task, opts, report, done, failures, total=len(items))
    if not pending:
        return finish_early(report, opts, started, done=len(done))
    # With work to do, and only then, the dispatch loop, the pool, the SSH session and what
    # they import (~0.15 s): a re-run that finds every key done (each VM's restart) never
    # uses them. The forkserver starts first, while no other thread runs (see start_forkserver).
    from tasks.pool import Pool, start_forkserver

    start_forkserver(opts.executor, opts.start_method)
    from tasks.direct import Direct
    from tasks.dispatch import Dispatch, UnitView
    from tasks.owners import Heartbeat, Owner, heartbeat_interval, live_owners, sweep
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
                                      workers, time.time(), stamp.boot), clock)
    network = is_network(root)
    if network:
        _search_root_last(root)
    local = Staging(owner_id) if network else None  # the tasks' own writes go to local disk
    staging = local.path if local is not None else owner.tmp
    state = StateFile(opts.state_file, task=task.name, total=len(items)) if opts.state_file else None
    old_term = raise_on_sigterm()
    dispatch: Dispatch | None = None
    claims: Claims | None = None
    direct: Direct | None = None
    starting: Future[SftpSession] | None = None
    pool: Pool | None = None
    log = ExecLog(layout.log / f"{owner_id}.jsonl", owner_id)
    try:
        if state is not None:
            state.__enter__()  # left in the finally below, after everything else
        remote = Direct.wanted(root) if network and not (opts.fsync or task.fsync) else None
        if remote is not None and opts.start_method != "fork":
            # Its ssh handshake, the slowest step of the start, overlaps all the set-up below.
            starting = Direct.connect()
        owner.register()
        method = probe_publish(owner.tmp)
        setup = WorkerSetup(task.ref(), str(root), str(staging),
                            str(owner.tmp) if network else None, method, opts.fsync, os.getpid(),
                            gpu_groups=opts.gpu_groups(), direct=remote is not None)
        pool = Pool(setup, executor=opts.executor, workers=workers,
                    start_method=opts.start_method, timeout_s=timeout_s)
        if opts.start_method == "fork":
            # Forked before this runner starts a thread: forked while the session's thread is in
            # subprocess.Popen, a worker holds that Popen's pipe open and the runner waits forever.
            pool.start()
            if remote is not None:  # (its ssh handshake still overlaps the set-up below)
                starting = Direct.connect()
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
        pool.start()  # its workers start (import, load the task) while the session starts
        if remote is not None:  # the session checked, once the owner's folder exists
            direct = Direct.start(root=root, remote=remote, tmp=owner.tmp, connecting=starting,
                                  fallback=Publisher(root, method=method, share_tmp=owner.tmp,
                                                     fsync=False))
            starting = None
        if task.fetch:
            logger.info("fetch: %s", "small inputs are fetched in batches over the direct SFTP "
                        "session" if direct and not direct.lost else "no direct SFTP session here, "
                        "so the task reads its inputs through the mount")
        dispatch = Dispatch(
            root=root, pending=pending, unit_of=unit_of, done=done_now, attempts=attempts,
            report=report, claims=claims, view=UnitView(claims.done, claims.folder, markers_before,
                                                       lister=direct.listings if direct else None,
                                                       owners=layout.owners),
            pool=pool, store=store, log=log, owner=owner_id, started=started,
            rng=random.Random(opts.seed), direct=direct,
            opts=DispatchOptions(workers=workers, max_attempts=opts.max_attempts,
                                 limit=opts.limit, chunk_size=opts.chunk_size,
                                 timeout_s=timeout_s, lease_s=plan.lease_s,
                                 progress=opts.progress, state=state,
                                 fetch_into=staging if direct and task.fetch else None))
        drive(dispatch, pool, Heartbeat(owner, claims, heartbeat_interval(plan.lease_s)))
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
        restore_sigterm(old_term)
        end_state(state, len(done_now), report)
    assert dispatch is not None
    finish(report, dispatch, store, len(items))
    _sweep_stale_claims(layout, claims, set(unit_of.values()) - set(dispatch.open))
    report.seconds = time.monotonic() - started
    return report


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



