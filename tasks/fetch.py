"""Small inputs fetched in batches over the runner's SFTP session (a task's `fetch=True`).

Through the SSHFS mount (caching off) a task's `src.read_bytes()` costs about ten round
trips, one after another: a lookup and an attribute read per folder of the path, open,
fstat, read, close. For a task that reads only its own input (declared with
`@filetask(..., fetch=True)` or `tasks run --cmd ... --fetch`), the runner instead reads
a chunk's inputs on its session before it sends the chunk to a worker: every lstat and
open, then every read, then every close, each phase all in flight at once. The task gets
a local copy with the input's own name, bytes and mtime, under the runner's staging
folder, kept until the chunk is collected.

Nothing here is needed for correctness: an input that is not a regular file (a symbolic
link included), is bigger than MAX_BYTES, changes while read, or that the session cannot
read, is not fetched, and its task reads it through the mount as before.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tasks import sftp
from tasks.direct import Direct
from tasks.items import Item

if TYPE_CHECKING:
    from tasks.worker import Chunk

logger = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # bigger inputs are read through the mount (their round trips matter less)
READ_BLOCK = 64 * 1024  # bytes per READ request (every server gives that much)
GROUP = 32  # inputs read per batch of requests: at most GROUP x MAX_BYTES in memory at once
CHUNK_BYTES = 64 << 20  # a chunk's fetched inputs on local disk, at most; the rest via the mount
FOLDER_PREFIX = "fetched-"  # never a temporary's name (those start with the worker's pid)


def folder(staging: Path, chunk_id: int) -> Path:
    """Where the inputs of chunk `chunk_id` are put."""
    return staging / f"{FOLDER_PREFIX}{chunk_id}"


def for_chunk(direct: Direct | None, staging: Path | None, chunk_id: int,
              items: Sequence[Item]) -> tuple[str, ...]:
    """A chunk's local copies (see `fetch`), or () when its task does not fetch."""
    if direct is None or staging is None:
        return ()
    return fetch(direct, items, folder(staging, chunk_id))


def retire(staging: Path | None, chunk: Chunk) -> None:
    """Remove a chunk's local copies once it is over (collected, or its pool broke)."""
    if staging is not None and chunk.sources:
        discard(folder(staging, chunk.id))


def fetch(direct: Direct, items: Sequence[Item], into: Path) -> tuple[str, ...]:
    """Each item's local copy of its input ("" for one left to the mount), written under
    `into` at the input's own relative path."""
    got: list[str] = [""] * len(items)
    total = 0
    for start in range(0, len(items), GROUP):
        group = [(i, items[i]) for i in range(start, min(start + GROUP, len(items)))
                 if items[i].src is not None]
        datas = direct.using(lambda s: _read_group(s, direct.remote, [it.src for _, it in group]),
                             what="fetching inputs")
        if datas is None:
            break
        for (i, it), found in zip(group, datas):
            if found is None or total + len(found[0]) > CHUNK_BYTES:
                continue
            local = into / it.src
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(found[0])
                if found[1] is not None:
                    os.utime(local, (found[1], found[1]))
            except OSError as e:  # the local disk: the task reads through the mount instead
                logger.info("input %s not fetched (%s): read through the mount", it.src, e)
                local.unlink(missing_ok=True)
                continue
            total += len(found[0])
            got[i] = str(local)
    return tuple(got)


def discard(into: Path) -> None:
    """Remove a chunk's fetched inputs."""
    shutil.rmtree(into, ignore_errors=True)


def _read_group(session: sftp.Session, remote: str,
                srcs: Sequence[str]) -> list[tuple[bytes, int | None] | None]:
    """Each input's bytes and mtime, or None where it is left to the mount. An input is
    looked at with LSTAT (not FSTAT): a symbolic link is left to the mount, which resolves
    it on this machine as the task would, where the server would resolve it on the head."""
    first = session.run([req for src in srcs for req in (sftp.lstat(f"{remote}/{src}"),
                                                         sftp.open_read(f"{remote}/{src}"))])
    handles = [r.data if r.ok else None for r in first[1::2]]
    sizes = [_worth_it(st) for st in first[0::2]]
    wanted = [i for i, (h, a) in enumerate(zip(handles, sizes)) if h is not None and a is not None]
    reads = session.run([sftp.read(handles[i], 0, READ_BLOCK) for i in wanted])  # type: ignore[arg-type]
    out: list[tuple[bytes, int | None, int] | None] = [None] * len(srcs)
    more: list[tuple[int, bytes, int]] = []  # (index, handle, size) of inputs over one block
    for i, r in zip(wanted, reads):
        size, mtime = sizes[i]  # type: ignore[misc]
        data = r.data if r.kind == sftp.DATA else b"" if r.code == sftp.EOF else None
        if data is None or len(data) > size or (len(data) < size and len(data) < READ_BLOCK):
            continue  # unreadable, or it changed since its LSTAT
        out[i] = (data, mtime, size)
        if size > len(data):
            more.append((i, handles[i], size))  # type: ignore[arg-type]
    if more:
        _read_rest(session, out, more)
    opened = [h for h in handles if h is not None]
    if opened:
        session.run([sftp.close(h) for h in opened])  # answers do not matter
    return [(o[0], o[1]) if o is not None else None for o in out]


def _worth_it(st_reply: sftp.Reply) -> tuple[int, int | None] | None:
    """(size, mtime) of a regular file small enough to fetch, from its LSTAT; else None."""
    if st_reply.kind != sftp.ATTRS:
        return None
    a = sftp.attrs(st_reply)
    if a.size is None or a.mode is None or not stat.S_ISREG(a.mode) or a.size > MAX_BYTES:
        return None
    return a.size, a.mtime


def _read_rest(session: sftp.Session, out: list, more: list[tuple[int, bytes, int]]) -> None:
    """Read the remaining blocks of inputs bigger than one READ_BLOCK, all at once."""
    reqs, owners = [], []
    for idx, h, size in more:
        for off in range(len(out[idx][0]), size, READ_BLOCK):
            reqs.append(sftp.read(h, off, min(READ_BLOCK, size - off)))
            owners.append(idx)
    parts: dict[int, list[bytes]] = {idx: [out[idx][0]] for idx, _, _ in more}
    for idx, r in zip(owners, session.run(reqs)):
        if r.kind == sftp.DATA and parts.get(idx) is not None:
            parts[idx].append(r.data)
        else:
            parts[idx] = None  # type: ignore[assignment]
    for idx, _, size in more:
        blocks = parts[idx]
        data = b"".join(blocks) if blocks is not None else b""
        out[idx] = (data, out[idx][1], size) if blocks is not None and len(data) == size else None
