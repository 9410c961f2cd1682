"""The PYTHONPATH of the Python processes spotfan starts on a VM: the one place it is built.

`tasks run` and the engine's other commands need the run root first (a task module
shipped to the share is imported from there), then cluster.python_path; the agent's
metrics recorder and `fab top`'s sampler need no user code, so they get no run root
(a dead mount must never hang their start).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tasks.direct import COMMAND_ENV as SFTP_COMMAND_ENV


def pythonpath(*, root: str | None = None, extra: Iterable[str] | str = ()) -> str:
    """`root` (if any) then `extra` (cluster.python_path, as a list or already joined), ":"-joined."""
    parts = [extra] if isinstance(extra, str) else list(extra)
    seen: list[str] = []
    for entry in ([root] if root else []) + [p for part in parts for p in part.split(":")]:
        if entry and entry not in seen:
            seen.append(entry)
    return ":".join(seen)


def run_env(*, root: str, extra: Iterable[str] | str, home: Path) -> dict[str, str]:
    """The environment of the agent's `tasks run`: its PYTHONPATH, and how it reaches the head
    itself (mount.sh's sftp.cmd) to publish small outputs over its own session (tasks.direct);
    without that file it publishes through the mount."""
    env = {**os.environ, "PYTHONPATH": pythonpath(root=root, extra=extra)}
    sftp = home / "sftp.cmd"
    if sftp.is_file():
        env[SFTP_COMMAND_ENV] = sftp.read_text().strip()
    return env
