"""Local staging folders: a live runner's is never swept, whatever its name says; a dead one's is."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tasks.staging import Staging, sweep

HOLD = """
import sys, time
from pathlib import Path
from tasks.staging import Staging
s = Staging(sys.argv[1], parent=Path(sys.argv[2]))
(s.create() / "out.tmp").write_text("half")
print("ready", flush=True)
time.sleep(60)
"""


def hold(owner: str, parent: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, owner, str(parent)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_a_live_runners_folder_is_kept_even_when_its_name_says_a_gone_pid(tmp_path: Path) -> None:
    # The name a runner in another PID namespace (a lab VM, a container) would have:
    # this host's name and a pid that is no process here. Only the lock tells.
    owner = f"{socket.gethostname()}-999999-abcdef"
    p = hold(owner, tmp_path)
    try:
        assert sweep(tmp_path) == 0
        assert (tmp_path / f"spotfan-{owner}" / "out.tmp").read_text() == "half"
    finally:
        p.kill()
        p.wait()
    # Its owner killed outright: the kernel dropped the lock, the next sweep removes both.
    assert sweep(tmp_path) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_a_closed_staging_leaves_nothing_and_a_folder_without_a_lock_is_left_alone(tmp_path: Path) -> None:
    s = Staging("host-1-aaaaaa", parent=tmp_path)
    (s.create() / "x").write_text("x")
    assert sweep(tmp_path) == 0, "our own lock is held by us"
    s.close()
    assert list(tmp_path.iterdir()) == []
    legacy = tmp_path / "spotfan-host-2-bbbbbb"  # made by an older spotfan: cannot be told dead
    legacy.mkdir()
    assert sweep(tmp_path) == 0 and legacy.is_dir()


def test_a_stopped_owner_keeps_its_folder(tmp_path: Path) -> None:
    """Frozen (SIGSTOP) is not dead: the lock stays held."""
    p = hold("host-3-cccccc", tmp_path)
    try:
        p.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        assert sweep(tmp_path) == 0
        assert (tmp_path / "spotfan-host-3-cccccc" / "out.tmp").exists()
    finally:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


def test_an_older_versions_folder_goes_by_its_old_rule_this_host_and_a_gone_pid(tmp_path: Path) -> None:
    host = socket.gethostname()
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is no process now
    gone = tmp_path / f"spotfan-{host}-{p.pid}-aaaaaa"
    alive = tmp_path / f"spotfan-{host}-{os.getpid()}-bbbbbb"
    elsewhere = tmp_path / f"spotfan-another-host-{p.pid}-cccccc"
    for d in (gone, alive, elsewhere):
        d.mkdir()
    assert sweep(tmp_path) == 1
    assert not gone.exists() and alive.is_dir() and elsewhere.is_dir()
