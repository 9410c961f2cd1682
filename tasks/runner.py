"""The runner: find what is left, claim it in chunks, run it on a pool, publish, record.

Several `run` processes on one root, on one machine or many, cooperate through the
root alone: each claims keys before running them and skips keys whose output exists.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor
from concurrent.futures import ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

from tasks import worker
from tasks.bounds import (MAX_ATTEMPTS_LIMIT, MAX_CHUNK_SIZE, MAX_LEASE_S, MAX_LIMIT, MIN_LEASE_S,
                          check_count, check_seconds, worker_count)
from tasks.claims import ClaimPlan, Claims, Stamp, network_filesystem, sweep_claims
from tasks.errors import SpecError, TaskError
from tasks.keys import Item
from tasks.layout import Layout, new_owner_id
from tasks.records import ExecLog, Failure, FailureStore
from tasks.scan import scan_done
from tasks.spec import Task

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 120.0  # a claim untouched this long belongs to a dead worker
DEFAULT_MAX_ATTEMPTS = 3
TARGET_CHUNK_S = 0.5  # aim for chunks that take about this long on one worker
MAX_CHUNK = 1000  # never more keys than this in one chunk
CHUNKS_PER_WORKER = 2  # chunks in flight per worker: one running, one queued
PREFETCH_BELOW_S = 1.0  # queue a second chunk per worker only for tasks quicker than this
BALANCE_CHUNKS_PER_WORKER = 4  # keep at least this many chunks per worker of what is left
EMA_ALPHA = 0.3  # weight of the newest chunk in the per-task time estimate
PROGRESS_INTERVAL_S = 1.0  # how often progress is reported
HEARTBEAT_MAX_S = 30.0  # owners and their claims are touched at least this often
TAIL_POLL_S = 2.0  # how often to look again at keys other live workers hold
MAX_STARTUP_FAILURES = 3  # pools that die before finishing any chunk before we give up
MAX_POOL_REBUILDS = 1000  # bound on rebuilding the pool after worker deaths
RATE_WINDOW_S = 60.0  # the rate shown is measured over this window
START_METHODS = ("forkserver", "spawn", "fork")


@dataclass(frozen=True)
class Snapshot:
    """Progress of a run, as shown to the user."""

    task: str  # the task's name
    total: int  # keys in the task
    done: int  # keys whose output exists (before this run or by it)
    failed: int  # keys that reached --max-attempts
    running: int  # keys in flight in this process
    rate: float  # keys finished per second over the last minute
    elapsed: float  # seconds since this run started

    @property
    def eta(self) -> float | None:
        left = self.total - self.done - self.failed
        return left / self.rate if self.rate > 0 else None


@dataclass
class RunReport:
    """What one `run` did."""

    task: str  # the task's name
    root: Path  # the run root
    total: int = 0  # keys in the task
    done_before: int = 0  # keys already done when the run started
    ran: int = 0  # executions started by this run (retries count again)
    succeeded: int = 0  # keys this run published
    by_peers: int = 0  # keys found published by another worker after we claimed them
    failed: list[str] = field(default_factory=list)  # keys that reached --max-attempts
    left: int = 0  # keys not done at the end (--limit, or held by others)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


ProgressFn = Callable[[Snapshot], None]


class ChunkSizer:
    """Chunk size from the measured time per task: big for tiny tasks, 1 for slow ones."""

    def __init__(self, workers: int, fixed: int | None) -> None:
        self.workers = workers
        self.fixed = fixed
        self.per_task: float | None = None

    def observe(self, seconds: list[float]) -> None:
        if not seconds:
            return
        mean = sum(seconds) / len(seconds)
        self.per_task = mean if self.per_task is None else (
            EMA_ALPHA * mean + (1 - EMA_ALPHA) * self.per_task)

    def size(self, remaining: int) -> int:
        if self.fixed:
            return self.fixed
        if self.per_task is None:
            return 1  # probe: measure before committing many keys to one worker
        ideal = TARGET_CHUNK_S / max(self.per_task, 1e-6)
        balance = math.ceil(remaining / (self.workers * BALANCE_CHUNKS_PER_WORKER))
        return max(1, min(int(ideal), balance, MAX_CHUNK))


class _Heartbeat:
    """Touches this owner's file and its ageing claims until stopped."""

    def __init__(self, owner_file: Path, claims: Claims, interval_s: float) -> None:
        self.owner_file = owner_file
        self.claims = claims
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spotfan-heartbeat", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                os.utime(self.owner_file)
                self.claims.refresh()
            except OSError as e:  # a flaky mount must not kill the run; claims may expire
                logger.warning("heartbeat failed: %s", e)


def run(task: Task, *, root: str | Path = ".", workers: int | None = None,
        executor: Literal["process", "thread"] = "process",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS, lease_s: float = DEFAULT_LEASE_S,
        limit: int | None = None, retry_failed: bool = False, fsync: bool = False,
        chunk_size: int | None = None, start_method: str = "forkserver",
        progress: ProgressFn | None = None, seed: int | None = None) -> RunReport:
    """Run every key of `task` under `root` whose output does not exist yet.

    Returns a report; keys that fail are recorded and retried up to `max_attempts`
    times, and never stop the others. Raises SpecError before any work if the task or
    the options are wrong.
    """
    started = time.monotonic()
    root = Path(root).resolve()
    workers = _check_options(root, workers, executor, max_attempts, lease_s, limit, chunk_size,
                             start_method)
    if executor == "process":
        task.check_importable()
    items = task.items(root)
    layout = Layout(root, task.name)
    layout.ensure()
    report = RunReport(task.name, root, total=len(items))

    peers = _Peers(layout, lease_s)  # who else is here, taken before we list the outputs
    done = scan_done(root, items)
    report.done_before = len(done)
    store = FailureStore(layout.failed, layout.tmp)
    failures = store.load()
    attempts = {k: (0 if retry_failed else f.attempts) for k, f in failures.items()}
    gave_up = {k for k, f in failures.items() if f.gave_up and not retry_failed and k not in done}
    report.failed = sorted(gave_up)
    _sweep(layout, items, done, lease_s)
    pending = [it for it in items if it.key not in done and it.key not in gave_up]
    random.Random(seed).shuffle(pending)  # many workers on one list spread out
    logger.info("%s: %d keys, %d done, %d failed earlier, %d to run", task.name, len(items),
                len(done), len(gave_up), len(pending))
    if not pending:
        report.seconds = time.monotonic() - started
        return report

    owner = new_owner_id()
    peers.me = owner
    plan = ClaimPlan.load_or_create(layout.task_dir, len(items))
    claims = Claims(layout.claims, lease_s=lease_s, pipelined=network_filesystem(root))
    tmp_dir = layout.owner_tmp(owner)
    tmp_dir.mkdir(parents=True)
    owner_file = layout.owner_file(owner)
    stamp = Stamp.mine()
    owner_file.write_text(json.dumps({"owner": owner, "host": stamp.host, "pid": stamp.pid,
                                      "pid_started": stamp.started, "task": task.name,
                                      "workers": workers, "lease_s": lease_s,
                                      "started": time.time()}), encoding="utf-8")
    log = ExecLog(layout.log / f"{owner}.jsonl", owner)
    state = _Dispatch(task, root, items, done, pending, attempts, report, plan, claims, store,
                      log, owner, tmp_dir, peers, workers=workers, executor=executor,
                      max_attempts=max_attempts, limit=limit, fsync=fsync,
                      sizer=ChunkSizer(workers, chunk_size), start_method=start_method,
                      progress=progress, started=started)
    old_term = _raise_on_sigterm()
    interrupted = True
    try:
        with _Heartbeat(owner_file, claims, min(lease_s * 0.25, HEARTBEAT_MAX_S)):
            state.loop()
        interrupted = False
    finally:
        state.shutdown(kill=interrupted)
        claims.release_all()
        log.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
        owner_file.unlink(missing_ok=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    _sweep(layout, items, state.done, lease_s)
    report.left = len(items) - len(state.done) - len(report.failed)
    report.seconds = time.monotonic() - started
    return report


class _Dispatch:
    """The loop of one run: claim units, send their keys to the pool in chunks, collect
    outcomes, release a unit once every key of it is done or given up."""

    def __init__(self, task: Task, root: Path, items: list[Item], done: set[str],
                 pending: list[Item], attempts: dict[str, int], report: RunReport,
                 plan: ClaimPlan, claims: Claims, store: FailureStore, log: ExecLog,
                 owner: str, tmp_dir: Path, peers: "_Peers", *, workers: int, executor: str, max_attempts: int,
                 limit: int | None, fsync: bool, sizer: ChunkSizer, start_method: str,
                 progress: ProgressFn | None, started: float) -> None:
        self.task, self.root, self.items, self.done = task, root, items, done
        self.root_s = str(root)
        self.plan = plan
        self.unit_of = {it.key: plan.unit(it.key) for it in items}
        self.units: dict[str, list[Item]] = {}  # unclaimed units and their pending keys
        for it in pending:
            self.units.setdefault(self.unit_of[it.key], []).append(it)
        self.peers = peers
        self.unit_queue: deque[str] = deque(self.units)  # in the shuffled order of pending
        self.unclaimed = len(pending)  # keys in self.units
        self._by_unit: dict[str, list[Item]] | None = None  # every item by unit, built lazily
        self.ready: deque[Item] = deque()  # keys of units we hold, not yet dispatched
        self.outstanding: dict[str, int] = {}  # held unit -> its keys not yet settled
        self.isolate: deque[Item] = deque()  # run alone: their chunk killed a worker
        self.busy: list[str] = []  # units held by live peers; looked at again at the end
        self.attempts, self.report, self.claims = attempts, report, claims
        self.store, self.log, self.owner, self.tmp_dir = store, log, owner, tmp_dir
        self.workers, self.executor, self.max_attempts = workers, executor, max_attempts
        self.limit, self.fsync, self.sizer = limit, fsync, sizer
        self.start_method, self.progress, self.started = start_method, progress, started
        self.inflight: dict[Future[list[worker.Outcome]], list[Item]] = {}
        self.pool: Executor | None = None
        self.dead_pools: list[Executor | None] = []  # see _rebuild
        self.suspect: Future[list[worker.Outcome]] | None = None  # a key run alone after a crash
        self.dispatched = 0
        self.rebuilds = 0
        self.startup_failures = 0
        self.finished_since_start = False
        self.recent: deque[tuple[float, int]] = deque()
        self.last_progress = 0.0

    # -- pool --------------------------------------------------------------------------
    def _new_pool(self) -> Executor:
        ref = self.task.ref()
        if self.executor == "thread":
            worker.init_worker(ref, self.root_s, str(self.tmp_dir), self.fsync, chdir=False)
            return ThreadPoolExecutor(self.workers, thread_name_prefix="spotfan-task")
        ctx = multiprocessing.get_context(self.start_method)
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=worker.init_worker,
                                   initargs=(ref, self.root_s, str(self.tmp_dir), self.fsync, True))

    def shutdown(self, *, kill: bool = False) -> None:
        if self.pool is None:
            return
        if kill and isinstance(self.pool, ProcessPoolExecutor):
            _kill_workers(self.pool)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = None

    # -- loop --------------------------------------------------------------------------
    def loop(self) -> None:
        self.pool = self._new_pool()
        while True:
            self._fill()
            if not self.inflight:
                if self._limit_reached() or not (self.unit_queue or self.ready or self.isolate
                                                 or self.busy):
                    break
                if not (self.unit_queue or self.ready or self.isolate):
                    self._wait_for_peers()
                continue
            finished, _ = wait(list(self.inflight), timeout=PROGRESS_INTERVAL_S,
                               return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                chunk = self.inflight.pop(fut)
                try:
                    outcomes = fut.result()
                except BrokenProcessPool:
                    broken = True
                    if fut is self.suspect:
                        self._worker_died(chunk[0])  # it ran alone: it is the culprit
                    else:
                        self.isolate.extend(chunk)  # innocent until run alone
                    continue
                self._collect(chunk, outcomes)
            if broken:
                self._rebuild()
            self._report_progress()
        self._report_progress(force=True)

    def _max_inflight(self) -> int:
        # A queued chunk per worker hides IPC latency for quick tasks; for slow ones it
        # would only hold claims that an idle peer could be running.
        slow = self.sizer.per_task is not None and self.sizer.per_task >= PREFETCH_BELOW_S
        return self.workers * (1 if slow else CHUNKS_PER_WORKER)

    def _limit_reached(self) -> bool:
        return self.limit is not None and self.dispatched >= self.limit

    def _fill(self) -> None:
        while len(self.inflight) < self._max_inflight() and not self._limit_reached():
            if self.isolate:
                # One suspect at a time, alone in the pool: if the pool breaks now, we know
                # which key did it and no innocent key is charged an attempt.
                if self.inflight:
                    return
                batch, suspect = [self.isolate.popleft()], True
            else:
                n = self.sizer.size(len(self.ready) + self.unclaimed)
                if self.limit is not None:
                    n = min(n, self.limit - self.dispatched)
                self._claim_until(n)
                if not self.ready:
                    return
                batch = [self.ready.popleft() for _ in range(min(n, len(self.ready)))]
                suspect = False
            self.dispatched += len(batch)
            self.report.ran += len(batch)
            assert self.pool is not None
            try:
                fut = self.pool.submit(worker.run_chunk, batch)
            except BrokenProcessPool:  # a worker died since we last looked
                self.isolate.extendleft(reversed(batch))
                self._rebuild()
                continue
            except OSError as e:
                # Starting a replacement worker failed (seen on CPython 3.11 right after a
                # rebuild: EBADF handing fds to the forkserver). Nothing ran: start over
                # with a fresh pool; the rebuild bound still applies.
                logger.warning("could not start a worker process (%s); rebuilding the pool", e)
                (self.isolate if suspect else self.ready).extendleft(reversed(batch))
                self.dispatched -= len(batch)
                self.report.ran -= len(batch)
                self._rebuild()
                continue
            self.inflight[fut] = batch
            self.suspect = fut if suspect else None

    def _claim_until(self, n: int) -> None:
        """Claim units until `n` keys are ready to run (or no unit is left)."""
        while len(self.ready) < n and self.unit_queue:
            per_unit = max(1.0, self.unclaimed / max(1, len(self.units)))
            want = max(1, math.ceil((n - len(self.ready)) / per_unit))
            units = [self.unit_queue.popleft() for _ in range(min(want, len(self.unit_queue)))]
            won, busy = self.claims.acquire(units)
            self.busy.extend(busy)
            for u in busy:
                self.unclaimed -= len(self.units.pop(u, ()))
            keys = [it for u in won for it in self.units.pop(u)]
            self.unclaimed -= len(keys)
            # A peer may have finished some of these since we listed the output folders;
            # look again, key by key, unless no peer can have worked since then.
            taken_over = any(self.claims.generation(u) > 0 for u in won)
            if keys and (taken_over or not self.peers.solo()):
                exists = self.claims.map(
                    lambda it: os.path.lexists(os.path.join(self.root_s, it.out)), keys)
            else:
                exists = [False] * len(keys)
            by_unit: dict[str, int] = {u: 0 for u in won}
            for it, there in zip(keys, exists):
                if there:
                    self.done.add(it.key)
                    self.report.by_peers += 1
                else:
                    self.ready.append(it)
                    by_unit[self.unit_of[it.key]] += 1
            for u, count in by_unit.items():
                self.outstanding[u] = self.outstanding.get(u, 0) + count
            self._release_settled(list(by_unit))

    def _settle(self, keys: list[str]) -> None:
        """These keys are done or given up: release units with nothing left."""
        units = []
        for k in keys:
            u = self.unit_of[k]
            self.outstanding[u] -= 1
            units.append(u)
        self._release_settled(units)

    def _release_settled(self, units: list[str]) -> None:
        free = [u for u in dict.fromkeys(units) if self.outstanding.get(u, 1) <= 0]
        for u in free:
            del self.outstanding[u]
        if free:
            self.claims.release(free)

    def _collect(self, chunk: list[Item], outcomes: list[worker.Outcome]) -> None:
        self.finished_since_start = True
        self.startup_failures = 0
        by_key = {it.key: it for it in chunk}
        ok = [o for o in outcomes if o.ok]
        for o in ok:
            self.done.add(o.key)
        self.report.succeeded += sum(1 for o in ok if not o.duplicate)
        self.report.by_peers += sum(1 for o in ok if o.duplicate)
        if self.attempts:
            self.store.clear(o.key for o in ok if o.key in self.attempts)
        # Log before releasing: a peer that later claims these units sees our log file
        # and so knows that someone worked here since it listed the outputs (_Peers).
        self.log.write({"key": o.key, "start": round(o.started, 4), "seconds": round(o.seconds, 6),
                        "ok": o.ok, "dup": o.duplicate} for o in outcomes)
        settled = [o.key for o in ok]
        for o in outcomes:
            if not o.ok and self._failed(by_key[o.key], o.error, o.detail):
                settled.append(o.key)
        self._settle(settled)
        self.sizer.observe([o.seconds for o in outcomes])
        self.recent.append((time.monotonic(), len(ok)))

    def _failed(self, item: Item, error: str, detail: str) -> bool:
        """Record a failure; True if the key is given up (settled), False if retried."""
        n = self.attempts.get(item.key, 0) + 1
        self.attempts[item.key] = n
        gave_up = n >= self.max_attempts
        self.store.record(Failure(item.key, n, gave_up, error, detail, socket.gethostname(),
                                  self.owner, time.time()))
        logger.warning("key %r failed (attempt %d of %d): %s", item.key, n, self.max_attempts, error)
        if gave_up:
            self.report.failed.append(item.key)
        else:
            self.ready.append(item)  # retry later, after the others; its unit stays held
        return gave_up

    def _worker_died(self, item: Item) -> None:
        """The worker running `item` alone died (killed, out of memory, crashed in C code)."""
        if self._failed(item, "worker process died (killed by a signal or out of memory)",
                        "the process running this key exited abruptly; check memory use "
                        "and native crashes (dmesg)"):
            self._settle([item.key])

    def _rebuild(self) -> None:
        for fut, chunk in list(self.inflight.items()):
            fut.cancel()
            if fut is self.suspect and fut.done() and isinstance(fut.exception(), BrokenProcessPool):
                self._worker_died(chunk[0])
            else:
                self.isolate.extend(chunk)  # innocent until run alone
        self.inflight.clear()
        self.suspect = None
        if not self.finished_since_start:
            self.startup_failures += 1
            if self.startup_failures >= MAX_STARTUP_FAILURES:
                raise TaskError("worker processes die before finishing any work: the task's "
                                "module or its init= function fails in a fresh process (see the "
                                "error printed above); try --executor thread to see it directly")
        self.rebuilds += 1
        if self.rebuilds > MAX_POOL_REBUILDS:
            raise TaskError(f"worker processes died {self.rebuilds} times; giving up. Check "
                            "memory use (a task may be killed for running out of memory)")
        logger.warning("a worker process died; rebuilding the pool and re-running its keys")
        # Keep the dead pool referenced: on CPython 3.11 a broken ProcessPoolExecutor's
        # pipes can be closed twice, the second time by the garbage collector, by which
        # time the fd number may belong to the new pool (seen here as EBADF on spawn).
        self.dead_pools.append(self.pool)
        self.shutdown(kill=True)
        self.finished_since_start = False
        self.pool = self._new_pool()

    def _wait_for_peers(self) -> None:
        """Nothing left for us but units live peers hold: wait until they finish them, or
        their claims expire and we take the units over."""
        keys = [it for u in self.busy for it in self._unit_items(u)]
        logger.info("waiting for %d key(s) held by other workers", len(keys))
        self._report_progress()
        time.sleep(TAIL_POLL_S)
        now_done = scan_done(self.root, keys)
        self.done |= now_done
        failures = self.store.load(it.key for it in keys if it.key not in now_done)
        for u in self.busy:
            left = []
            for it in self._unit_items(u):
                f = failures.get(it.key)
                if it.key in now_done:
                    continue
                if f is not None and f.gave_up:
                    if it.key not in self.report.failed:
                        self.report.failed.append(it.key)
                    continue
                if f is not None:
                    self.attempts[it.key] = max(self.attempts.get(it.key, 0), f.attempts)
                left.append(it)
            if left:
                self.units[u] = left
                self.unclaimed += len(left)
                self.unit_queue.append(u)
        self.busy = []

    def _unit_items(self, unit: str) -> list[Item]:
        if self._by_unit is None:
            self._by_unit = {}
            for it in self.items:
                self._by_unit.setdefault(self.unit_of[it.key], []).append(it)
        return [it for it in self._by_unit.get(unit, []) if it.key not in self.done]

    def _report_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last_progress < PROGRESS_INTERVAL_S):
            return
        self.last_progress = now
        while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
            self.recent.popleft()
        window = min(RATE_WINDOW_S, now - self.started)
        rate = sum(n for _, n in self.recent) / window if window > 0 else 0.0
        self.progress(Snapshot(self.task.name, len(self.items), len(self.done),
                               len(self.report.failed), sum(len(c) for c in self.inflight.values()),
                               rate, now - self.started))


class _Peers:
    """Has any other `run` worked on this task since we listed its outputs?

    While the answer is no, a freshly won claim needs no per-key existence check (over
    SSHFS each is a round trip). Any peer that published a key either is alive (its
    owner file is fresh) or wrote its execution log before releasing the claim; a peer
    that died holding the claim is caught because we then win a later generation.
    """

    def __init__(self, layout: Layout, lease_s: float) -> None:
        self.layout = layout
        # Every owner touches its file at least every HEARTBEAT_MAX_S, whatever its lease:
        # one untouched for twice that (or our lease, if longer) has stopped.
        self.fresh_s = max(lease_s, 2 * HEARTBEAT_MAX_S)
        self.me = ""  # our owner id, once we have one
        self.logs_at_start = self._logs()
        self.alone = True
        self.solo()  # a peer alive now may publish after our listing

    def _logs(self) -> set[str]:
        try:
            return set(os.listdir(self.layout.log))
        except FileNotFoundError:
            return set()

    def solo(self) -> bool:
        if not self.alone:
            return False  # once a peer was seen, always check
        now = time.time()
        try:
            for entry in os.scandir(self.layout.owners):
                if entry.name == f"{self.me}.json":
                    continue
                try:
                    if now - entry.stat().st_mtime < self.fresh_s:
                        self.alone = False
                        return False
                except FileNotFoundError:
                    continue
        except FileNotFoundError:
            pass
        if self._logs() - self.logs_at_start - {f"{self.me}.jsonl"}:
            self.alone = False
        return self.alone


def _sweep(layout: Layout, items: list[Item], done: set[str], lease_s: float) -> None:
    """Remove what dead owners left: their temporaries, their stale owner files, and
    stale claims on keys that are done."""
    now = time.time()
    try:
        owners = {p.name for p in os.scandir(layout.tmp) if p.is_dir()}
    except FileNotFoundError:
        owners = set()
    for name in owners:
        f = layout.owner_file(name)
        gone_here = False
        try:
            alive = now - f.stat().st_mtime < lease_s
            data = json.loads(f.read_text(encoding="utf-8"))
            gone_here = Stamp(data["host"], int(data["pid"]), float(data["pid_started"])).gone()
        except FileNotFoundError:
            alive = False
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an owner file being written, or of another version: judge by age
        if gone_here or not alive:
            try:
                if gone_here or now - (layout.tmp / name).stat().st_mtime > lease_s:
                    shutil.rmtree(layout.tmp / name, ignore_errors=True)
                    f.unlink(missing_ok=True)
                    logger.info("swept temporaries of dead worker %s", name)
            except FileNotFoundError:
                pass
    if done:
        plan = ClaimPlan.load_or_create(layout.task_dir, len(items))
        open_units = {plan.unit(it.key) for it in items if it.key not in done}
        done_units = {plan.unit(it.key) for it in items} - open_units
        removed = sweep_claims(layout.claims, done_units, lease_s=lease_s)
        if removed:
            logger.info("swept %d stale claims on finished keys", removed)


def _check_options(root: Path, workers: int | None, executor: str, max_attempts: int,
                   lease_s: float, limit: int | None, chunk_size: int | None,
                   start_method: str) -> int:
    """Refuse options out of their bounds (tasks.bounds: nan, inf, negative, huge); return
    how many workers to start."""
    if not root.is_dir():
        raise SpecError(f"run root {root} is not a directory; pass --root DIR (on a cluster, "
                        "the shared mount point)")
    if executor not in ("process", "thread"):
        raise SpecError(f"--executor must be process or thread, got {executor!r}")
    check_count("--max-attempts", max_attempts, 1, MAX_ATTEMPTS_LIMIT)
    check_seconds("--lease", lease_s, MIN_LEASE_S, MAX_LEASE_S)
    if limit is not None:
        check_count("--limit", limit, 1, MAX_LIMIT)
    if chunk_size is not None:
        check_count("--chunk-size", chunk_size, 1, MAX_CHUNK_SIZE)
    if start_method not in START_METHODS:
        raise SpecError(f"--start-method must be one of {', '.join(START_METHODS)}")
    return worker_count(workers)


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's worker processes and what they started, by pid. Never the forkserver
    or the resource tracker: multiprocessing needs those for the next pool."""
    # ProcessPoolExecutor has no public way to name its processes; _processes has held
    # {pid: Process} since Python 3.2.
    pids = list(getattr(pool, "_processes", None) or {})
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.extend(p.children(recursive=True))
            procs.append(p)
        except psutil.Error:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def _raise_on_sigterm():  # type: ignore[no-untyped-def]
    """Turn SIGTERM into KeyboardInterrupt so claims are released and temporaries removed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)
