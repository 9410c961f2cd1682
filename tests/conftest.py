"""Shared test helpers: run the real command line in a fresh process, wait for a condition,
tell that a killed runner's processes are gone."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 180  # a wait_for ends by then unless told otherwise


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """`python -m tasks ARGS` in `cwd`, as a user would type it."""
    return subprocess.run([sys.executable, "-m", "tasks", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def write_module(tmp_path: Path):
    """Write a task module into tmp_path (the run root and the cwd of the CLI)."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write


def wait_for(what: Callable[[], object], message: str, timeout: float = WAIT_S,
             alive: subprocess.Popen | None = None) -> None:
    """Poll `what` until it is true; AssertionError after `timeout`, or at once if `alive`
    (a runner) exits first (its stderr in the message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the runner exited ({alive.returncode}) before: {message}; "
                                 f"stderr: {alive.stderr.read() if alive.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting: {message}")


def all_gone(family: Iterable[psutil.Process]) -> bool:
    """Every one of these processes has exited (a zombie counts as gone)."""
    for p in family:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True
