"""The worker pool of one run: start it, kill it, rebuild it after a worker dies, and stop
keys that run past their timeout.

Every process of the pool dies with the runner: the forkserver imports
`tasks.forkserver_init` (PR_SET_PDEATHSIG) and each worker sets it in its initializer, so a
SIGKILL of the runner alone leaves nothing behind to publish. Workers report what they
run in a shared array of slots (see worker.py); a key running past the timeout gets its
worker SIGKILLed, which breaks the pool, and the runner rebuilds it as for any death.
With GPU groups (tasks.gpus) each pool gets a fresh table of group owners, so a rebuilt
pool hands its processes the same CUDA_VISIBLE_DEVICES groups as the one it replaces.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import psutil

from tasks import worker
from tasks.bounds import START_METHODS
from tasks.errors import SpecError
from tasks.worker import SLOT_FIELDS, Chunk, Outcome, WorkerSetup

logger = logging.getLogger(__name__)

KILL_WAIT_S = 5.0  # how long to wait for killed workers to be reaped
FORKSERVER_PRELOAD = ["__main__", "tasks.forkserver_init"]
SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, its NUL not counted)
FORKSERVER_SOCKET_ROOM = 32  # what multiprocessing adds to $TMPDIR: /pymp-XXXXXXXX/listener-XXXXXXXX


@dataclass(frozen=True)
class Overdue:
    """A key that ran past the timeout; its worker was killed."""

    chunk_id: int  # the chunk it was in
    index: int  # its place in that chunk
    seconds: float  # how long it had run


class Pool:
    """One executor at a time; `rebuild()` replaces a broken one."""

    def __init__(self, setup: WorkerSetup, *, executor: Literal["process", "thread"],
                 workers: int, start_method: str, timeout_s: float | None) -> None:
        self.setup = setup
        self.executor = executor
        self.workers = workers
        self.start_method = start_method
        self.timeout_s = timeout_s
        self._pool: Executor | None = None
        self._slots: Any = None
        # Keep dead pools referenced: on CPython 3.11 a broken ProcessPoolExecutor's pipes
        # can be closed twice, the second time by the garbage collector, by which time the
        # fd number may belong to the new pool (seen here as EBADF on spawn).
        self._dead: list[Executor] = []
        self._killed: list[Overdue] = []

    def start(self) -> None:
        """Start the pool, its worker processes at once (not at the first chunks: their
        start, an import of the task, overlaps the runner's own set-up). Once."""
        if self._pool is not None:
            return
        if self.executor == "thread":
            worker.init_worker(self.setup, process=False)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="spotfan-task")
            return
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            _check_socket_room()
            ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # taken when the forkserver starts
        args: tuple[Any, ...] = (self.setup, None, None, None)
        if self.timeout_s is not None:
            self._slots = ctx.RawArray("d", SLOT_FIELDS * self.workers)
            args = (self.setup, self._slots, ctx.Lock(), ctx.RawValue("l", 0))
        if self.setup.gpu_groups:
            args = (*args, True, ctx.RawArray("l", len(self.setup.gpu_groups)), ctx.Lock())
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx,
                                         initializer=worker.init_worker, initargs=args)
        for _ in range(self.workers):  # each submit starts one process while none is idle
            self._pool.submit(worker.ready)

    def submit(self, chunk: Chunk) -> "Future[list[Outcome]]":
        assert self._pool is not None
        return self._pool.submit(worker.run_chunk, chunk)

    def rebuild(self) -> None:
        """Replace a broken pool (its workers killed first) with a fresh one."""
        if self._pool is not None:
            self._dead.append(self._pool)
        self.shutdown(kill=True)
        self.start()

    def shutdown(self, *, kill: bool = False) -> None:
        if self._pool is None:
            return
        if kill and isinstance(self._pool, ProcessPoolExecutor):
            _kill_workers(self._pool)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def stop_overdue(self) -> list[Overdue]:
        """Kill the workers of keys running past the timeout; returns those keys."""
        if self._slots is None or self.timeout_s is None:
            return []
        now = time.monotonic()
        found = []
        for base in range(0, len(self._slots), SLOT_FIELDS):
            pid, chunk_id, index, start = self._slots[base:base + SLOT_FIELDS]
            if start and now - start > self.timeout_s and pid:
                self._slots[base + 3] = 0.0
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    continue
                found.append(Overdue(int(chunk_id), int(index), now - start))
                logger.warning("a key ran %.0fs, past --timeout %gs: killed its worker (pid %d)",
                               now - start, self.timeout_s, int(pid))
        self._killed.extend(found)
        return found

    def take_killed(self) -> list[Overdue]:
        found, self._killed = self._killed, []
        return found


def start_forkserver(executor: str, start_method: str) -> None:
    """Start the forkserver now, before the runner starts its threads (the SFTP session's,
    the heartbeat), without waiting for it; the pool started later forks its workers from it.
    Its start overlaps the runner's own set-up, though on the lab that was not measurable
    (bench/bench_start.py)."""
    if executor != "process" or start_method != "forkserver":
        return
    _check_socket_room()
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    from multiprocessing import forkserver

    # The forkserver and multiprocessing's resource tracker run `python -c`, whose sys.path
    # starts with "", their current folder: started in the run root on a share, each module
    # they import would first look there, a round trip each. Started from "/", their imports
    # stay local; each worker still gets the runner's folder and sys.path from multiprocessing.
    # (Only while no other thread runs: the current folder is the whole process's.)
    here = -1
    if threading.active_count() == 1:
        try:
            here = os.open(".", os.O_PATH | os.O_DIRECTORY)
        except OSError:  # a current folder gone: start them from it as multiprocessing would
            pass
    try:
        if here >= 0:
            os.chdir("/")
        forkserver.ensure_running()  # spawns them and returns; the server imports on its own
    finally:
        if here >= 0:
            os.fchdir(here)
            os.close(here)


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
    psutil.wait_procs(procs, timeout=KILL_WAIT_S)


def _check_socket_room() -> None:
    """The forkserver listens on a Unix socket under $TMPDIR: refuse a TMPDIR too long for
    one up front (multiprocessing would fail with "AF_UNIX path too long")."""
    tmp = tempfile.gettempdir()
    if len(os.fsencode(tmp)) + FORKSERVER_SOCKET_ROOM > SOCKET_PATH_MAX:
        raise SpecError(f"TMPDIR {tmp} is {len(os.fsencode(tmp))} bytes long: the worker processes' "
                        f"forkserver socket under it would pass the {SOCKET_PATH_MAX}-byte limit of a "
                        "Unix socket path; set TMPDIR to a shorter folder (e.g. /tmp) or pass "
                        "--start-method spawn")
