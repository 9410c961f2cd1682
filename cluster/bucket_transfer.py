"""`fab push` and `fab pull` on a headless cluster: files and folders between the laptop and the bucket.

The same report as the head's (cluster.transfer.TransferReport). An object appears whole or
not at all (one PutObject, or a multipart upload completed at the end), and a push writes
only where no object is (`upload` only if absent): a file whose object is there with the
same size is skipped, so running the same command again copies only what is missing; one
whose object differs is not replaced (a finished output is never overwritten) but reported.
A pull downloads each object into a hidden temporary beside its final name, renamed into
place; a local file of the same size is skipped; nothing is deleted on either side. Object
names are untrusted input: one that is not a plain relative path is not pulled.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from cluster.bucket_share import BucketShare
from cluster.errors import ClusterError, UsageError
from cluster.sides import plain
from cluster.transfer import DEFAULT_JOBS, MAX_JOBS, Options, Progress, TransferReport, pull_paths, push_paths
from tasks.errors import RootError
from tasks.layout import BOOKKEEPING_DIR
from tasks.store.bucket import ObjectInfo, Refused

_Copy = tuple[Path, str, int]  # a local file, its object (root-relative), its size


def push(share: BucketShare, local: Path, dest: str = "", *, opts: Options = Options(),
         on_progress: Callable[[Progress], None] | None = None) -> TransferReport:
    """Copy a local file or folder to the bucket: to DEST, or by default to its own name at the root."""
    _check(opts)
    local, to = push_paths(local, dest)
    files, not_files = _local_files(local)
    share.open()
    have = _objects(share, to.as_posix())
    todo: list[_Copy] = []
    failed: dict[str, str] = {}
    for path, rel in files:
        name = (to / rel).as_posix() if rel else to.as_posix()
        size = path.stat().st_size
        there = have.get(name)
        if there is None:
            todo.append((path, name, size))
        elif there.size != size:
            failed[name] = (f"{share.where(name)} is there with {there.size} bytes, this file has {size}: not "
                            "replaced (spotfan never overwrites an object); delete it first to push this one")
    def one(c: _Copy) -> None:
        made = share.root.bucket.upload(c[0], share.root.name(c[1]))
        if isinstance(made, Refused):
            raise ClusterError(f"{share.where(c[1])} appeared meanwhile (another push?): not replaced")

    return _run("push", str(local), to.as_posix(), todo, one, opts, on_progress, files=len(files),
                skipped=len(files) - len(todo) - len(failed), failed=failed, not_files=not_files)


def pull(share: BucketShare, src: str, local: Path | None = None, *, opts: Options = Options(),
         on_progress: Callable[[Progress], None] | None = None) -> TransferReport:
    """Copy an object or a folder of the bucket here: to LOCAL, or by default to its name in the current folder."""
    _check(opts)
    frm, target = pull_paths(src, local, root="the bucket's root")
    share.open()
    objects = _objects(share, frm.as_posix())
    todo: list[_Copy] = []
    not_files: list[str] = []
    for name, info in sorted(objects.items()):
        rel = name[len(frm.as_posix()):].lstrip("/")
        parts = rel.split("/") if rel else []
        if not all(plain(p) for p in parts) or (parts and parts[0] == BOOKKEEPING_DIR):
            not_files.append(name)  # a name that is no plain path (or the bookkeeping): not pulled
            continue
        path = target.joinpath(*parts)
        if path.is_file() and path.stat().st_size == info.size:
            continue
        todo.append((path, name, info.size))
    if not objects:
        raise UsageError(f"`fab pull {src}`: no object {share.where(frm.as_posix())} and none under it")
    def one(c: _Copy) -> None:
        if share.root.bucket.download(share.root.name(c[1]), c[0]) is None:
            raise ClusterError(f"{share.where(c[1])} is gone (deleted meanwhile)")

    return _run("pull", src, str(target), todo, one, opts, on_progress, files=len(objects) - len(not_files),
                skipped=len(objects) - len(not_files) - len(todo), failed={}, not_files=not_files)


def _check(opts: Options) -> None:
    if not 0 <= opts.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs {opts.jobs} must be from 1 to {MAX_JOBS}")
    if opts.checksum:
        raise UsageError("--checksum compares files over SFTP; on a bucket a file is skipped when its object "
                         "has the same size, and an object is never replaced: run without --checksum")


def _local_files(local: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """Regular files of LOCAL with their "/"-paths relative to it ("" for LOCAL itself), and what is not one."""
    if local.is_file() and not local.is_symlink():
        return [(local, "")], []
    files, not_files = [], []
    for path in sorted(local.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            not_files.append(str(path))
        elif path.is_file():
            files.append((path, path.relative_to(local).as_posix()))
    return files, not_files


def _objects(share: BucketShare, rel: str) -> dict[str, ObjectInfo]:
    """Root-relative name -> object, for the object `rel` and every object under `rel/`."""
    root = share.root
    found: dict[str, ObjectInfo] = {}
    try:
        one = root.bucket.stat(root.name(rel))
        if one is not None:
            found[rel] = one
        for e in root.tree(rel):
            found[f"{rel}/{e.name}"] = e.info
    except RootError as e:
        raise ClusterError(f"{share.where(rel)}: {e}") from e
    return found


def _run(direction: str, source: str, dest: str, todo: list[_Copy], one: Callable[[_Copy], None], opts: Options,
         on_progress: Callable[[Progress], None] | None, *, files: int, skipped: int, failed: dict[str, str],
         not_files: list[str]) -> TransferReport:
    """Copy `todo` with up to --jobs at once, reporting progress as each copy ends."""
    started = time.monotonic()
    total = sum(c[2] for c in todo)
    done = sent = 0
    interrupted = False
    with ThreadPoolExecutor(min(opts.jobs or DEFAULT_JOBS, max(1, len(todo))),
                            thread_name_prefix="spotfan-bucket-copy") as pool:
        futures = {pool.submit(one, c): c for c in todo}
        try:
            for f in as_completed(futures):
                c = futures[f]
                try:
                    f.result()
                    done, sent = done + 1, sent + c[2]
                except (ClusterError, RootError, OSError) as e:
                    failed[c[1]] = str(e)
                if on_progress is not None:
                    on_progress(Progress(len(todo), done, total, sent, time.monotonic() - started))
        except KeyboardInterrupt:
            interrupted = True
            for f in futures:
                f.cancel()
    return TransferReport(direction=direction, source=source, dest=dest, files=files, copied=done,  # type: ignore[arg-type]
                          skipped=skipped, resumed=0, bytes=sent, seconds=time.monotonic() - started,
                          not_files=not_files, failed=failed, interrupted=interrupted)

