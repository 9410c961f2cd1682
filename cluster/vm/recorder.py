"""The agent's metrics recorder: one `python -m cluster.vm.top record` child while tasks run, ended by its pid."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from cluster.vm.env import pythonpath

logger = logging.getLogger("cluster.agent")

METRICS_INTERVAL_S = 5.0  # one metric sample per this many seconds while tasks run (~0.4% of a core)
RECORDER_MAX_S = 6 * 3600.0  # one recorder's lifetime; the agent starts another if tasks still run
RECORDER_RETRY_S = 30.0  # after a recorder failed, wait this long before starting another
MAX_RECORDER_STARTS = 200  # per boot: a recorder that keeps failing is given up on
RECORDER_STOP_TIMEOUT_S = 10.0  # SIGTERM ends its sample at once; then SIGKILL
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Recorder:
    """Keeps one recorder running while `keep(busy=True)` says tasks run, none otherwise."""

    def __init__(self, *, python: str, python_path: str, home: Path, interval: float,
                 nvidia_smi: str = "nvidia-smi") -> None:
        self.python = python
        self.python_path = python_path
        self.home = home  # its cwd and its log: the VM's own disk (a dead mount must not hang its start)
        self.interval = interval  # seconds per sample; 0: record none
        self.nvidia_smi = nvidia_smi  # the driver's tool, for GPU use without nvidia-ml-py
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.next_start = 0.0  # not before this monotonic time (after a failed recorder)

    def keep(self, *, busy: bool, can_start: bool, to: Path) -> None:
        """One recorder while `busy` (started only when `can_start`: the share is there), none otherwise."""
        rec = self.proc
        if rec is not None and rec.poll() is not None:
            self.proc = None
            if rec.returncode != 0:
                logger.warning("metrics recorder (pid %d) exited %d; see %s", rec.pid,
                               rec.returncode, self.home / "metrics.log")
                self.next_start = time.monotonic() + RECORDER_RETRY_S
        if not busy:
            self.stop()
        elif (self.proc is None and can_start and self.interval > 0 and self.starts < MAX_RECORDER_STARTS
              and time.monotonic() >= self.next_start):
            self._start(to)

    def _start(self, to: Path) -> None:
        argv = [self.python, "-m", "cluster.vm.top", "--nvidia-smi", self.nvidia_smi, "record", "--to", str(to),
                "--interval", f"{self.interval:g}", "--for", f"{RECORDER_MAX_S:g}"]
        env = {**os.environ, "PYTHONPATH": pythonpath(extra=self.python_path)}
        self.starts += 1
        try:
            with open(self.home / "metrics.log", "ab") as err:
                self.proc = subprocess.Popen(argv, cwd=self.home, env=env, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent)
        except OSError as e:
            logger.warning("cannot start the metrics recorder: %s", e)
            self.next_start = time.monotonic() + RECORDER_RETRY_S
            return
        logger.info("recording metrics to %s (pid %d, every %gs)", to, self.proc.pid, self.interval)

    def stop(self) -> None:
        """End the recorder by its pid: SIGTERM (it writes its last sample), then SIGKILL."""
        rec, self.proc = self.proc, None
        if rec is None or rec.poll() is not None:
            return
        rec.terminate()
        try:
            rec.wait(timeout=RECORDER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait(timeout=RECORDER_STOP_TIMEOUT_S)
        logger.info("stopped recording metrics (pid %d)", rec.pid)


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM it when the agent dies, even by SIGKILL (Linux only;
    elsewhere the agent's own `stop` is the only way it ends)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
