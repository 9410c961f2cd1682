"""Claims and publishing over real SSHFS: two mounts of one share are two machines, each
with its own sshfs process and caches, talking to a real sshd."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.records import read_logs

# The options the cluster mounts with (scripts/mount.sh): no caching, so claims work.
FUSE_OPTS = ("reconnect,ServerAliveInterval=15,ServerAliveCountMax=3,dir_cache=no,"
             "attr_timeout=0,entry_timeout=0,negative_timeout=0")
SSHD_START_TIMEOUT_S = 10

TASKS = """
import time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:04d}" for i in range(300)], out="out/{key}.txt")
def per_key(key: str, out: Path) -> None:
    time.sleep(0.005)
    out.write_text(key)

@filetask(keys=[f"k{i:05d}" for i in range(5000)], out="many/{key}.txt")
def units(key: str, out: Path) -> None:
    out.write_text(key)
"""


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run sshd and mount FUSE"
    for tool in ("sshfs", "fusermount3", "ssh-keygen"):
        if not shutil.which(tool):
            return f"needs {tool} (apt-get install sshfs openssh-client)"
    if not os.access("/usr/sbin/sshd", os.X_OK) or not os.path.exists("/dev/fuse"):
        return "needs /usr/sbin/sshd and /dev/fuse (apt-get install openssh-server fuse3)"
    return None


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
        yield share, mounts[0], mounts[1]
    finally:
        for p in sshfs:
            p.kill()
            p.wait()
        for m in mounts:
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        sshd.kill()
        sshd.wait()


@pytest.mark.parametrize("task, n", [("per_key", 300), ("units", 5000)])
def test_two_machines_share_the_work_over_sshfs(two_machines, task: str, n: int) -> None:
    share, a, b = two_machines
    (share / "sf_tasks.py").write_text(TASKS)
    cmd = [sys.executable, "-m", "tasks", "run", f"sf_tasks:{task}", "--workers", "2"]
    procs = [subprocess.Popen(cmd, cwd=m, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for m in (a, b)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    folder = "out" if task == "per_key" else "many"
    names = sorted(os.listdir(share / folder))
    assert len(names) == n
    assert all((share / folder / f).read_text() == f[:-4] for f in names[:: max(1, n // 200)])
    rows = [r for r in read_logs(share / f".spotfan/tasks/{task}/log") if r["ok"]]
    per_key = Counter(r["key"] for r in rows)
    per_owner = Counter(r["owner"] for r in rows)
    twice = sum(1 for c in per_key.values() if c > 1)
    print(f"{task}: executions per machine {dict(per_owner)}, keys run twice: {twice}")
    assert len(per_key) == n and len(per_owner) == 2
    assert twice == 0
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r["succeeded"] for r in reports) == n
    assert list((share / f".spotfan/tasks/{task}/claims").iterdir()) == []
