"""Which filesystem a path is on, from /proc/mounts alone: `python -m tasks` asks before it
imports anything else (tasks/__main__.py), so this module imports nothing but `os`."""
from __future__ import annotations

import os


def is_network(path: str | os.PathLike[str]) -> bool:
    """True if `path` lives on a network or FUSE filesystem (each operation a round trip)."""
    try:
        target = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
        return fstype.startswith(("fuse", "nfs", "cifs", "smb"))
    except OSError:
        return False
