"""What a push or pull that stopped leaves behind: part files kept to continue from or removed, and whether the head's disk is full."""
from __future__ import annotations

import logging
from pathlib import PurePosixPath

import paramiko

from cluster.sides import RemoteSide, Side, Tree

logger = logging.getLogger(__name__)

RESUME_MIN_BYTES = 1 << 20  # a part file at least this big is continued, a smaller one restarted


def left(side: Side, part: PurePosixPath, *, resumable: bool, kept: list[str]) -> None:
    """A copy that stopped: its part file kept to continue from if that much of it is there,
    else removed (best effort: the connection may be what failed)."""
    try:
        have = side.stat(part) if resumable else None
        if have is not None and (have.st_size or 0) >= RESUME_MIN_BYTES:
            kept.append(str(part) if isinstance(side, RemoteSide) else str(side.path(part)))
        else:
            side.remove(part)
    except (OSError, EOFError, paramiko.SSHException) as e:
        logger.info("%s: not removed: %s", side.describe(part), e)


def disk_free(remote: RemoteSide, where: PurePosixPath, tree: Tree, failed: dict[str, str]) -> int | None:
    """Bytes free on the head's disk if too few for the files a push could not copy (its disk
    is full: the reason SFTP's version 3 cannot give), else None."""
    need = sum(e.size for e in tree.files if not e.rel or e.rel in failed)  # a single file's rel is ""
    free = remote.free_bytes(where)
    return free if free is not None and free < need else None
