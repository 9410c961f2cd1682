"""Shared test helpers: run the real command line in a fresh process."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
