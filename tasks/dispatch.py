"""The dispatch loop of one run: claim units, send their keys to the pool in chunks,
collect outcomes, mark a unit done once every key of it is settled.

What is done or held is learned from listings (`UnitView`), refreshed as the run goes,
never from per-key round trips: a unit some peer finished since this run listed the
outputs is skipped, a unit a peer holds is left for the end.
"""
from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import fetch
from tasks.chunks import ChunkSizer
from tasks.claims import ClaimBook
from tasks.direct import Direct, settle
from tasks.errors import EnvironmentFault, TaskError
from tasks.items import Item
from tasks.pool import Pool
from tasks.progress import Snapshot
from tasks.publish import Fence
from tasks.records import ExecLog, Failure, FailureStore
from tasks.units import UnitRing, UnitView
from tasks.runreport import DispatchOptions, RunReport
from tasks.worker import Chunk, Outcome

if TYPE_CHECKING:
    from tasks.store.records import BucketFailures, BucketLog

logger = logging.getLogger(__name__)

CHUNKS_PER_WORKER = 2  # chunks in flight per worker: one running, one queued
PREFETCH_BELOW_S = 1.0  # queue a second chunk per worker only for tasks quicker than this
MAX_UNITS_PER_CLAIM = 8  # units claimed per look at the listings (a fresh look, each batch)
POLL_S = 1.0  # the loop looks at the pool, timeouts, progress at least this often
# How often to look again at units that live peers hold: soon at first (the peers' last
# chunks are usually nearly done: every runner of a fleet ends within a fraction of a
# second of the last key), then less often (a long wait costs the head little).
TAIL_POLL_MIN_S = 0.02
TAIL_POLL_MAX_S = 2.0
TAIL_POLL_GROWTH = 1.5
TAKEOVER_EVERY_S = 2.0  # ... but try to take the peers' units over (expired claims) only this often
MAX_STARTUP_FAILURES = 3  # pools that die before finishing any chunk before we give up
MAX_POOL_REBUILDS = 1000  # bound on rebuilding the pool after worker deaths
RATE_WINDOW_S = 60.0  # the rate shown is measured over this window


class Dispatch:
    """The loop of one run (see the module docstring)."""

    def __init__(self, *, root: Path, pending: list[Item], unit_of: dict[str, str], done: set[str],
                 attempts: dict[str, int], report: RunReport, claims: ClaimBook, view: UnitView,
                 pool: Pool, store: FailureStore | BucketFailures, log: ExecLog | BucketLog, owner: str,
                 opts: DispatchOptions, started: float, rng: random.Random,
                 direct: Direct | None = None,
                 exists: Callable[[Item], bool] | None = None) -> None:
        self.root = root
        # Whether one key's output is published (a lstat on a folder, a HEAD on a bucket):
        # only for keys a dead owner or a broken pool may have finished.
        self.exists = exists or (lambda it: os.path.lexists(self.root / it.out))
        self.direct = direct  # publishes staged outputs (tasks.direct), or None
        self.unit_of, self.done, self.attempts, self.report = unit_of, done, attempts, report
        self.claims, self.view, self.pool, self.store, self.log = claims, view, pool, store, log
        self.owner, self.opts, self.started = owner, opts, started
        self.open: dict[str, list[Item]] = {}  # unclaimed units and their pending keys
        for it in pending:
            self.open.setdefault(unit_of[it.key], []).append(it)
        self.open_keys = len(pending)  # keys in self.open
        self.order = UnitRing(self.open, rng)  # units to claim, walked in the shared order
        self.deferred: set[str] = set()  # units live peers hold: looked at again at the end
        self.held: dict[str, dict[str, Item]] = {}  # our units -> their unsettled keys
        self.settled_units: list[str] = []  # emptied units, not released yet
        self.ready: deque[Item] = deque()  # keys of units we hold, not yet dispatched
        self.isolate: deque[Item] = deque()  # run alone: their chunk killed a worker
        self.peer_settled: set[str] = set()  # keys of units a peer marked done
        self.inflight: dict[Future[list[Outcome]], Chunk] = {}
        self.suspect: Future[list[Outcome]] | None = None  # a key run alone after a crash
        self.sizer = ChunkSizer(opts.workers, opts.chunk_size)
        self.chunk_ids = 0
        self.dispatched = self.rebuilds = self.startup_failures = 0
        self.finished_since_start = False
        self.recent: deque[tuple[float, int]] = deque()
        self.last_progress = 0.0
        self.waiting_since: float | None = None  # monotonic start of the current tail wait
        self.tail_polls = 0  # looks at the peers' units since the last progress
        self.last_takeover = 0.0  # monotonic time of the last try to take them over

    # -- loop --------------------------------------------------------------------------
    def loop(self) -> None:
        self.pool.start()
        while True:
            self._drop_lost()
            self._fill()
            if not self.inflight:
                if self._limit_reached() or not (self.order or self.ready or self.isolate
                                                 or self.deferred):
                    break
                if not (self.order or self.ready or self.isolate):
                    if not self._wait_for_peers():
                        break
                continue
            finished, _ = wait(list(self.inflight), timeout=POLL_S, return_when=FIRST_COMPLETED)
            self.pool.stop_overdue()
            broken = False
            for fut in finished:
                chunk = self.inflight.pop(fut)
                try:
                    outcomes = fut.result()
                except BrokenProcessPool:
                    broken = True
                    self.inflight[fut] = chunk  # settled with the others in _broken
                    continue
                fetch.retire(self.opts.fetch_into, chunk)
                self._collect(chunk, outcomes)
            if broken:
                self._broken()
            self._report(phase="working")
        self._report(phase="finished", force=True)

    def _limit_reached(self) -> bool:
        return self.opts.limit is not None and self.dispatched >= self.opts.limit

    def _max_inflight(self) -> int:
        # A queued chunk per worker hides IPC latency for quick tasks; for slow ones it
        # would only hold claims that an idle peer could be running.
        slow = self.sizer.per_task is not None and self.sizer.per_task >= PREFETCH_BELOW_S
        return self.opts.workers * (1 if slow else CHUNKS_PER_WORKER)

    def _fill(self) -> None:
        while len(self.inflight) < self._max_inflight() and not self._limit_reached():
            suspect = bool(self.isolate)
            if suspect:
                # One suspect at a time, alone in the pool: if the pool breaks now, we know
                # whose fault it was.
                if self.inflight:
                    return
                batch = [self.isolate.popleft()]
            else:
                held = sum(len(self.open[u]) for u in self.view.held if u in self.open)
                n = self.sizer.size(len(self.ready), self.open_keys - held,
                                    self.view.owners * self.opts.workers)
                if self.opts.limit is not None:
                    n = min(n, self.opts.limit - self.dispatched)
                if len(self.ready) < n:
                    self._claim(n - len(self.ready))
                batch = []
                while self.ready and len(batch) < n:
                    it = self.ready.popleft()
                    if self.unit_of[it.key] in self.held:  # not lost meanwhile
                        batch.append(it)
                if not batch:
                    return
            self.chunk_ids += 1
            chunk = Chunk(self.chunk_ids, batch, [self._fence(it) for it in batch],
                          fetch.for_chunk(self.direct, self.opts.fetch_into, self.chunk_ids, batch))
            self.dispatched += len(batch)
            self.report.ran += len(batch)
            try:
                fut = self.pool.submit(chunk)
            except (BrokenProcessPool, OSError) as e:
                # A worker spawn failed after a rebuild (e.g. EBADF on CPython 3.11): put
                # the batch back and start over; the rebuild bound still applies.
                logger.warning("could not start a worker process (%s); rebuilding the pool", e)
                (self.isolate if suspect else self.ready).extendleft(reversed(batch))
                self.dispatched -= len(batch)
                self.report.ran -= len(batch)
                self._rebuild()
                continue
            self.inflight[fut] = chunk
            self.suspect = fut if suspect else None

    def _fence(self, item: Item) -> Fence:
        unit = self.unit_of[item.key]
        return Fence(str(self.claims.dir), unit, self.claims.generation(unit))

    # -- claims ------------------------------------------------------------------------
    def _claim(self, n: int) -> None:
        """Claim units until `n` more keys are ready (or no unit is left to try)."""
        got = 0
        while got < n and self.order:
            self.view.refresh()  # fresh before each batch: a stale view claims finished units
            self._settle_finished_units(self.view.take_new())
            per_unit = max(1.0, self.open_keys / max(1, len(self.open)))
            want = min(MAX_UNITS_PER_CLAIM, max(1, math.ceil((n - got) / per_unit)))
            units, held = self.order.take(want, self.view.held)
            self.deferred.update(held)
            got += self._take(units)

    def _take(self, units: list[str]) -> int:
        """Try to claim `units`; returns how many keys became ready."""
        if not units:
            return 0
        won, busy = self.claims.acquire(units)
        self.deferred.update(busy)
        check: list[Item] = []
        finished_by_peer = []
        for w in won:
            keys = self.open.pop(w.unit)
            self.open_keys -= len(keys)
            self.deferred.discard(w.unit)
            if w.marked_done and w.unit not in self.view.markers_before:
                finished_by_peer.append(w.unit)  # a peer finished it since our listing
                logger.info("unit %s: finished by a peer after our look at done/ (%.2fs ago)",
                            w.unit, time.monotonic() - self.view.at)
                self.report.by_peers += len(keys)
                self.peer_settled.update(it.key for it in keys)
                continue
            self.held[w.unit] = {it.key: it for it in keys}
            if w.generation > 0 or w.unit in self.view.markers_before:
                check.extend(keys)  # a dead owner (or an earlier run) may have published some
            else:
                self.ready.extend(keys)
        if finished_by_peer:
            self.claims.release(finished_by_peer, done=False)
            self.view.refresh(force=True)
            self.order.jump(self.view.held)
        if check:
            there = self.claims.map(self.exists, check)
            for it, exists in zip(check, there):
                if exists:
                    self.report.by_peers += 1
                    self._settle(it.key, done=True)
                else:
                    self.ready.append(it)
            self._release_settled()
        return sum(len(self.held.get(w.unit, ())) for w in won)

    def _settle_finished_units(self, units: Iterable[str]) -> None:
        for u in [u for u in units if u in self.open]:
            keys = self.open.pop(u)
            self.open_keys -= len(keys)
            self.order.discard(u)
            self.deferred.discard(u)
            self.peer_settled.update(it.key for it in keys)

    def _settle(self, key: str, *, done: bool) -> None:
        """A key of a unit we hold is done or given up; once its unit is empty, the unit is
        released with the others settled in the same step (`_release_settled`)."""
        if done:
            self.done.add(key)
        unit = self.unit_of[key]
        keys = self.held.get(unit)
        if keys is None:
            return
        keys.pop(key, None)
        if not keys:
            del self.held[unit]
            self.settled_units.append(unit)

    def _release_settled(self) -> None:
        """Release the units emptied since the last call, all at once: their done markers
        and claim removals go out concurrently (one round trip's wait, not one per unit)."""
        if self.settled_units:
            units, self.settled_units = self.settled_units, []
            self.claims.release(units, done=True)

    def _drop_lost(self) -> None:
        """Units whose claim expired while we held them (we were frozen): a peer may run
        them now. Their keys go back to be looked at like any unit a peer holds."""
        for unit in self.claims.take_lost():
            keys = self.held.pop(unit, None)
            if keys:
                self.open[unit] = list(keys.values())
                self.open_keys += len(keys)
                self.deferred.add(unit)

    # -- outcomes ----------------------------------------------------------------------
    def _collect(self, chunk: Chunk, outcomes: list[Outcome]) -> None:
        if self.direct is not None:
            outcomes = settle(self.direct, outcomes, chunk.items, chunk.fences, self._mine)
        self.finished_since_start = True
        self.startup_failures = 0
        self.waiting_since = None
        by_key = {it.key: it for it in chunk.items}
        env = ""
        for o in outcomes:
            mine = self._mine(o.key)
            if o.ok:
                if o.published == "ours":
                    self.report.succeeded += 1
                else:
                    self.report.by_peers += 1
                    logger.info("key %r: a peer published it first", o.key)
                if o.key in self.attempts:
                    self.store.clear([o.key])
                self._settle(o.key, done=True)
            elif not mine or o.published == "fenced":
                self._drop(o.key)  # our claim was taken over: the key is the new owner's
            elif o.env:
                env = env or o.env
                self.ready.appendleft(by_key[o.key])  # not charged; the run stops below
            else:
                self._failed(by_key[o.key], o.error, o.detail)
        # Log before releasing: a reader of the logs can count every execution.
        self.log.write({"key": o.key, "start": round(o.started, 4), "seconds": round(o.seconds, 6),
                        "ok": o.ok, "dup": o.published == "theirs"} for o in outcomes)
        self._release_settled()
        if env:
            raise EnvironmentFault(env)
        self.sizer.observe([o.seconds for o in outcomes])
        self.recent.append((time.monotonic(), sum(1 for o in outcomes if o.ok)))

    def _mine(self, key: str) -> bool:
        unit = self.unit_of[key]
        return unit in self.held and self.claims.held(unit)

    def _drop(self, key: str) -> None:
        keys = self.held.get(self.unit_of[key])
        if keys is not None:
            keys.pop(key, None)

    def _failed(self, item: Item, error: str, detail: str) -> None:
        """Record a failure: the key is retried later or, at --max-attempts, given up."""
        n = self.attempts.get(item.key, 0) + 1
        self.attempts[item.key] = n
        gave_up = n >= self.opts.max_attempts
        self.store.record(Failure(item.key, n, gave_up, error, detail, socket.gethostname(),
                                  self.owner, time.time(), self.opts.max_attempts))
        logger.warning("key %r failed (attempt %d of %d): %s", item.key, n,
                       self.opts.max_attempts, error)
        if gave_up:
            self.report.failed.append(item.key)
            self._settle(item.key, done=False)
        else:
            self.ready.append(item)  # retry later, after the others; its unit stays held

    def _broken(self) -> None:
        """A worker died: charge the key whose timeout killed it, or find the culprit by
        running the suspects alone; every other key goes back (if it was not published)."""
        killed = self.pool.take_killed()
        by_id = {c.id: c for c in self.inflight.values()}
        culprits = {}
        for k in killed:
            chunk = by_id.get(k.chunk_id)
            if chunk is not None and k.index < len(chunk.items):
                culprits[chunk.items[k.index].key] = k.seconds
        back: list[Item] = []
        for fut, chunk in self.inflight.items():
            fut.cancel()
            fetch.retire(self.opts.fetch_into, chunk)
            for it in chunk.items:
                if it.key in culprits:
                    self._failed(it, f"timed out after {self.opts.timeout_s:g} s",
                                 f"the key ran {culprits[it.key]:.1f} s, past --timeout "
                                 f"{self.opts.timeout_s:g} s; its worker process was killed")
                elif fut is self.suspect and not killed:
                    self._failed(it, "worker process died (killed by a signal or out of memory)",
                                 "the process running this key exited abruptly; check memory "
                                 "use and native crashes (dmesg)")
                else:
                    back.append(it)
        self.inflight.clear()
        self.suspect = None
        back = [it for it in back if self.unit_of[it.key] in self.held]
        there = self.claims.map(self.exists, back)
        for it, exists in zip(back, there):
            if exists:  # published by our worker before it was killed
                self.report.succeeded += 1
                self._settle(it.key, done=True)
            elif killed:
                self.ready.appendleft(it)  # the culprit is known: the rest are innocent
            else:
                self.isolate.append(it)  # innocent until run alone
        self._release_settled()
        self._rebuild(timeout=bool(killed))

    def _rebuild(self, *, timeout: bool = False) -> None:
        if not self.finished_since_start and not timeout:
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
        self.pool.rebuild()
        self.finished_since_start = False

    # -- the tail ----------------------------------------------------------------------
    def _wait_for_peers(self) -> bool:
        """Nothing left for us but units live peers hold: look again until they finish
        them or their claims expire (then we take them over). False once the wait has
        seen no progress for twice the lease plus the timeout (a dead peer's claims have
        expired by then): the keys stay with their live peers."""
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = self.last_takeover = now
            logger.info("waiting for %d unit(s) held by other runners", len(self.deferred))
        self._report(phase="waiting", force=True)
        bound = 2 * self.opts.lease_s + (self.opts.timeout_s or 0.0)
        if now - self.waiting_since > bound:
            logger.warning("%d key(s) are still held by live runners after %.0fs without "
                           "progress; leaving them to those runners",
                           sum(len(self.open.get(u, ())) for u in self.deferred), bound)
            return False
        time.sleep(min(TAIL_POLL_MAX_S, TAIL_POLL_MIN_S * TAIL_POLL_GROWTH ** self.tail_polls))
        self.tail_polls += 1
        self.view.refresh(force=True)
        before = len(self.deferred)
        self._settle_finished_units(self.view.finished & self.deferred)
        free = [u for u in self.deferred if u in self.open and u not in self.view.held]
        for u in free:
            self.order.add(u)  # released without finishing (--limit, interrupted)
        self.deferred.difference_update(free)
        taken = 0
        if time.monotonic() - self.last_takeover >= TAKEOVER_EVERY_S:
            # A claim can be taken over only once it expired (a lease, seconds at least):
            # trying at every look would mostly win claims their holders just released.
            self.last_takeover = time.monotonic()
            taken = self._take([u for u in self.deferred if u in self.open])
        if taken or len(self.deferred) < before:  # taken over, or finished
            self.waiting_since = None
            self.tail_polls = 0
        return True

    def waiting_keys(self) -> list[str]:
        return [it.key for u in self.deferred for it in self.open.get(u, ())]

    def _report(self, *, phase: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress < POLL_S:
            return
        self.last_progress = now
        while self.recent and now - self.recent[0][0] > RATE_WINDOW_S:
            self.recent.popleft()
        window = min(RATE_WINDOW_S, now - self.started)
        rate = sum(n for _, n in self.recent) / window if window > 0 else 0.0
        running = [it.key for c in self.inflight.values() for it in c.items]
        done = len(self.done) + len(self.peer_settled)
        if self.opts.progress is not None:
            self.opts.progress(Snapshot(self.report.task, self.report.total, done,
                                        len(self.report.failed), len(running), rate,
                                        now - self.started))
        if self.opts.state is not None:
            self.opts.state.update(phase=phase, done=done,  # type: ignore[arg-type]
                                   failed=len(self.report.failed), running=running,
                                   waiting=self.waiting_keys() if phase == "waiting" else [])
