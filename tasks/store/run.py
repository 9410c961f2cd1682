"""The runner on an object-store root (`--root s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX`):
the same run as on a folder (tasks/runner.py: the options, what is left, the dispatch
loop, the pool, the heartbeat, the report), assembled from the bucket's own stores.

    what                 on a folder (tasks/)          on a bucket (tasks/store/)
    what is done         scan.scan_done                scan.scan_done: a LIST per folder
    claims, done units   claims.Claims                 claims.BucketClaims
    owners, plan         owners.Owner, plan            records.BucketOwner, load_or_create_plan
    failures, log        records.FailureStore, ExecLog records.BucketFailures, BucketLog
    inputs, outputs      publish.Publisher             publish.BucketPublisher: download,
                                                       upload only if absent

The task itself works on local files: its input is downloaded before it is called, its
output written in the runner's local staging folder and uploaded after it returns.
"""
from __future__ import annotations

import logging
import os
import random
import time

from tasks.dispatch import Dispatch
from tasks.errors import SpecError
from tasks.layout import new_owner_id
from tasks.owners import Heartbeat, heartbeat_interval
from tasks.plan import DEFAULT_LEASE_S
from tasks.pool import Pool
from tasks.records import OwnerRecord, Stamp
from tasks.runparts import (RunOptions, drive, end_state, finish, finish_early, left_to_run,
                            raise_on_sigterm, restore_sigterm, task_timeout)
from tasks.runreport import DispatchOptions, RunReport
from tasks.runstate import StateFile
from tasks.spec import Task
from tasks.staging import Staging
from tasks.staging import sweep as sweep_staging
from tasks.store.claims import BucketClaims, sweep_claims
from tasks.store.publish import published
from tasks.store.records import (BucketFailures, BucketLog, BucketOwner, live_owners,
                                 load_or_create_plan, sweep_owners)
from tasks.store.root import BucketRoot
from tasks.store.scan import scan_done
from tasks.units import UnitView
from tasks.worker import WorkerSetup

logger = logging.getLogger(__name__)


def run_on_bucket(task: Task, url: str, opts: RunOptions) -> RunReport:
    """`tasks.runner.run` on an object-store root (see the module docstring)."""
    started = time.monotonic()
    workers = opts.check(None)
    if opts.fsync or task.fsync:
        logger.info("fsync: an object is durable once the store has answered its upload")
    timeout_s = task_timeout(task, opts)
    if "root" in getattr(task, "_params", ()):
        raise SpecError(f"task {task.name} takes `root` (to read files under the run root), which an "
                        "object-store root does not have as a folder: read the objects you need with "
                        "your own client, or run the task on a folder root")
    if getattr(task, "keep_output", False):
        raise SpecError("--keep-output is not supported on an object-store root (s3://, gs://) yet: "
                        "each key's stdout and stderr would stay on the worker's local disk")
    if task.fetch:
        logger.info("fetch: on an object-store root every input is downloaded before its key runs")
    root = BucketRoot(url)
    root.check()  # no such bucket, no credentials, no permission: refused before any work
    items = task.items(root)
    layout = root.layout(task.name)
    report = RunReport(task.name, root, total=len(items))  # type: ignore[arg-type]
    markers_before = root.names(layout.done)  # before the outputs: see UnitView
    done = scan_done(root, items)
    store = BucketFailures(root, layout)
    pending, attempts = left_to_run(task, opts, report, done, store.load(), total=len(items))
    if not pending:
        root.close()
        return finish_early(report, opts, started, done=len(done))
    done_now = set(done)
    del done

    owner_id = new_owner_id()
    stamp = Stamp.mine()
    owner = BucketOwner(root, layout, OwnerRecord(owner_id, stamp.host, stamp.pid, stamp.started,
                                                  task.name, workers, time.time(), stamp.boot))
    local = Staging(owner_id)  # the task's input and output, on local disk
    state = StateFile(opts.state_file, task=task.name, total=len(items)) if opts.state_file else None
    old_term = raise_on_sigterm()
    claims: BucketClaims | None = None
    pool: Pool | None = None
    dispatch: Dispatch | None = None
    log = BucketLog(root, layout, owner_id)
    try:
        if state is not None:
            state.__enter__()
        owner.register()  # also learns the store's clock
        plan = load_or_create_plan(
            root, layout, total=len(items), lease_s=opts.lease_s,
            runner_alive=lambda: any(o.record.owner != owner_id for o in live_owners(
                root, layout, lease_s=max(DEFAULT_LEASE_S, opts.lease_s or 0), task=task.name)))
        if sweep_owners(root, layout, lease_s=plan.lease_s, me=owner_id):
            logger.info("removed the owner objects of runners that died")
        sweep_staging()
        local.create()
        unit_of = {it.key: plan.unit(it.key) for it in pending}
        claims = BucketClaims(root, layout, lease_s=plan.lease_s)
        setup = WorkerSetup(task.ref(), str(root), str(local.path), None, "rename", False,
                            os.getpid(), gpu_groups=opts.gpu_groups(), bucket=root)
        pool = Pool(setup, executor=opts.executor, workers=workers,
                    start_method=opts.start_method, timeout_s=timeout_s)
        pool.start()
        dispatch = Dispatch(
            root=local.path, pending=pending, unit_of=unit_of, done=done_now, attempts=attempts,
            report=report, claims=claims, view=UnitView(claims.done, claims.folder, markers_before),  # type: ignore[arg-type]
            pool=pool, store=store, log=log, owner=owner_id, started=started,
            rng=random.Random(opts.seed), exists=lambda it: published(root, it),
            opts=DispatchOptions(workers=workers, max_attempts=opts.max_attempts,
                                 limit=opts.limit, chunk_size=opts.chunk_size,
                                 timeout_s=timeout_s, lease_s=plan.lease_s,
                                 progress=opts.progress, state=state))
        drive(dispatch, pool, Heartbeat(owner, claims, heartbeat_interval(plan.lease_s)))  # type: ignore[arg-type]
    finally:
        if claims is not None:
            claims.release_all()
        if pool is not None:
            pool.shutdown(kill=True)
        log.close()  # its last rows, before the owner object goes
        owner.close()
        local.close()
        restore_sigterm(old_term)
        end_state(state, len(done_now), report)
    assert dispatch is not None
    finish(report, dispatch, store, len(items))
    finished = set(unit_of.values()) - set(dispatch.open)
    if finished:
        try:
            sweep_claims(root, layout, finished, lease_s=plan.lease_s)
        except Exception as e:
            logger.warning("could not sweep stale claims: %s", e)
    root.close()
    report.seconds = time.monotonic() - started
    return report

