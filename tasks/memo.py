"""`@memo`: a result many keys share, computed once on the whole root and reused by every caller.

    from tasks import filetask, memo

    @memo
    def reference_embeddings(model: str, size: int) -> np.ndarray:
        ...                                   # minutes of work, the same for every key

    @filetask(src="images/*.jpg", out="scores/{stem}.npy")
    def score(src: Path, out: Path) -> None:
        np.save(out, embed(src) @ reference_embeddings("vit-b", 224).T)

A call is keyed by the function's qualified name and a hash of its arguments' content.
The first caller on the root (any worker, runner or VM) claims that key the way a runner
claims a unit (`claims.Claims`: an exclusive create, kept fresh while the body runs, taken
over once it is older than the lease or its holder on this host is gone), runs the body,
and publishes the pickled result whole (a temporary, then a rename) under
`.spotfan/memo/<module.function>/<hash>.pkl`. Every other caller waits for that file
(at most `wait_s`) and loads it; each process keeps what it loaded. A crash mid-body leaves
no result, and the claim expires like any other.

Inside `tasks run` the root is the run's (its workers are told it in SPOTFAN_ROOT);
elsewhere give it: `@memo(root="/mnt/share")`. Arguments must be hashable by content:
None, bool, int, float, str, bytes, pathlib paths, tuples, lists, dicts, sets and
frozensets of those, and numpy arrays; anything else is refused with a TypeError, since
its identity would not be the same in another process. Results are pickled: the caller
must trust whoever can write the root, as it already does for the task code it runs.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any, TypeVar

from tasks.bounds import MAX_LEASE_S, MIN_LEASE_S
from tasks.claims import Claims
from tasks.errors import TaskError
from tasks.fs import FsClock, atomic_write
from tasks.keys import name_problem
from tasks.layout import BOOKKEEPING_DIR

ROOT_ENV = "SPOTFAN_ROOT"  # set by `tasks run` in its workers: the run root
MEMO_DIR = f"{BOOKKEEPING_DIR}/memo"  # relative to the run root
DEFAULT_LEASE_S = 120.0  # a claim on a call not refreshed this long belongs to a dead caller
DEFAULT_WAIT_S = 6 * 3600.0  # how long a caller waits for another's result before giving up
REFRESH_EVERY_S = 1.0  # the claim's heartbeat thread looks this often (Claims.refresh decides)
POLL_MIN_S = 0.05  # a waiter looks for the result this often at first ...
POLL_MAX_S = 2.0  # ... and at most this rarely
HASH_LEN = 32  # hex digits of sha256 in a call's file name

F = TypeVar("F", bound=Callable[..., Any])


class MemoError(TaskError):
    """A memoised call cannot be made or its result cannot be had."""


def memo(fn: F | None = None, *, root: str | Path | None = None, lease_s: float = DEFAULT_LEASE_S,
         wait_s: float = DEFAULT_WAIT_S) -> Any:
    """Decorate a top-level function: `@memo` or `@memo(root=..., lease_s=..., wait_s=...)`."""
    if not MIN_LEASE_S <= lease_s <= MAX_LEASE_S:
        raise MemoError(f"memo lease_s must be {MIN_LEASE_S:.0f} to {MAX_LEASE_S:.0f} seconds, "
                        f"not {lease_s!r}")
    if not wait_s > 0:
        raise MemoError(f"memo wait_s must be a positive number of seconds, not {wait_s!r}")

    def wrap(f: F) -> F:
        name = f"{f.__module__}.{f.__qualname__}"
        if "<" in f.__qualname__ or name_problem(name) is not None:
            raise MemoError(f"@memo needs a top-level function of a module, not {name!r}: "
                            "other processes find it by that name")
        cache: dict[str, Any] = {}
        lock = threading.Lock()

        @functools.wraps(f)
        def call(*args: Any, **kwargs: Any) -> Any:
            digest = call_hash(args, kwargs)
            with lock:
                if digest in cache:
                    return cache[digest]
            base = Path(_root(root, name)) / MEMO_DIR / name
            value = _get(f, args, kwargs, base=base, digest=digest, lease_s=lease_s, wait_s=wait_s)
            with lock:
                cache[digest] = value
            return value

        call.memo_name = name  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap(fn) if fn is not None else wrap


def _root(given: str | Path | None, name: str) -> str:
    root = str(given) if given is not None else os.environ.get(ROOT_ENV)
    if not root:
        raise MemoError(f"@memo {name}: no run root. Call it from a task that `tasks run` runs, "
                        "or give the root: @memo(root=\"/path/to/root\")")
    if "://" in root:
        raise MemoError(f"@memo {name}: the run root {root} is an object store, where @memo does not "
                        "work yet; give it a folder every caller shares: @memo(root=\"/path\")")
    return root


def _get(f: Callable[..., Any], args: tuple, kwargs: dict, *, base: Path, digest: str,
         lease_s: float, wait_s: float) -> Any:
    result = base / f"{digest}.pkl"
    found = _load(result)
    if found is not _MISSING:
        return found
    for d in (base / "claims", base / "done"):
        d.mkdir(parents=True, exist_ok=True)
    claims = Claims(base / "claims", base / "done", lease_s=lease_s, clock=_clock(base),
                    pipelined=False)
    deadline = time.monotonic() + wait_s
    poll = POLL_MIN_S
    try:
        while True:
            won, _busy = claims.acquire([digest])
            if won:
                return _compute(f, args, kwargs, claims, digest, result)
            found = _load(result)
            if found is not _MISSING:
                return found
            if time.monotonic() > deadline:
                raise MemoError(f"gave up waiting {wait_s:.0f}s for {result}: another caller "
                                f"holds {base / 'claims'}/{digest} and has not finished. Raise "
                                "wait_s, or remove that claim if its holder is gone")
            time.sleep(poll)
            poll = min(POLL_MAX_S, poll * 2)
    finally:
        claims.close()


def _compute(f: Callable[..., Any], args: tuple, kwargs: dict, claims: Claims, digest: str,
             result: Path) -> Any:
    done = False
    try:
        found = _load(result)  # finished by the holder we took over from, just before
        if found is not _MISSING:
            done = True
            return found
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(claims, stop), daemon=True,
                                name="spotfan-memo-heartbeat")
        beat.start()
        try:
            value = f(*args, **kwargs)
        finally:
            stop.set()
            beat.join()
        atomic_write(result, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        done = True
        return value
    finally:
        claims.release([digest], done=done)


def _heartbeat(claims: Claims, stop: threading.Event) -> None:
    while not stop.wait(REFRESH_EVERY_S):
        claims.refresh()


_MISSING = object()


def _load(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _MISSING
    try:
        return pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - any unpickling error means the same to the user
        raise MemoError(f"cannot load the memoised result {path}: {e}. Delete the file to have "
                        "it computed again") from e


def _clock(base: Path) -> FsClock:
    """The root's clock, from a probe file written beside the claims (see status._clock)."""
    clock = FsClock()
    probe = base / f".clock-{os.getpid()}-{threading.get_ident()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.write(fd, b"{")
            clock.sync(fd, b"{", probe)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        pass
    return clock


def call_hash(args: tuple, kwargs: dict) -> str:
    """A hash of the arguments' content, the same in every process and on every machine."""
    h = hashlib.sha256()
    _encode(("args", args, dict(kwargs)), h)
    return h.hexdigest()[:HASH_LEN]


def _encode(obj: Any, h: Any) -> None:
    def tag(t: bytes, payload: bytes) -> None:
        h.update(t + struct.pack(">Q", len(payload)) + payload)

    if obj is None:
        tag(b"N", b"")
    elif isinstance(obj, bool):
        tag(b"B", b"1" if obj else b"0")
    elif isinstance(obj, int):
        tag(b"I", str(obj).encode())
    elif isinstance(obj, float):
        tag(b"F", struct.pack(">d", obj))
    elif isinstance(obj, str):
        tag(b"S", obj.encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (bytes, bytearray)):
        tag(b"Y", bytes(obj))
    elif isinstance(obj, PurePath):
        tag(b"P", str(obj).encode("utf-8", "surrogatepass"))
    elif isinstance(obj, (tuple, list)):
        tag(b"T" if isinstance(obj, tuple) else b"L", str(len(obj)).encode())
        for x in obj:
            _encode(x, h)
    elif isinstance(obj, dict):
        tag(b"D", str(len(obj)).encode())
        for _, k, v in sorted(((_digest(k), k, v) for k, v in obj.items()), key=lambda t: t[0]):
            _encode(k, h)
            _encode(v, h)
    elif isinstance(obj, (set, frozenset)):
        tag(b"E", b"".join(sorted(_digest(x).encode() for x in obj)))
    elif type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
        tag(b"A", f"{obj.dtype.str}{obj.shape}".encode() + obj.tobytes(order="C"))
    elif type(obj).__module__ == "numpy" and hasattr(obj, "item"):
        _encode(obj.item(), h)  # a numpy scalar: its Python value
    else:
        raise TypeError(f"@memo cannot key a call on a {type(obj).__name__} argument: use values "
                        "hashable by content (None, bool, int, float, str, bytes, paths, tuples, "
                        "lists, dicts, sets, numpy arrays)")


def _digest(obj: Any) -> str:
    h = hashlib.sha256()
    _encode(obj, h)
    return h.hexdigest()
