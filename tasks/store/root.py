"""An object-store run root: a bucket and a prefix, the bookkeeping layout's object names
under it, the store's clock, and the few whole-object reads and writes the engine needs.

The layout is the POSIX one (tasks/layout.py) with object names for paths:
`PREFIX/.spotfan/tasks/<task>/claims/<unit>`, `.../done/<unit>`, `.../plan.json`,
`.../failed/<id>.json`, `.../log/<owner>.<n>.jsonl` (an object cannot be appended to: each
flush is the next numbered part), `PREFIX/.spotfan/owners/<owner>.json`. Nothing here is a
folder: a "folder" is a name prefix, listed with one LIST per 1,000 names.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from tasks.errors import SpecError, StoreUnreachable
from tasks.fs import FsClock
from tasks.keys import NAME_MAX, Limits, relative, safe_relpath
from tasks.layout import BOOKKEEPING_DIR, Layout
from tasks.sources import Sources
from tasks.store import open_bucket
from tasks.store.bucket import Bucket, ObjectInfo, Prefix, Refused, Retries
from tasks.store.url import MAX_NAME_BYTES, RootURL, parse_root

DIR_MARKER = ".spotfan-done"  # the object a directory output's prefix is published by, written last
STORE_THREADS = 16  # requests in flight at once for listings' follow-ups and claim batches
PUT_TRIES = 3  # an unconditional write is create, else replace of the version just seen
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Entry:
    """An object under a listed prefix, by its name relative to that prefix."""

    name: str
    info: ObjectInfo


class BucketRoot:
    """One `s3://BUCKET/PREFIX` or `gs://BUCKET/PREFIX` root (no I/O until used). Pickles
    without its connection: a worker process connects again."""

    def __init__(self, url: str | RootURL, *, bucket: Bucket | None = None,
                 retries: Retries = Retries()) -> None:
        self.url = parse_root(url) if isinstance(url, str) else url
        self.bucket = bucket if bucket is not None else open_bucket(self.url, retries=retries)
        self.clock = FsClock()  # the store's clock, learned from the `updated` of our writes
        self._threads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_threads": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return self.url.url.rstrip("/")

    # -- names -----------------------------------------------------------------------
    def name(self, rel: str | Path) -> str:
        """The object name of a root-relative path."""
        return self.url.key(str(rel))

    def where(self, rel: str | Path = "") -> str:
        return self.url.where(self.name(rel))

    def layout(self, task: str) -> Layout:
        """The bookkeeping layout with root-relative paths (`Layout(Path(), task)`)."""
        return Layout(Path(), task)

    def limits(self) -> Limits:
        """Output names: one name as long as a local file name may be (the task writes it
        locally first), a whole name within the store's 1,024 bytes after the prefix."""
        room = MAX_NAME_BYTES - len(self.url.prefix.encode())
        return Limits(NAME_MAX, MAX_NAME_BYTES, room)

    # -- the clock -------------------------------------------------------------------
    def learn(self, info: ObjectInfo) -> None:
        """Set the store's clock from an object we just wrote (its `updated` is the store's)."""
        self.clock.offset = info.updated.timestamp() - time.time()
        self.clock.synced = time.monotonic()

    def age(self, info: ObjectInfo) -> float:
        return self.clock.age(info.updated.timestamp())

    def sync_clock(self) -> None:
        self.clock.offset = self.bucket.clock().timestamp() - time.time()
        self.clock.synced = time.monotonic()

    # -- whole objects ---------------------------------------------------------------
    def check(self) -> None:
        self.bucket.check()

    def read(self, rel: str | Path) -> bytes | None:
        got = self.bucket.get(self.name(rel))
        return None if got is None else got.data

    def create(self, rel: str | Path, data: bytes) -> ObjectInfo | None:
        """Write `data` only if nothing is at `rel`: its ObjectInfo, or None if something was."""
        made = self.bucket.create(self.name(rel), data)
        if isinstance(made, Refused):
            return None
        self.learn(made)
        return made

    def put(self, rel: str | Path, data: bytes) -> ObjectInfo:
        """Write `data` at `rel` whatever is there (a create, or a replace of the version
        just seen): for records only one process writes at a time (a key's failure, an
        owner's own file)."""
        name = self.name(rel)
        for _ in range(PUT_TRIES):
            made = self.bucket.create(name, data)
            if isinstance(made, Refused):
                info = self.bucket.stat(name)
                if info is None:
                    continue
                made = self.bucket.replace(name, data, version=info.version)
                if isinstance(made, Refused):
                    continue
            self.learn(made)
            return made
        raise StoreUnreachable(f"{self.where(rel)} kept changing while it was written "
                               f"({PUT_TRIES} tries); run the same command again")

    def delete(self, rel: str | Path, *, version: str | None = None) -> bool:
        return self.bucket.delete(self.name(rel), version=version)

    # -- listings --------------------------------------------------------------------
    def _prefix(self, folder: str | Path) -> str:
        rel = str(folder).strip("/")
        return self.name(rel + "/") if rel and rel != "." else self.url.prefix

    def entries(self, folder: str | Path) -> list[Entry]:
        """Objects directly in a folder (one delimited LIST per 1,000 names)."""
        prefix = self._prefix(folder)
        cut = len(prefix)
        return [Entry(o.name[cut:], o) for o in self.bucket.list(prefix, delimiter=True)
                if isinstance(o, ObjectInfo)]

    def names(self, folder: str | Path) -> set[str]:
        return {e.name for e in self.entries(folder)}

    def kinds(self, folder: str | Path) -> tuple[set[str], set[str]]:
        """(names of objects, names of sub-folders) directly in a folder, from one listing."""
        prefix = self._prefix(folder)
        cut = len(prefix)
        files: set[str] = set()
        folders: set[str] = set()
        for o in self.bucket.list(prefix, delimiter=True):
            if isinstance(o, Prefix):
                folders.add(o.name[cut:].rstrip("/"))
            else:
                files.add(o.name[cut:])
        return files, folders

    def tree(self, folder: str | Path) -> Iterator[Entry]:
        """Every object under a folder, at any depth, by its name relative to the folder."""
        prefix = self._prefix(folder)
        cut = len(prefix)
        for o in self.bucket.list(prefix):
            if isinstance(o, ObjectInfo):
                yield Entry(o.name[cut:], o)

    def read_json(self, rel: str | Path) -> Any:
        """A small JSON object, or None if it is missing or not JSON."""
        data = self.read(rel)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """fn over items with up to STORE_THREADS requests in flight (each one a round trip)."""
        if len(items) <= 1:
            return [fn(i) for i in items]
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="spotfan-store")
            threads = self._threads
        return list(threads.map(fn, items))

    def close(self) -> None:
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=True)
                self._threads = None
        self.bucket.close()

    # -- inputs ----------------------------------------------------------------------
    def glob(self, pattern: str) -> Sources:
        """Objects matching a root-relative glob, as `tasks.sources.glob_sources` matches
        files: `*` and `?` within one name, `**` any number of folders, names starting
        with "." only matched by a pattern part that starts with "." too. One LIST per
        1,000 objects under the glob's leading folders; the bookkeeping is never an input."""
        pattern = safe_relpath(relative(pattern), what="source glob")
        parts = pattern.split("/")
        fixed: list[str] = []
        for part in parts[:-1]:
            if any(c in part for c in "*?["):
                break
            fixed.append(part)
        base = "/".join(fixed)
        files: list[str] = []
        folders: set[str] = set()
        for e in self.tree(base):
            rel = f"{base}/{e.name}" if base else e.name
            if rel.split("/", 1)[0] == BOOKKEEPING_DIR or rel.endswith("/"):
                continue
            segments = rel.split("/")
            if _match(parts, segments):
                files.append(rel)
            elif not files:  # only counted for the message of a glob that matches no file
                for k in range(1, len(segments)):
                    if _match(parts, segments[:k]):
                        folders.add("/".join(segments[:k]))
                        break
        return Sources(sorted(files), len(folders))


def _match(parts: list[str], segments: list[str]) -> bool:
    """Whether the path `segments` matches the glob `parts` (see BucketRoot.glob)."""
    if not parts:
        return not segments
    head = parts[0]
    if head == "**":
        if _match(parts[1:], segments):
            return True
        return bool(segments) and not segments[0].startswith(".") and _match(parts, segments[1:])
    if not segments:
        return False
    seg = segments[0]
    if seg.startswith(".") and not head.startswith("."):
        return False
    return fnmatchcase(seg, head) and _match(parts[1:], segments[1:])


def open_root(text: str) -> BucketRoot:
    """The object-store root a `--root` names; SpecError if it is not a valid one."""
    if "://" not in text:
        raise SpecError(f"{text!r} is not an object-store root (s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)")
    return BucketRoot(text)
