"""Inputs and outputs on an object-store root, on the worker's side: a key's input is
downloaded to local disk before the task runs, and its finished local temporary is
uploaded only if nothing is at its final name, so a late finisher never replaces a
peer's output (S3 If-None-Match: *, GCS ifGenerationMatch=0: the store refuses, 412).

A directory output is a prefix, `OUT/...`, published by its marker `OUT/.spotfan-done`
(a small manifest) written last, only if absent; a prefix without its marker is not an
output (a dead owner's partial upload), and its objects are removed before it is written
again. A worker killed at any instant leaves at most such a prefix, never a marker.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.errors import EnvironmentFault, PublishError, RootError, SpecError
from tasks.items import Item
from tasks.keys import NAME_MAX
from tasks.publish import Fence, Published, discard
from tasks.store.bucket import ObjectInfo, Refused
from tasks.store.root import DIR_MARKER, BucketRoot


class BucketPublisher:
    """Publishes one worker's outputs to a bucket root and fetches its inputs."""

    share_tmp = None  # no folder on the root: outputs go from local disk to the store
    fsync = False  # an upload is whole once the store answers

    def __init__(self, root: BucketRoot) -> None:
        self.root = root

    def open(self) -> None:
        """Nothing to open per chunk."""

    def close(self) -> None:
        """The connection is kept for the next chunk."""

    # -- inputs ------------------------------------------------------------------------
    def fetch(self, item: Item, into: Path) -> Path:
        """The key's input, downloaded whole to `into/<its name>` (the name kept: a task
        may go by its suffix)."""
        assert item.src is not None
        name = item.src.rsplit("/", 1)[-1]
        if name in ("", ".", "..") or len(name.encode()) > NAME_MAX:
            raise PublishError(f"the input {self.root.where(item.src)} has a name no local file can "
                               "have; rename the object")
        local = into / name
        got = self.root.bucket.download(self.root.name(item.src), local)
        if got is None:
            raise PublishError(f"the input {self.root.where(item.src)} is gone (deleted after the "
                               "run listed it); put it back, or run again to list the inputs anew")
        return local

    # -- outputs -----------------------------------------------------------------------
    def publish(self, tmp: Path, out: str, *, is_dir: bool, fence: Fence) -> Published:
        if not os.path.lexists(tmp):
            raise PublishError(f"the task returned without writing its output (expected a "
                               f"{'folder' if is_dir else 'file'} at the `out` path it was given, "
                               f"which ends in {out.rsplit('/', 1)[-1]!r})")
        try:
            if is_dir:
                return self._folder(tmp, out, fence)
            if tmp.is_dir():
                raise PublishError("the task wrote a folder where this task's output is a file")
            made = self.root.bucket.upload(tmp, self.root.name(out))
            return "ours" if isinstance(made, ObjectInfo) else "theirs"
        finally:
            discard(tmp)

    def _folder(self, tmp: Path, out: str, fence: Fence) -> Published:
        if not tmp.is_dir():
            raise PublishError("the task wrote a file where this task's output is a folder")
        files = sorted(p for p in tmp.rglob("*") if p.is_file() or p.is_symlink())
        for p in files:
            if p.is_symlink():
                raise PublishError(f"{p.relative_to(tmp)} in the output folder is a symlink: an object "
                                   "store holds files only; write the file itself")
        rels = [p.relative_to(tmp).as_posix() for p in files]
        if DIR_MARKER in rels:
            raise SpecError(f"the task wrote {DIR_MARKER!r} into its output folder: that name is the "
                            "marker spotfan publishes the folder by; rename the file")
        there = list(self.root.tree(out))
        if any(e.name == DIR_MARKER for e in there):
            return "theirs"
        if superseded(self.root, fence):
            return "fenced"
        # A prefix without its marker is a dead owner's partial upload: remove it (each
        # object only as it was listed), then write ours, every object only if absent.
        self.root.map(lambda e: self.root.delete(f"{out}/{e.name}", version=e.info.version), there)
        made = self.root.map(lambda pair: self.root.bucket.upload(pair[0], self.root.name(f"{out}/{pair[1]}")),
                             list(zip(files, rels)))
        if any(isinstance(m, Refused) for m in made) or superseded(self.root, fence):
            return "fenced"  # a peer is writing this folder too: it is theirs to finish
        manifest = json.dumps({"files": len(rels), "bytes": sum(p.stat().st_size for p in files)}).encode()
        return "ours" if self.root.create(f"{out}/{DIR_MARKER}", manifest) is not None else "theirs"


def superseded(root: BucketRoot, fence: Fence) -> bool:
    """Our claim was taken over: its next generation exists."""
    return root.bucket.stat(f"{fence.claims_dir}/{fence.unit}.{fence.generation + 1}") is not None


def published(root: BucketRoot, item: Item) -> bool:
    """Whether one key's output is published (a HEAD: for a few keys only; scans list)."""
    name = f"{item.out}/{DIR_MARKER}" if item.is_dir else item.out
    return root.bucket.stat(root.name(name)) is not None


def as_env(e: BaseException) -> str:
    """The message that stops the run for a store that cannot be used (unreachable, access
    denied, bucket gone), or "" for a key's own failure."""
    if isinstance(e, (EnvironmentFault, RootError)):
        return str(e)
    return ""
