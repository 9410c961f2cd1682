"""Collecting a task's outputs into one pandas table: parallel reads, a `key` column, and
one atomic write as Parquet or pickle (never CSV by default: it loses dtypes).

Outputs are read by their suffix through READERS; pass `reader=` (or register a suffix
in READERS) for anything else. A reader takes an output's path and returns a DataFrame
(any number of rows) or a dict (one row). The built-in readers:

    .npy      0-d array -> one row, column `value`; 1-d -> one row, columns f0..f{n-1};
              2-d -> one row per array row, columns f0..; more dimensions -> flattened
              into one row; a structured array -> one row per record, named by its fields
    .parquet  the stored DataFrame
    .pkl      a pickled DataFrame; a Series or a dict -> one row
    .json     an object -> one row; a list of objects -> one row each

Keys that are not done have no output and are simply absent from the table; outputs
that exist but cannot be read are all listed in one CollectError (or skipped on request).
On an object-store root each output is downloaded to a local temporary for its reader
(tasks/store/views.py) and removed once read; the table is always written locally.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
import pandas as pd

from tasks.errors import CollectError, RootError, SpecError, Unreadable
from tasks.items import Item
from tasks.mounts import is_network as network_filesystem
from tasks.progress import ProgressFn, Snapshot
from tasks.scan import DoneKeys, scan_done
from tasks.spec import Task
from tasks.layout import is_object_url

if TYPE_CHECKING:
    from tasks.store.views import BucketOutputs

logger = logging.getLogger(__name__)

READ_THREADS = 16  # concurrent reads on a network mount: SSHFS pipelines them on one connection
LOCAL_READ_THREADS = 2  # on a local disk reads are quick and parsing holds the GIL
PROGRESS_INTERVAL_S = 0.5  # how often progress is reported while reading
SHOWN_UNREADABLE = 10  # outputs an error message lists before "and N more"
KEY_COLUMN = "key"
NPY_MAGIC = b"\x93NUMPY"

Format = Literal["parquet", "pickle"]
FORMAT_SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet",
                                      ".pkl": "pickle", ".pickle": "pickle"}
Reader = Callable[[Path], Union[pd.DataFrame, Mapping[str, Any]]]


def read_npy(path: Path) -> pd.DataFrame:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise ValueError("not a .npy file (no NUMPY header): truncated, or written by "
                             "something other than numpy.save")
        f.seek(0)
        arr = np.load(f, allow_pickle=False)
    if arr.dtype.names:  # a structured array: its records are rows
        return pd.DataFrame(arr.reshape(-1))
    if arr.ndim == 0:
        return pd.DataFrame({"value": [arr.item()]})
    if arr.ndim != 2:
        arr = arr.reshape(1, -1)
    return pd.DataFrame(arr, columns=_feature_columns(arr.shape[1]), copy=False)


@functools.lru_cache(maxsize=64)
def _feature_columns(n: int) -> pd.Index:
    # One shared Index per width: thousands of outputs, one set of column names.
    return pd.Index([f"f{i}" for i in range(n)], dtype=object)


def read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def read_pickle(path: Path) -> pd.DataFrame | Mapping[str, Any]:
    obj = pd.read_pickle(path)
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, pd.Series):
        return obj.to_frame().T.reset_index(drop=True)
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"holds a {type(obj).__name__}, not a DataFrame, Series or dict")


def read_json(path: Path) -> pd.DataFrame | Mapping[str, Any]:
    obj = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, list) and all(isinstance(x, dict) for x in obj):
        return pd.DataFrame.from_records(obj)
    raise TypeError(f"holds a JSON {type(obj).__name__}; expected an object or a list of objects")


# Suffix -> reader. Add an entry to teach `collect` (and `python -m tasks collect`) a new
# output type, or pass reader= for one call.
READERS: dict[str, Reader] = {
    ".npy": read_npy,
    ".parquet": read_parquet,
    ".pq": read_parquet,
    ".pkl": read_pickle,
    ".pickle": read_pickle,
    ".json": read_json,
}


@dataclass(frozen=True)
class Collected:
    """The outputs of one task, read into one table."""

    task: str  # the task's name
    frame: pd.DataFrame  # every output's rows, with the key column first, in key order
    total: int  # keys in the task
    read: int  # outputs read into the frame
    missing: int  # keys not done (no output yet): absent from the frame
    unreadable: tuple[Unreadable, ...]  # outputs skipped because they could not be read
    seconds: float  # time spent listing and reading


def reader_for(task: Task, items: Sequence[Item]) -> Reader:
    """The built-in reader for a task's outputs, chosen by their suffix."""
    if task.is_dir:
        raise SpecError(f"the outputs of {task.name} are directories; pass reader= (or "
                        "--reader module:function), a function that reads one output folder "
                        "into a DataFrame")
    suffixes = sorted({Path(it.out).suffix.lower() for it in items})
    unknown = [s for s in suffixes if s not in READERS]
    if unknown:
        known = ", ".join(sorted(READERS))
        raise SpecError(f"no reader for {', '.join(repr(s or '(no suffix)') for s in unknown)} "
                        f"outputs of {task.name}; known suffixes: {known}. Pass reader= (or "
                        "--reader module:function), or add the suffix to tasks.collect.READERS")
    by_suffix = {s: READERS[s] for s in suffixes}
    if len(by_suffix) == 1:
        return next(iter(by_suffix.values()))
    return lambda path: by_suffix[path.suffix.lower()](path)


class FolderOutputs:
    """A task's outputs in a run root folder, read where they are."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def __enter__(self) -> "FolderOutputs":
        return self

    def __exit__(self, *exc: object) -> None:
        """Nothing to clean up."""

    def items(self, task: Task) -> Sequence[Item]:
        return task.items(self.root)

    def done(self, items: Sequence[Item]) -> DoneKeys:
        return scan_done(self.root, items)

    def local(self, item: Item) -> Path:
        return self.root / item.out

    def release(self, path: Path) -> None:
        """The output stays where it is."""


def collect(task: Task, *, root: str | Path = ".", workers: int | None = None,
            reader: Reader | None = None, skip_unreadable: bool = False,
            key_column: str = KEY_COLUMN, progress: ProgressFn | None = None) -> Collected:
    """Read every existing output of `task` under `root` into one DataFrame.

    The frame has `key_column` first, then the output's own columns; an output of n rows
    gives n rows with its key. Raises CollectError listing every output that could not
    be read, unless `skip_unreadable`, in which case they are left out and reported in
    `Collected.unreadable`. `workers` reading threads: default READ_THREADS on a network
    mount or an object-store root (`s3://B/P`, `gs://B/P`: each output is downloaded to a
    local temporary for its reader, then removed), LOCAL_READ_THREADS on a local disk.
    """
    started = time.monotonic()
    if workers is not None and workers < 1:
        raise SpecError(f"--workers must be at least 1, got {workers}")
    if is_object_url(str(root)):
        from tasks.store.views import BucketOutputs, opened  # the SDKs: only for a bucket

        with opened(str(root)) as bucket, BucketOutputs(bucket) as outputs:
            return _collect(task, outputs, workers or READ_THREADS, reader, skip_unreadable,
                            key_column, progress, started)
    root = Path(root).resolve()
    if not root.is_dir():
        raise SpecError(f"run root {root} is not a directory; pass --root DIR")
    if workers is None:
        workers = READ_THREADS if network_filesystem(root) else LOCAL_READ_THREADS
    return _collect(task, FolderOutputs(root), workers, reader, skip_unreadable, key_column,
                    progress, started)


def _collect(task: Task, outputs: "FolderOutputs | BucketOutputs", workers: int,
             reader: Reader | None, skip_unreadable: bool, key_column: str,
             progress: ProgressFn | None, started: float) -> Collected:
    items = outputs.items(task)
    read_one = reader or reader_for(task, items)
    done = outputs.done(items)
    todo = [it for it in items if it.key not in done.left_keys]
    frames: list[pd.DataFrame | None] = [None] * len(todo)
    failed: list[Unreadable] = []
    logger.info("%s: reading %d outputs (%d keys not done) with %d threads", task.name,
                len(todo), len(items) - len(todo), workers)

    def one(i: int) -> pd.DataFrame:
        path = outputs.local(todo[i])
        try:
            got = read_one(path)
        finally:
            outputs.release(path)
        if isinstance(got, Mapping):
            return pd.DataFrame([dict(got)])
        if not isinstance(got, pd.DataFrame):
            raise TypeError(f"the reader returned a {type(got).__name__}; it must return a "
                            "DataFrame or a dict")
        return got

    pool = ThreadPoolExecutor(min(workers, max(1, len(todo))), thread_name_prefix="spotfan-read")
    try:
        futures = {pool.submit(one, i): i for i in range(len(todo))}
        finished = 0
        last = 0.0
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                frames[i] = fut.result()
            except RootError:
                raise  # the store refused us or stopped answering: no output is to blame
            except Exception as e:  # any reader may raise anything; report them all
                failed.append(Unreadable(todo[i].key, todo[i].out, _one_line(e)))
            finished += 1
            now = time.monotonic()
            if progress is not None and (now - last >= PROGRESS_INTERVAL_S or finished == len(todo)):
                last = now
                elapsed = now - started
                progress(Snapshot(f"collect {task.name}", len(todo), finished - len(failed),
                                  len(failed), min(len(todo) - finished, workers),
                                  finished / elapsed if elapsed > 0 else 0.0, elapsed))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    if failed and not skip_unreadable:
        raise CollectError(_unreadable_message(task.name, failed, len(todo)), failed)
    frame = _combine(todo, frames, key_column)
    return Collected(task.name, frame, len(items), len(todo) - len(failed),
                     len(items) - len(todo), tuple(failed), time.monotonic() - started)


def _combine(todo: list[Item], frames: list[pd.DataFrame | None], key_column: str) -> pd.DataFrame:
    keys: list[str] = []
    parts: list[pd.DataFrame] = []
    for item, frame in zip(todo, frames):
        if frame is None:
            continue  # unreadable, skipped
        if key_column in frame.columns:
            raise CollectError(f"the output {item.out} already has a column {key_column!r}; "
                               "pass key_column= (or --key-column) another name for the key")
        keys.append(item.key)
        parts.append(frame)
    if not parts:
        return pd.DataFrame({key_column: pd.Series([], dtype=object)})
    lengths = [len(p) for p in parts]
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else \
        parts[0].reset_index(drop=True)
    frame.insert(0, key_column, np.repeat(np.array(keys, dtype=object), lengths))
    return frame


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _unreadable_message(task: str, failed: list[Unreadable], total: int) -> str:
    failed = sorted(failed, key=lambda u: u.key)
    lines = [f"{len(failed)} of {total} outputs of {task} cannot be read:"]
    lines += [f"  {u.key!r} ({u.path}): {u.reason}" for u in failed[:SHOWN_UNREADABLE]]
    if len(failed) > SHOWN_UNREADABLE:
        lines.append(f"  ... and {len(failed) - SHOWN_UNREADABLE} more")
    lines.append("Delete those outputs and run the task again to rebuild them, pass reader= "
                 "(--reader module:function) if they need another reader, or skip them with "
                 "skip_unreadable=True (--skip-unreadable)")
    return "\n".join(lines)


def table_format(path: str | Path, format: Format | None = None) -> Format:
    """The format to write `path` in: given, or told by its suffix."""
    if format is not None:
        if format not in ("parquet", "pickle"):
            raise SpecError(f"--format must be parquet or pickle, got {format!r}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix in FORMAT_SUFFIXES:
        return FORMAT_SUFFIXES[suffix]
    raise SpecError(f"cannot tell the format of {str(path)!r} from its suffix; name it "
                    ".parquet or .pkl, or pass --format parquet|pickle (CSV is not written: "
                    "it loses dtypes; convert the Parquet file if you need one)")


def write_table(frame: pd.DataFrame, path: str | Path, *, format: Format | None = None) -> Path:
    """Write `frame` to `path` atomically: a temporary in the same folder, then a rename,
    so a reader never sees half a file and a failed write leaves the old file intact."""
    path = Path(path).resolve()
    fmt = table_format(path, format)
    if not path.parent.is_dir():
        raise CollectError(f"cannot write {path}: its folder does not exist; create it first")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            try:
                frame.to_parquet(tmp, index=False)
            except (ValueError, TypeError, ImportError) as e:  # pyarrow's errors derive from these
                raise CollectError(f"cannot write Parquet: {_one_line(e)}. Columns must have "
                                   "string names and one type each; --format pickle keeps any "
                                   "Python object") from e
        else:
            frame.to_pickle(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise CollectError(f"cannot write {path}: {e.strerror or e}; check the folder is "
                           "writable and has space") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path
