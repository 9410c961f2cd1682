"""The one atomic write of the cluster layer's local files: a temporary beside the file, then a rename.

A reader never sees half a file under its final name, and a crash leaves at most a
hidden temporary (`.NAME.*.tmp`) behind. The temporary's name is unique across
machines and processes: lab VMs and agents on the share may share pids.
"""
from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path


def atomic_write(path: Path, data: bytes | str, *, mode: int = 0o644, fsync: bool = False,
                 make_parents: bool = False) -> None:
    """Write `path` whole: a temporary in the same folder, closed (and fsynced), chmod, renamed."""
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    host = socket.gethostname().replace("/", "_")[:40]
    tmp = path.with_name(f".{path.name}.{host}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
