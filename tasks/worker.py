"""What runs inside each pool worker: load the task once, then run chunks of items.

A chunk's items are run one after another; each returns an `Outcome`, and one failing
item never stops the rest of its chunk. On a network root a key's publish (a few round
trips) goes on in a thread while the next key runs, so several requests are in flight
on the one SSHFS connection. Before each item the worker writes what it runs
and since when into its slot of a shared array, so the runner can stop a key that runs
past `--timeout` (by killing this process) and know which key it was.
"""
from __future__ import annotations

import errno
import os
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks import gpus
from tasks.deathsig import die_with_parent
from tasks.direct import stageable
from tasks.errors import RootError
from tasks.fs import PublishMethod, env_errno, fault
from tasks.items import Item
from tasks.memo import ROOT_ENV
from tasks.publish import Fence, Published, Publisher, discard, temp_path
from tasks.spec import CommandFailed, Task, TaskRef

TRACEBACK_TAIL = 8000  # characters of a traceback kept in a failure record
FULL_BELOW_BYTES = 64 * 1024  # a failed key on a disk with less free space: out of space
SLOT_FIELDS = 4  # per worker in the shared slots array: pid, chunk id, index, start
PUBLISH_THREADS = 4  # on a network root, publishes in flight per worker (pipelined requests)
PUBLISH_INFLIGHT = 16  # finished keys waiting to be published, at most, per worker
# Only quicker keys are left to the runner to publish in a batch (tasks.direct): a slower key's
# publish is a small part of its time, and published at once it is not lost with its chunk
# when the VM is preempted (a preemption then loses only the keys that were running).
STAGE_BELOW_S = 0.05


@dataclass(frozen=True)
class Outcome:
    """How one execution of one key went."""

    key: str  # the item's key
    ok: bool  # the output exists now (ours, or a peer's)
    started: float  # wall-clock start, seconds since the epoch
    seconds: float  # how long the task itself took
    error: str = ""  # one line: exception type and message, or exit status
    detail: str = ""  # traceback, or the command's stderr tail
    published: Published | None = None  # ours, theirs (a peer was first), fenced (claim lost)
    env: str = ""  # the environment failed (full disk, dead mount...): not the key's fault
    staged: str = ""  # finished, left on local disk for the runner to publish (tasks.direct)


@dataclass(frozen=True)
class Chunk:
    """Keys sent to one worker at once, with the claims they are published under."""

    id: int  # the runner's number for this chunk (slots name it)
    items: list[Item]
    fences: list[Fence]  # one per item
    sources: tuple[str, ...] = ()  # per item: a local copy of its input (tasks.fetch), or ""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs, sent once when its process starts."""

    ref: TaskRef  # the task, by name
    root: str  # the run root
    staging: str  # where the task writes its temporaries (local disk on a network root)
    share_tmp: str | None  # on a network root: the runner's folder on the share
    method: PublishMethod
    fsync: bool
    runner_pid: int  # the runner; a process worker dies with it
    gpu_groups: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES per worker process (tasks.gpus); () = leave it
    direct: bool = False  # the runner publishes small outputs itself (tasks.direct)
    bucket: Any = None  # an object-store root (tasks.store.root.BucketRoot), `root` its URL


@dataclass
class _State:
    task: Task
    root: Path
    staging: Path
    publisher: Publisher
    ctx: Any
    slots: Any  # multiprocessing RawArray of SLOT_FIELDS doubles per worker, or None
    slot: int  # this worker's slot
    publishing: ThreadPoolExecutor | None  # network root: publishes overlap the next keys
    direct: bool  # leave small outputs staged for the runner (tasks.direct)
    fetcher: Any = None  # downloads inputs from an object-store root (BucketPublisher)


_state: _State | None = None


def init_worker(setup: WorkerSetup, slots: Any = None, slot_lock: Any = None,
                slot_next: Any = None, process: bool = True, gpu_owners: Any = None,
                gpu_lock: Any = None) -> None:
    """Pool initializer: die with the runner, take its GPUs (before anything can touch CUDA),
    import the task by name, run its per-process initializer once, take a slot."""
    global _state
    if process:
        die_with_parent(setup.runner_pid)
    if setup.gpu_groups and gpu_owners is not None:
        gpus.take(setup.gpu_groups, gpu_owners, gpu_lock)
    task = setup.ref.load()
    slot = 0
    if slots is not None:
        with slot_lock:
            slot = slot_next.value % (len(slots) // SLOT_FIELDS)
            slot_next.value += 1
        slots[slot * SLOT_FIELDS] = os.getpid()
    share_tmp = Path(setup.share_tmp) if setup.share_tmp else None
    root = Path(setup.root)
    publisher: Any
    if setup.bucket is not None:
        from tasks.store.publish import BucketPublisher

        publisher = BucketPublisher(setup.bucket)
        root = Path(setup.staging)  # the task's `root` and a command's folder: local disk
    else:
        publisher = Publisher(root, method=setup.method, share_tmp=share_tmp,
                              fsync=setup.fsync or task.fsync)
    if process:
        os.chdir(root)
    os.environ[ROOT_ENV] = setup.root  # where @memo results live (tasks/memo.py)
    remote = share_tmp is not None or setup.bucket is not None  # every publish a round trip
    publishing = ThreadPoolExecutor(PUBLISH_THREADS) if remote else None
    _state = _State(task, root, Path(setup.staging), publisher, task.open(), slots,
                    slot, publishing, setup.direct and not publisher.fsync,
                    publisher if setup.bucket is not None else None)


def ready() -> None:
    """Nothing: sent once per worker when the pool starts, so that every process starts then."""


def run_chunk(chunk: Chunk) -> list[Outcome]:
    assert _state is not None, "init_worker was not called in this process"
    state = _state
    try:
        state.publisher.open()
    except RootError as e:
        return [Outcome(it.key, False, time.time(), 0.0, str(e), env=str(e)) for it in chunk.items]
    out: list[Outcome | Future[Outcome]] = []
    try:
        for i, (item, fence) in enumerate(zip(chunk.items, chunk.fences)):
            _mark(state, chunk.id, i)
            local = chunk.sources[i] if chunk.sources else ""
            out.append(run_one(state, item, fence, Path(local) if local else None))
            if state.publishing is not None:
                _bound_inflight(out)
        return [o if isinstance(o, Outcome) else o.result() for o in out]
    finally:
        for o in out:  # none may publish after the chunk is over
            if not isinstance(o, Outcome):
                o.exception()
        _mark(state, 0, 0, idle=True)
        state.publisher.close()


def _bound_inflight(out: list[Outcome | Future[Outcome]]) -> None:
    pending = [o for o in out if not isinstance(o, Outcome) and not o.done()]
    if len(pending) > PUBLISH_INFLIGHT:
        pending[0].exception()  # wait for the oldest


def _mark(state: _State, chunk_id: int, index: int, idle: bool = False) -> None:
    if state.slots is None:
        return
    base = state.slot * SLOT_FIELDS
    state.slots[base + 3] = 0.0  # idle first: never a stale start with a new key
    state.slots[base + 1] = chunk_id
    state.slots[base + 2] = index
    if not idle:
        state.slots[base + 3] = time.monotonic()


def run_one(state: _State, item: Item, fence: Fence,
            src: Path | None = None) -> Outcome | Future[Outcome]:
    """Run one key (on `src`, a local copy of its input, if given); its publish goes on in
    the background on a network root."""
    tmp = temp_path(state.staging, item.out)
    started = time.time()
    t0 = time.perf_counter()
    inbox = None
    try:
        if state.fetcher is not None and item.src is not None and src is None:
            inbox = temp_path(state.staging, "input")  # the input, downloaded, under its own name
            inbox.mkdir()
            src = state.fetcher.fetch(item, inbox)
        if state.task.is_dir:
            tmp.mkdir()
        state.task.execute(item, tmp, state.root, state.ctx, src=src)
    except BaseException as e:
        if not isinstance(e, Exception | SystemExit):
            raise
        return _failed(state, item, tmp, started, time.perf_counter() - t0, e)
    finally:
        if inbox is not None:
            discard(inbox)
    seconds = time.perf_counter() - t0
    if state.direct and seconds < STAGE_BELOW_S and not state.task.is_dir and stageable(tmp):
        return Outcome(item.key, True, started, seconds, staged=str(tmp))
    if state.publishing is not None:
        return state.publishing.submit(_publish, state, item, fence, tmp, started, seconds)
    return _publish(state, item, fence, tmp, started, seconds)


def _publish(state: _State, item: Item, fence: Fence, tmp: Path, started: float,
             seconds: float) -> Outcome:
    try:
        put = state.publisher.publish(tmp, item.out, is_dir=state.task.is_dir, fence=fence)
        return Outcome(item.key, put != "fenced", started, seconds, published=put)
    except Exception as e:
        return _failed(state, item, tmp, started, seconds, e)


def _failed(state: _State, item: Item, tmp: Path, started: float, seconds: float,
            e: BaseException) -> Outcome:
    discard(tmp)
    if isinstance(e, RootError):  # a full disk, a dead mount, a store that cannot be used
        return Outcome(item.key, False, started, seconds, str(e), env=str(e))
    if isinstance(e, CommandFailed):
        return Outcome(item.key, False, started, seconds, f"exit status {e.returncode}",
                       e.stderr, env=_disk_full(state))
    # user code may raise anything: record it, go on
    line = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    code = env_errno(e)
    env = str(fault(code, state.root)) if code is not None else _disk_full(state)
    if not env and not state.staging.is_dir():
        env = f"the temporary folder {state.staging} vanished; run the same command again"
    detail = "".join(traceback.format_exception(e))[-TRACEBACK_TAIL:]
    return Outcome(item.key, False, started, seconds, line, detail, env=env)


def _disk_full(state: _State) -> str:
    """A failure on a full disk is the disk's fault whatever the task said (a command
    reports ENOSPC only in its stderr): the message that stops the run, or ""."""
    folders = [state.staging] + ([state.publisher.share_tmp] if state.publisher.share_tmp else [])
    for folder in folders:
        try:
            st = os.statvfs(folder)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < FULL_BELOW_BYTES:
            return str(fault(errno.ENOSPC, folder))
    return ""
