"""The two-machines fixture: real SSHFS mounts of one share served by a real sshd.

(Not a conftest.py: tests/cluster imports its own conftest by that bare name.)
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

# The options the cluster mounts with (cluster/vm/mount.sh): no caching, so claims work.
FUSE_OPTS = ("reconnect,ServerAliveInterval=15,ServerAliveCountMax=3,dir_cache=no,"
             "attr_timeout=0,entry_timeout=0,negative_timeout=0")
SSHD_START_TIMEOUT_S = 10



def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run sshd and mount FUSE"
    for tool in ("sshfs", "fusermount3", "ssh-keygen"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install sshfs openssh-client)"
    if not os.access("/usr/sbin/sshd", os.X_OK) or not os.path.exists("/dev/fuse"):
        return "needs /usr/sbin/sshd and /dev/fuse (apt-get install openssh-server fuse3)"
    return None


def sftp_command(share: Path) -> str:
    """The command that opens an SFTP session to the share's sshd (SPOTFAN_SFTP_COMMAND)."""
    return (share.parent / "sftp.cmd").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory) -> Iterator[tuple[Path, Path, Path]]:
    """(share, mount_a, mount_b): one directory served by sshd, mounted twice."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("sshfs")
    share, keys = base / "share", base / "keys"
    share.mkdir()
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    port = _free_port()
    (keys / "known_hosts").write_text(
        f"[127.0.0.1]:{port} {' '.join((keys / 'host.pub').read_text().split()[:2])}\n")
    (base / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1:{port}\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\n"
        "PidFile none\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(base / "sshd_config"),
                             "-E", str(base / "sshd.log")])
    mounts: list[Path] = []
    sshfs: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + SSHD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        for name in ("a", "b"):
            m = base / f"mount-{name}"
            m.mkdir()
            sshfs.append(subprocess.Popen(
                ["sshfs", "-f", "-o", FUSE_OPTS, "-o",
                 f"port={port},IdentityFile={keys / 'client'},IdentitiesOnly=yes,BatchMode=yes,"
                 f"StrictHostKeyChecking=yes,UserKnownHostsFile={keys / 'known_hosts'}",
                 "-o", "ssh_command=ssh -F none", f"root@127.0.0.1:{share}", str(m)]))
            mounts.append(m)
        for m in mounts:
            deadline = time.monotonic() + SSHD_START_TIMEOUT_S
            while not os.path.ismount(m) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.ismount(m), f"sshfs did not mount {m}; see {base / 'sshd.log'}"
        (base / "sftp.cmd").write_text(shlex.join([
            "ssh", "-F", "none", "-o", f"Port={port}", "-o", f"IdentityFile={keys / 'client'}",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={keys / 'known_hosts'}", "-s", "root@127.0.0.1", "sftp"]))
        yield share, mounts[0], mounts[1]
    finally:
        for p in sshfs:
            p.kill()
            p.wait()
        for m in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        sshd.kill()
        sshd.wait()


@pytest.fixture
def fresh(two_machines, request):
    """(share, a, b) as a sub-folder of the module's share, one per test."""
    share, a, b = two_machines
    sub = re.sub(r"\W", "-", request.node.name)
    (share / sub).mkdir()
    return share / sub, a / sub, b / sub


def kill_session_when(runner: subprocess.Popen, ready: Callable[[], bool], *,
                      deadline_s: float) -> int | None:
    """SIGKILL the runner's SFTP session (its `ssh ... sftp` child) once `ready()`; its pid,
    or None if the runner ended (or the deadline passed) first."""
    parent = psutil.Process(runner.pid)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and runner.poll() is None:
        if ready():
            for child in parent.children():
                if child.cmdline()[:1] == ["ssh"] and child.cmdline()[-1] == "sftp":
                    child.kill()
                    return child.pid
        time.sleep(0.05)
    return None
