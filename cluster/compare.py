"""Whether a file of a push or pull is at its destination already: same size and mtime, or with `checksum` the same bytes."""
from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from cluster.sides import Entry, Side, Tree

BLOCK_BYTES = 1 << 20  # read at a time to compare content


def listed(dst: Side, to: PurePosixPath, single: bool) -> dict[str, Entry] | None:
    """What is at the destination already, by rel path: one listing per folder instead of one
    stat per file (each a round trip). None for a single file (one stat says it)."""
    if single:
        return None
    found = dst.walk(to)
    return {e.rel: e for e in found.files} if isinstance(found, Tree) else {}


def same(src: Side, dst: Side, s: PurePosixPath, d: PurePosixPath, e: Entry, *, checksum: bool,
         there: dict[str, Entry] | None) -> bool:
    if there is not None:
        have = there.get(e.rel)
        size, mtime = (have.size, have.mtime) if have else (None, None)
    else:
        st = dst.stat(d)
        size, mtime = (st.st_size, int(st.st_mtime or 0)) if st is not None else (None, None)
    if size != e.size:
        return False
    if not checksum:
        return mtime == e.mtime
    return digest(src, s, e.size) == digest(dst, d, e.size)


def digest(side: Side, rel: PurePosixPath, size: int) -> str:
    h = hashlib.sha256()
    with side.reader(rel, 0, size) as f:
        for _ in range(size // BLOCK_BYTES + 2):
            block = f.read(BLOCK_BYTES)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
