"""The lab fixtures: real sshd, real SSHFS, VMs in namespaces; skipped where they cannot run.

The harness itself (Lab, the session's addresses, cleanup) is fixtures/labs.py; the
Compute API emulator and its lab backend are fixtures/ too, importable by name.
"""
from __future__ import annotations

import itertools
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from labs import JAILS, LAB_ROOT, REPO, ROOT_TAG, Lab, clean, cluster_toml, lab_unavailable  # noqa: E402

from cluster.config import load  # noqa: E402

_index = itertools.count(1)


@pytest.fixture(scope="session")
def lab_root() -> Iterator[Path]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in LAB_ROOT.iterdir() if p.is_dir()):
        clean(folder)
    yield LAB_ROOT
    for folder in sorted(p for p in LAB_ROOT.iterdir() if p.is_dir()):
        clean(folder)
    # The session's jails' parent (the heads' key folders in it are emptied by each lab's
    # down): gone too once nothing is left in it
    jails = JAILS / ROOT_TAG
    if jails.is_dir() and not any(p.is_file() or p.is_symlink() for p in jails.rglob("*")):
        shutil.rmtree(jails, ignore_errors=True)


@pytest.fixture
def make_lab(lab_root: Path) -> Iterator[Callable[..., Lab]]:
    """Factory: `make_lab(workers=3, idle_timeout=60, ...)` writes a cluster.toml; torn down after."""
    made: list[Lab] = []

    def make(*, workers: int = 2, idle_timeout: float = 120, workers_per_vm: int = 1,
             connect_timeout: float = 5, boot_timeout: float = 30, python: str = sys.executable,
             python_path: tuple[str, ...] | None = None, share_url: str = "") -> Lab:
        """`python` and `python_path` (default: this interpreter and this checkout) are the VMs';
        `share_url`: a headless cluster on that bucket (s3://BUCKET/PREFIX)."""
        i = next(_index)
        name = f"t{i}"
        folder = lab_root / name
        clean(folder)
        folder.mkdir(parents=True)
        (folder / "cluster.toml").write_text(cluster_toml(
            name=name, index=i, workers=workers, idle_timeout=idle_timeout, workers_per_vm=workers_per_vm,
            connect_timeout=connect_timeout, boot_timeout=boot_timeout, python=python,
            python_path=(REPO,) if python_path is None else python_path, share_url=share_url))
        lab = Lab(folder, load(folder / "cluster.toml"))
        made.append(lab)
        return lab

    yield make
    for lab in made:
        clean(lab.folder)
