"""This machine as the lab's host: root and tools checked, processes spawned and killed by pid, sshd configs.

Every process the lab starts is recorded with its start time (cluster.procs.ProcRecord),
so separate `fab` runs see the same lab and only that very process is ever killed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import psutil

from cluster.errors import ProvisionError
from tasks.fs import atomic_write
from cluster.procs import ProcRecord

SSHD = "/usr/sbin/sshd"
STOP_TIMEOUT_S = 10.0  # a SIGKILLed namespace is gone in milliseconds
POLL_INTERVAL_S = 0.05
_SPAWNED: list[subprocess.Popen[bytes]] = []  # our own children, reaped so none stays a zombie
_SPAWNED_LOCK = threading.Lock()  # VMs may be killed from several threads at once (an emulator's)


def check_host() -> None:
    """The lab needs root, unshare and sshd; say so plainly where they are missing."""
    if sys.platform != "linux":
        raise ProvisionError("the lab provider needs Linux namespaces; use another provider here")
    if os.geteuid() != 0:
        raise ProvisionError("the lab provider needs root (it creates namespaces and runs sshd)")
    for tool in ("unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise ProvisionError(f"the lab provider needs `{tool}`: install util-linux / openssh-client")
    if not os.access(SSHD, os.X_OK):
        raise ProvisionError(f"the lab provider needs {SSHD}: apt-get install openssh-server")
    # sshd's privilege separation directory; the openssh-server service normally makes it.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def sshd_config(*, listen: str, host_key: Path, authorized_keys: Path,
                env: dict[str, str] | None = None, only_user: str | None = None,
                fleet: Sequence[str] = ("MaxStartups 100:30:200",)) -> str:
    """An sshd_config for a lab VM (root logs in with the laptop key) or the head (`only_user`)."""
    lines = [
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PidFile none",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # A VM is logged into as root; the head only ever as its one jailed user.
        "PermitRootLogin no" if only_user else "PermitRootLogin prohibit-password",
        *([f"AllowUsers {only_user}"] if only_user else []),
        "StrictModes no",  # the state dir may sit under a group-writable tmp
        "X11Forwarding no",
        "AllowAgentForwarding no",
        *fleet,  # a fan-out (or a fleet's mounts) opens many connections at once
        "Subsystem sftp internal-sftp",
    ]
    if env:
        lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in env.items()))
    return "\n".join(lines) + "\n"


def listen_line(config: str) -> str:
    return next((ln for ln in config.splitlines() if ln.startswith("ListenAddress ")), "")


def spawn(argv: Sequence[str], *, log: Path, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a process in its own session, its output appended to `log`; it is reaped later."""
    with open(log, "ab") as out:
        p = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             cwd=str(cwd) if cwd else None, start_new_session=True)
    with _SPAWNED_LOCK:
        _SPAWNED.append(p)
    return p


def kill(rec: ProcRecord | None) -> None:
    """SIGKILL one recorded process and wait (bounded) until it is gone."""
    p = rec.process() if rec else None
    if p is None:
        return
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired as e:
        raise ProvisionError(f"process {p.pid} did not die within {STOP_TIMEOUT_S}s of SIGKILL") from e
    finally:
        reap_spawned()


def reap_spawned() -> None:
    with _SPAWNED_LOCK:
        for p in list(_SPAWNED):
            if p.poll() is not None:
                _SPAWNED.remove(p)


def first_child(pid: int) -> int | None:
    """The pid of `unshare --fork`'s child (PID 1 of the new namespace), once it exists."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if children else None


def listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((address, port)) == 0


def write(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write(path, text, mode=mode)


def write_proc(path: Path, rec: ProcRecord) -> None:
    write(path, json.dumps(asdict(rec)))


def read_json(path: Path) -> dict[str, str] | None:
    """A small file the lab wrote itself (on this machine, never on the share)."""
    try:
        raw = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def read_proc(path: Path) -> ProcRecord | None:
    raw = read_json(path)
    try:
        return ProcRecord(pid=int(raw["pid"]), started=float(raw["started"]),
                          boot=str(raw.get("boot", ""))) if raw else None
    except (KeyError, TypeError, ValueError):
        return None


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
