"""The lab fixture: real sshd, real SSHFS, VMs in namespaces; skipped where it cannot run.

Every test cluster lives under one fixed folder, LAB_ROOT, so that a crashed earlier
session's VMs and heads are found there by their recorded pids and killed first.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cluster import bootstrap
from cluster.config import ClusterConfig, load
from cluster.lab import LabProvider

REPO = Path(__file__).resolve().parents[2]
LAB_ROOT = Path(os.environ.get("SPOTFAN_TEST_LAB_ROOT", "/tmp/spotfan-lab-tests"))
FAB = Path(sys.executable).parent / "fab"
FAB_TIMEOUT_S = 180
# The lab's head user and jail are machine-wide: name them after LAB_ROOT, so that test
# sessions with different roots never share one.
ROOT_TAG = hashlib.sha256(str(LAB_ROOT).encode()).hexdigest()[:6]
WAIT_POLL_S = 0.25


def lab_unavailable() -> str | None:
    """Why the lab cannot run here, or None."""
    if sys.platform != "linux":
        return "the lab needs Linux namespaces"
    if os.geteuid() != 0:
        return "the lab needs root (namespaces, sshd): run the suite as root"
    for tool in ("unshare", "sshfs", "fusermount3", "ssh-keygen", "flock"):
        if shutil.which(tool) is None:
            return f"the lab needs `{tool}` (apt-get install openssh-server sshfs fuse3 util-linux)"
    if not os.access("/usr/sbin/sshd", os.X_OK):
        return "the lab needs /usr/sbin/sshd (apt-get install openssh-server)"
    if not os.path.exists("/dev/fuse"):
        return "the lab needs /dev/fuse for sshfs"
    if not FAB.exists():
        return f"no `fab` next to {sys.executable}: pip install fabric"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare is not permitted here: {probe.stderr.decode().strip()}"
    return None


def lab_processes(folder: Path) -> list[str]:
    """Command lines of live processes that belong to a lab under `folder`."""
    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if str(folder) in cmd:
            out.append(f"{p.pid}: {cmd}")
    return out


def _clean(folder: Path) -> None:
    """Kill a lab's VMs and head by their recorded pids, then remove its files."""
    toml = folder / "cluster.toml"
    if toml.exists():
        try:
            bootstrap.down(load(toml))
        except Exception as e:  # leftovers of a crashed run may be half-made; go on
            print(f"cleanup of {folder}: {e}", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)


class Lab:
    """One test cluster: its cluster.toml, its provider, and `fab` run against it."""

    def __init__(self, folder: Path, config: ClusterConfig) -> None:
        self.folder = folder
        self.config = config
        self.provider = LabProvider.from_config(config)
        self.share = config.head.share

    def fab(self, *args: str, timeout: float = FAB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SPOTFAN_CONFIG": str(self.folder / "cluster.toml")}
        return subprocess.run([str(FAB), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def fab_ok(self, *args: str, timeout: float = FAB_TIMEOUT_S) -> str:
        r = self.fab(*args, timeout=timeout)
        assert r.returncode == 0, f"fab {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    def statuses(self) -> dict[str, str]:
        return {i.name: i.status.value for i in self.provider.list()}

    def wait_for(self, what: str, cond: Callable[[], bool], *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / WAIT_POLL_S) + 1):
            if cond():
                return
            if time.monotonic() > deadline:
                break
            time.sleep(WAIT_POLL_S)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


_index = itertools.count(1)
# Concurrent test sessions (developers running the suite side by side) must not bind
# the same VM addresses or head ports: each session takes its own 127.X.0.0/16 and its
# own block of 100 ports, from its pid unless SPOTFAN_TEST_OCTET / SPOTFAN_TEST_PORT_BASE
# pin them (give side-by-side sessions different SPOTFAN_TEST_LAB_ROOT values too).
SESSION_OCTET = int(os.environ.get("SPOTFAN_TEST_OCTET") or 20 + os.getpid() % 200)
PORT_BASE = int(os.environ.get("SPOTFAN_TEST_PORT_BASE") or 22300 + (os.getpid() % 300) * 100)


@pytest.fixture(scope="session")
def lab_root() -> Iterator[Path]:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    LAB_ROOT.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in LAB_ROOT.iterdir() if p.is_dir()):
        _clean(folder)
    yield LAB_ROOT
    for folder in sorted(p for p in LAB_ROOT.iterdir() if p.is_dir()):
        _clean(folder)


@pytest.fixture
def make_lab(lab_root: Path) -> Iterator[Callable[..., Lab]]:
    """Factory: `make_lab(workers=3, idle_timeout=60, ...)` writes a cluster.toml; torn down after."""
    made: list[Lab] = []

    def make(*, workers: int = 2, idle_timeout: float = 120, workers_per_vm: int = 1,
             connect_timeout: float = 5, boot_timeout: float = 30) -> Lab:
        i = next(_index)
        name = f"t{i}"
        folder = lab_root / name
        _clean(folder)
        folder.mkdir(parents=True)
        (folder / "cluster.toml").write_text(f"""
[cluster]
name = "{name}"
provider = "lab"
workers = {workers}
idle_timeout = {idle_timeout}
workers_per_vm = {workers_per_vm}
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"

[head]
address = "127.0.0.1"
port = {PORT_BASE + i}
share = "share"
user = "sf{ROOT_TAG}-{name}"
jail = "/srv/spotfan-tests/{ROOT_TAG}/{name}"

[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/known_hosts"
connect_timeout = {connect_timeout}
boot_timeout = {boot_timeout}

[lab]
state_dir = "state"
address_prefix = "127.{SESSION_OCTET}.{i}."
""")
        lab = Lab(folder, load(folder / "cluster.toml"))
        made.append(lab)
        return lab

    yield make
    for lab in made:
        _clean(lab.folder)
