"""What the commands that only read (collect, failures, report, logs, a dry run) take from an
object-store root: the root opened and checked, outputs downloaded to local disk for a
reader, and JSON-lines objects (metric samples). Nothing here writes to the bucket.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.items import Item
from tasks.scan import DoneKeys
from tasks.store.root import DIR_MARKER, BucketRoot
from tasks.store.scan import scan_done


@contextmanager
def opened(url: str) -> Iterator[BucketRoot]:
    """The root of `url`, checked (NoSuchBucket, StoreAccessError, StoreUnreachable before
    anything else is asked), closed at the end."""
    root = BucketRoot(url)
    try:
        root.check()
        yield root
    finally:
        root.close()


class BucketOutputs:
    """A task's outputs on a bucket root, each downloaded to a local temporary folder for
    its reader (a reader takes a local Path) and removed once read, so the local disk
    holds at most one output per reading thread."""

    def __init__(self, root: BucketRoot) -> None:
        self.root = root
        self.label = str(root)
        self._local: Path | None = None

    def __enter__(self) -> "BucketOutputs":
        self._local = Path(tempfile.mkdtemp(prefix="spotfan-collect-"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

    def items(self, task: Any) -> Sequence[Item]:
        return task.items(self.root)  # type: ignore[no-any-return]

    def done(self, items: Sequence[Item]) -> DoneKeys:
        return scan_done(self.root, items)

    def local(self, item: Item) -> Path:
        """The output of `item`, downloaded whole (a directory output: every object under
        its prefix but the marker). FileNotFoundError if it is gone since the listing."""
        assert self._local is not None, "use BucketOutputs in a with block"
        path = self._local / item.out.rstrip("/")
        if not item.is_dir:
            if self.root.bucket.download(self.root.name(item.out), path) is None:
                raise FileNotFoundError(f"{self.root.where(item.out)} is gone (deleted after it was listed)")
            return path
        out = item.out.rstrip("/")
        names = [e.name for e in self.root.tree(out) if e.name != DIR_MARKER and not e.name.endswith("/")]
        for n in names:  # the bucket is untrusted input: no name may reach outside the copy
            if any(part in ("", ".", "..") for part in n.split("/")):
                raise ValueError(f"{self.root.where(out)}/{n} is not a file name a local folder can hold")
        path.mkdir(parents=True, exist_ok=True)
        got = self.root.map(lambda n: self.root.bucket.download(self.root.name(f"{out}/{n}"), path / n), names)
        if any(g is None for g in got):
            raise FileNotFoundError(f"objects under {self.root.where(out)}/ are gone (deleted after they were listed)")
        return path

    def release(self, path: Path) -> None:
        """Remove a local copy once it is read."""
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def jsonl_objects(root: BucketRoot, folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(object name, row) for every line of every `*.jsonl` object directly in `folder`, in
    name order, as tasks.records.read_jsonl reads a folder; torn or foreign lines skipped."""
    names = sorted(n for n in root.names(folder) if n.endswith(".jsonl"))
    for name, data in zip(names, root.map(lambda n: root.read(f"{folder}/{n}"), names)):
        for line in (data or b"").decode("utf-8", "replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield name, row
