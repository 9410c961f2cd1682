"""PID 1 of a lab VM, its "firmware": starts the VM's sshd, runs its boot script, reaps orphans.

Run by `LabProvider` (cluster.providers.lab.vms) inside fresh mount, UTS and PID
namespaces, by its path and with `python -S`: it imports the standard library only, so
it runs the same from a checkout and from any install. When this process exits,
the kernel kills every process of the VM at once, which is what a cloud's stop or
preemption does to a real VM. SIGTERM from inside the VM (the worker's idle self-stop,
`kill -TERM 1`) is its `poweroff`.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REAP_INTERVAL_S = 0.5
SSHD = "/usr/sbin/sshd"
TMP_SIZE = "512m"  # the VM's own /tmp (a tmpfs, as on Debian 13 images): at most this much RAM


class _PowerOff(Exception):
    pass


def _power_off(signum: int, frame: object) -> None:
    raise _PowerOff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--name", required=True)
    p.add_argument("--vm-dir", required=True, type=Path)
    p.add_argument("--max-run-s", required=True, type=float)
    a = p.parse_args(argv)
    if os.getpid() != 1:
        print("lab init: must run as PID 1 of a new PID namespace", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _power_off)
    signal.signal(signal.SIGINT, _power_off)
    socket.sethostname(a.name)
    home = Path(os.environ["SPOTFAN_HOME"])
    log = open(a.vm_dir / "console.log", "ab", buffering=0)
    log.write(f"labinit: {a.name} booting\n".encode())
    _fresh_shell_rc(a.vm_dir, log)
    _fresh_tmp(a.vm_dir, log)
    _guest_poweroff(a.vm_dir, log)
    subprocess.Popen(
        [SSHD, "-D", "-f", str(a.vm_dir / "ssh" / "sshd_config"), "-E", str(a.vm_dir / "sshd.log")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    # Like a cloud's startup-script: a VM that was provisioned once resumes by itself. A VM
    # made for a cloud emulator has its instance's own startup-script (vms.STARTUP_SCRIPT).
    startup = a.vm_dir / "startup-script"
    boot = startup if startup.exists() else home / "boot.sh"
    if boot.exists():
        subprocess.Popen(["/bin/sh", str(boot)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/")
    deadline = time.monotonic() + a.max_run_s
    try:
        while time.monotonic() < deadline:
            time.sleep(REAP_INTERVAL_S)
            _reap()
        log.write(b"labinit: max run duration reached, powering off\n")
    except _PowerOff:
        log.write(b"labinit: powering off\n")
    return 0


def _fresh_shell_rc(vm_dir: Path, log: object) -> None:
    """Hide this machine's ~/.bashrc from the VM, as a fresh cloud image would not have it.

    sshd runs every command through the user's bash, which sources ~/.bashrc; the host's
    may do slow things (a pyenv init costs ~0.15 s per command) that are no part of a VM.
    The bind mount lives only in the VM's private mount namespace.
    """
    rc = Path(os.path.expanduser("~root")) / ".bashrc"
    if not rc.exists():
        return
    empty = vm_dir / "empty.bashrc"
    empty.write_text("# a lab VM's own, empty ~/.bashrc\n")
    subprocess.run(["mount", "--bind", str(empty), str(rc)], stdout=log, stderr=log, check=False)


def _fresh_tmp(vm_dir: Path, log: object) -> None:
    """Give the VM a temporary folder of its own (its TMPDIR, set by the lab), as a fresh
    cloud VM has: a tmpfs that only this VM sees and that vanishes when it stops.

    The host's /tmp is shared by every lab VM, and an aged one can be slow: on one test
    machine a file create there cost 1.1 ms of CPU against 0.03 ms on a fresh folder of the
    same disk, which a runner staging every output locally pays twice per key. Without the
    tmpfs (mount refused), the folder is still the VM's own, on the host's disk.
    """
    tmp = vm_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMP_SIZE},mode=1777", "tmpfs", str(tmp)],
                          stdout=log, stderr=log, check=False)
    if done.returncode != 0:
        log.write(b"labinit: no tmpfs for the VM's TMPDIR; using a folder of the host's disk\n")  # type: ignore[attr-defined]
        tmp.chmod(0o1777)


GUEST_POWEROFF = """#!/bin/sh
# A lab VM's own shutdown, poweroff and halt: they power this VM off (SIGTERM to its PID 1),
# as a guest shutdown stops a cloud VM. There is no systemd here to ask.
case "$(basename "$0")" in
    shutdown|poweroff|halt) exec kill -TERM 1 ;;
esac
echo "$(basename "$0"): a lab VM has no systemd" >&2
exit 1
"""


def _guest_poweroff(vm_dir: Path, log: object) -> None:
    """Make the guest's shutdown commands power off this VM, never the machine it runs on.

    A cloud's idle guard ends with `shutdown -h now`; run inside a lab VM, the host's
    shutdown (systemctl) could reach the host's own systemd through the shared /run. The
    bind mounts live only in the VM's private mount namespace.
    """
    script = vm_dir / "guest-poweroff"
    script.write_text(GUEST_POWEROFF)
    script.chmod(0o755)
    targets = {os.path.realpath(p) for p in ("/sbin/shutdown", "/sbin/poweroff", "/sbin/halt") if os.path.exists(p)}
    for target in sorted(targets):
        subprocess.run(["mount", "--bind", str(script), target], stdout=log, stderr=log, check=False)


def _reap() -> None:
    """Collect every exited child, including orphans re-parented to PID 1."""
    for _ in range(1000):
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    sys.exit(main())
