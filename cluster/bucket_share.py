"""The share of a headless cluster: cluster.records' files as objects under the bucket's prefix.

`[share] kind = "s3" | "gcs"` puts the run root in a bucket: the laptop and every VM's
agent read and write `PREFIX/.spotfan/cluster/...` (run requests, done records,
heartbeats, logs) through `BucketShare`, which has the methods of the laptop's `Share`
that the records need, on `tasks.store.root.BucketRoot`. A file is a whole object: a
write replaces it whole (compare-and-swap on the version this process wrote last, else
create-or-replace), `create_text` writes only if absent (the first agent's done record
wins). Every read is bounded (the bucket is untrusted input, as the share is), and the
store's errors become one StoreError that says what to fix.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.errors import ClusterError, RecordError, StoreError
from cluster.records import MAX_RECORD_BYTES
from tasks.errors import RootError
from tasks.store.bucket import ObjectInfo, Refused, Retries
from tasks.store.root import BucketRoot
from tasks.store.url import RootURL

logger = logging.getLogger(__name__)

MAX_LOG_OBJECT_BYTES = 8 << 20  # a log object bigger than this is refused unread (agents upload at most 4 MiB)
LAPTOP_RETRIES = Retries()  # the SDKs' bounded retries, as `tasks` uses them
AGENT_RETRIES = Retries(attempts=3, deadline_s=20.0, connect_timeout_s=5.0, read_timeout_s=20.0)  # a VM's agent
# loop must come back to write its heartbeat: fewer, shorter tries than a task's


class BucketShare:
    """cluster.records' files under one bucket root. No I/O until used; use it with `with`."""

    def __init__(self, url: RootURL, *, retries: Retries = LAPTOP_RETRIES) -> None:
        self.url = url
        self._retries = retries
        self._root: BucketRoot | None = None
        self._checked = False
        self._versions: dict[str, str] = {}  # object -> the version this process wrote last
        self._lock = threading.Lock()

    def __enter__(self) -> BucketShare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.url.url

    @property
    def root(self) -> BucketRoot:
        if self._root is None:
            with self._store("open"):
                self._root = BucketRoot(self.url, retries=self._retries)
        return self._root

    def close(self) -> None:
        if self._root is not None:
            self._root.close()
        self._root = None
        self._checked = False

    @contextmanager
    def _store(self, what: str) -> Iterator[None]:
        """The store's errors (tasks.errors.RootError: no bucket, no access, unreachable) as a StoreError."""
        try:
            yield
        except RootError as e:
            raise StoreError(f"{self.url.url}: {what}: {e}") from e
        except ImportError as e:
            extra = "s3" if self.url.scheme == "s3" else "gcs"
            raise StoreError(f"{self.url.url}: the store's SDK is not installed ({e}): "
                             f"pip install 'spotfan[{extra}]'") from e

    def open(self, *, attempts: int = 1) -> BucketShare:
        """Check once that the bucket can be used (StoreError saying why not); `attempts` is the
        Share's: the SDK retries transient failures itself, within its bounds."""
        if not self._checked:
            with self._store("cannot use the bucket"):
                self.root.check()
            self._checked = True
        return self

    def check(self) -> None:
        """Check the bucket now (the agent's health check): StoreError if it cannot be used."""
        with self._store("cannot use the bucket"):
            self.root.check()

    @property
    def is_open(self) -> bool:
        return self._checked

    def where(self, rel: str = "") -> str:
        return self.root.where(rel)

    # -- reads ------------------------------------------------------------------------
    def _get(self, rel: str, *, max_bytes: int) -> bytes | None:
        with self._store(f"cannot read {rel}"):
            info = self.root.bucket.stat(self.root.name(rel))
            if info is None:
                return None
            if info.size > max_bytes:
                raise RecordError(f"refused {self.where(rel)}: more than {max_bytes} bytes")
            got = self.root.bucket.get(self.root.name(rel))
        if got is None:
            return None
        if len(got.data) > max_bytes:  # replaced by a bigger one between the two requests
            raise RecordError(f"refused {self.where(rel)}: more than {max_bytes} bytes")
        return got.data

    def read_text(self, rel: str, *, max_bytes: int = MAX_RECORD_BYTES) -> str | None:
        """The object's text, or None if there is none; one over `max_bytes` is refused unread."""
        data = self._get(rel, max_bytes=max_bytes)
        return None if data is None else data.decode("utf-8", errors="replace")

    def listdir(self, rel: str) -> list[str]:
        """Names directly under a folder (objects and sub-folders); empty if there are none."""
        with self._store(f"cannot list {rel}"):
            files, folders = self.root.kinds(rel)
        return sorted(files | folders)

    def exists(self, rel: str) -> bool:
        with self._store(f"cannot look up {rel}"):
            return self.root.bucket.stat(self.root.name(rel)) is not None

    def size(self, rel: str) -> int | None:
        with self._store(f"cannot look up {rel}"):
            info = self.root.bucket.stat(self.root.name(rel))
        return None if info is None else info.size

    def tail(self, rel: str, *, max_bytes: int) -> str | None:
        """The last `max_bytes` of an object, or None if there is none."""
        data = self._get(rel, max_bytes=MAX_LOG_OBJECT_BYTES)
        return None if data is None else data[-max_bytes:].decode("utf-8", errors="replace")

    def read_from(self, rel: str, offset: int, *, max_bytes: int) -> tuple[bytes, int] | None:
        """What an object (a log the agent uploads whole, again and again) holds past `offset`, at
        most `max_bytes`, and where that ends; read from its start if it is now shorter."""
        data = self._get(rel, max_bytes=MAX_LOG_OBJECT_BYTES)
        if data is None:
            return None
        start = offset if offset <= len(data) else 0
        part = data[start:start + max_bytes]
        return part, start + len(part)

    def download(self, rel: str, local: Path) -> int:
        """Copy an object to `local`, whole or not at all; return its size."""
        with self._store(f"cannot download {rel}"):
            info = self.root.bucket.download(self.root.name(rel), local)
        if info is None:
            raise ClusterError(f"{self.where(rel)} is not in the bucket (it should have just been written there)")
        return info.size

    # -- writes -----------------------------------------------------------------------
    def makedirs(self, rel: str) -> None:
        """Nothing to do: a folder of a bucket is a name prefix."""

    def write_text(self, rel: str, text: str) -> None:
        """Write an object whole: a replace of the version this process wrote last (one request),
        else a create-or-replace."""
        self.write_bytes(rel, text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        name = self.root.name(rel)
        with self._store(f"cannot write {rel}"):
            with self._lock:
                known = self._versions.get(name)
            made: ObjectInfo | Refused | None = None
            if known is not None:
                made = self.root.bucket.replace(name, data, version=known)
            if not isinstance(made, ObjectInfo):
                made = self.root.put(rel, data)
        with self._lock:
            self._versions[name] = made.version

    def create_text(self, rel: str, text: str) -> bool:
        """Write an object only if there is none: True if this call made it."""
        with self._store(f"cannot write {rel}"):
            return self.root.create(rel, text.encode()) is not None

    def remove(self, rel: str) -> None:
        """Delete an object; one that is already gone counts as deleted."""
        with self._store(f"cannot delete {rel}"):
            self.root.delete(rel)
        with self._lock:
            self._versions.pop(self.root.name(rel), None)

    def ship(self, local: Path, rel: str = "") -> int:
        raise ClusterError(
            f"--ship {local}: a cluster on a bucket ({self.url.url}) has no shared folder for code; "
            "install the code on the VMs' image, or point cluster.python_path at a folder the VMs have")
