"""Processes that die with their parent: PR_SET_PDEATHSIG, so that no worker, forkserver or
command outlives (and publishes after) the runner that started it."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(runner_pid: int | None = None) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits. If the runner
    (`runner_pid`) is already gone, because it died before we asked, exit now."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not Linux, or refused: nothing to do but go on
    if runner_pid is not None:
        try:
            os.kill(runner_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass
