"""Which GPUs each worker process sees: one CUDA_VISIBLE_DEVICES group per process, held for its whole life.

`tasks run --gpus N [--gpus-per-worker K]` splits the N GPUs this machine shows into
N/K groups and starts one worker process per group. A process takes its group in the
pool's per-process initializer, before the task's module is imported and before its
`init=` runs, so a model loaded there lands on that process's GPUs, and a command task
inherits the variable. Groups are handed out through a small shared table of owner pids:
a new process takes the first group whose owner is gone, so a rebuilt pool (after a
worker died) hands out exactly the same groups again, and no two live processes share one.

When the runner itself already sees a CUDA_VISIBLE_DEVICES list (say "2,3"), the groups
are made of those entries, since a child's own list replaces its parent's rather than
narrowing it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tasks.errors import SpecError

CUDA_ENV = "CUDA_VISIBLE_DEVICES"
MAX_GPUS = 64  # `--gpus`: more than any one machine has


@dataclass(frozen=True)
class GpuGroups:
    """The CUDA_VISIBLE_DEVICES value of each worker process, in order."""

    groups: tuple[str, ...]  # e.g. ("0", "1", "2", "3") or ("0,1", "2,3")


def split(gpus: int, per_worker: int, *, visible: str | None = None) -> GpuGroups:
    """`gpus` GPUs in groups of `per_worker`; `visible` is the runner's own CUDA_VISIBLE_DEVICES."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise SpecError(f"--gpus must be a whole number from 1 to {MAX_GPUS}, got {gpus!r}")
    if isinstance(per_worker, bool) or not isinstance(per_worker, int) or not 1 <= per_worker <= gpus:
        raise SpecError(f"--gpus-per-worker must be a whole number from 1 to --gpus ({gpus}), got {per_worker!r}")
    if gpus % per_worker:
        raise SpecError(f"--gpus {gpus} does not split into groups of --gpus-per-worker {per_worker}: "
                        f"{gpus % per_worker} GPU(s) would sit idle; pick a divisor of {gpus}")
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
    if len(devices) < gpus:
        raise SpecError(f"--gpus {gpus}, but {CUDA_ENV}={visible!r} shows only {len(devices)}: "
                        f"ask for at most {len(devices)}, or unset {CUDA_ENV}")
    return GpuGroups(tuple(",".join(devices[i:i + per_worker]) for i in range(0, gpus, per_worker)))


def take(groups: tuple[str, ...], owners: Any, lock: Any) -> int:
    """In a new worker process: take the first group no live process holds, set CUDA_VISIBLE_DEVICES
    to it for this process's life, and return its index. `owners` is a shared array of one pid
    per group (0: free), `lock` its lock."""
    me = os.getpid()
    with lock:
        free = [i for i in range(len(groups)) if owners[i] in (0, me) or not _alive(int(owners[i]))]
        if not free:  # cannot happen while the pool has one process per group
            raise RuntimeError(f"no free GPU group among {len(groups)}: more worker processes than groups")
        index = free[0]
        owners[index] = me
    os.environ[CUDA_ENV] = groups[index]
    return index


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
