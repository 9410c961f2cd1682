"""The lab provider's VMs: process trees in their own namespaces on this machine, each with its own sshd.

A lab VM is a process tree in new mount, UTS and PID namespaces with its own hostname and
its own sshd on `{address_prefix}{N}:22`; its "disk" is `state_dir/vms/NAME/`. Killing
its PID 1 (cluster/providers/lab/init.py) kills every process in it at once, as a
preemption does. Every pid is recorded with its start time in the state dir, so
separate `fab` runs see the same lab and a crashed run's leftovers can be cleaned up.
The head's sshd is the lab's too (cluster.providers.lab.head).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from cluster.errors import ProvisionError
from cluster.fanout import all_ok, fan_out
from cluster.procs import ProcRecord
from cluster.providers.base import Instance, Status
from cluster.providers.lab import host, store
from cluster.providers.lab.head import LabHead
from cluster.ssh_keys import ensure_key_pair, host_pattern, known_hosts_lines, public_key

logger = logging.getLogger(__name__)

SSH_PORT = 22
INIT_APPEAR_TIMEOUT_S = 10.0  # unshare forks the VM's PID 1 almost at once
MAX_VMS = 254  # one loopback address per VM
MAX_PARALLEL_BOOTS = 16
INIT_SCRIPT = Path(__file__).with_name("init.py")  # run by path: PID 1 imports the standard library only
STARTUP_SCRIPT = "startup-script"  # in a VM's dir: run at every boot instead of home/boot.sh
UNSHARE = ["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--propagation", "private"]


@dataclass(frozen=True)
class VMRecord:
    """What the lab remembers about one VM (state_dir/vms/NAME/vm.json)."""

    name: str
    index: int  # N in the VM's address
    address: str
    host_key: str  # the host public key made at creation: what `host_keys` reports
    init: ProcRecord | None  # the VM's PID 1 while it runs


class LabProvider:
    """Provider of lab VMs and of the lab's head; see the module docstring. Constructing it does no I/O."""

    # What a lab VM's idle guard runs to stop its own VM: PID 1 powers off on SIGTERM. A lab
    # VM always powers off (its disk stays), whatever idle_action says: nothing bills here.
    self_stop_command = "kill -TERM 1"

    def __init__(self, *, name: str, state_dir: Path, address_prefix: str, laptop_key: Path,
                 max_run_s: float, gpus: int = 0) -> None:
        self.name = name
        self.gpus = gpus  # what gpus_per_vm says: the lab's VMs have none, but may claim some
        self.state_dir = state_dir
        self.address_prefix = address_prefix
        self.laptop_key = laptop_key
        self.max_run_s = max_run_s
        self._head = LabHead(name=name, state_dir=state_dir)

    def gpus_per_vm(self) -> int:
        """[lab] gpus: how many GPUs each VM claims (Accelerated); 0 by default."""
        return self.gpus

    # -- the provider interface ---------------------------------------------------------

    def create(self, names: Sequence[str], *, startup_script: str | None = None,
               authorized_keys: Sequence[str] | None = None) -> list[Instance]:
        """Create and boot the named VMs that do not exist yet.

        `startup_script` and `authorized_keys` stand for what a cloud's metadata gives a new
        VM (a Compute API emulator passes them): a script PID 1 runs at every boot instead of
        the disk's boot.sh, and the login keys instead of the laptop's key.
        """
        host.check_host()
        new = [n for n in names if self._record(n) is None]
        all_ok(fan_out(new, lambda n: self._create_one(n, startup_script=startup_script,
                                                       authorized_keys=authorized_keys),
                       key=str, max_parallel=MAX_PARALLEL_BOOTS), what="creating lab VMs")
        return [i for i in self.list() if i.name in set(names)]

    def list(self) -> list[Instance]:
        host.reap_spawned()
        vms = self.state_dir / "vms"
        names = sorted(p.name for p in vms.iterdir() if (p / "vm.json").exists()) if vms.exists() else []
        out = []
        for n in names:
            rec = self._record(n)
            if rec is None:
                continue
            running = rec.init is not None and rec.init.process() is not None
            out.append(Instance(
                name=n, address=rec.address, port=SSH_PORT,
                status=Status.RUNNING if running else Status.TERMINATED,
                preempted=not running and (self._vm_dir(n) / "preempted").exists(),
            ))
        return out

    def start(self, names: Sequence[str]) -> list[Instance]:
        host.check_host()
        missing = [n for n in names if self._record(n) is None]
        if missing:
            self.create(missing)
        todo = [i.name for i in self.list() if i.name in set(names) and i.status is Status.TERMINATED]
        all_ok(fan_out(todo, self._boot, key=str, max_parallel=MAX_PARALLEL_BOOTS), what="starting lab VMs")
        return [i for i in self.list() if i.name in set(names)]

    def stop(self, names: Sequence[str]) -> None:
        """Power the named VMs off (an ordinary stop, not a preemption); `start` boots them again."""
        for n in names:
            self._power_off(n)

    def delete(self, names: Sequence[str]) -> None:
        for n in names:
            self._power_off(n)
            shutil.rmtree(self._vm_dir(n), ignore_errors=True)

    def host_keys(self, names: Sequence[str]) -> dict[str, list[str]]:
        out = {}
        for n in names:
            rec = self._record(n)
            if rec is not None:
                out[n] = known_hosts_lines(host_pattern(rec.address, SSH_PORT), [rec.host_key])
        return out

    def close(self) -> None:
        """Nothing to release: the lab holds no connection."""

    # -- capabilities: SelfStopping, Preemptible, LocalHead, StoreAccess ----------------

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        return {"SPOTFAN_STOP_COMMAND": self.self_stop_command}

    def preempt(self, names: Sequence[str]) -> None:
        """Kill the named VMs the way a cloud preempts them: every process at once."""
        for n in names:
            (self._vm_dir(n) / "preempted").touch()
            self._power_off(n)

    def store_env(self, scheme: str) -> dict[str, str]:
        """A headless lab's stand-in for an instance role: the local store's endpoint and its test
        credentials, from this machine's environment, for a store on loopback only (cluster.providers.lab.store)."""
        return store.store_env(scheme, os.environ)

    def start_head(self, *, share: Path, address: str, port: int, authorized: Sequence[str],
                   user: str, jail: str, workers: int) -> None:
        self._head.start(share=share, address=address, port=port, authorized=authorized, user=user,
                         jail_dir=jail, workers=workers)

    def stop_head(self) -> None:
        self._head.stop()

    def head_host_keys(self, address: str, port: int) -> list[str]:
        return self._head.host_keys(address, port)

    # -- the lab only -------------------------------------------------------------------

    def processes(self, name: str) -> list[psutil.Process]:
        """Every process of a running VM (its PID 1 first), as host processes."""
        rec = self._record(name)
        init = rec.init.process() if rec and rec.init else None
        if init is None:
            return []
        return [init, *init.children(recursive=True)]

    def vm_home(self, name: str) -> Path:
        """The VM's SPOTFAN_HOME: the part of its disk the worker software uses."""
        return self._vm_dir(name) / "home"

    # -- inside -------------------------------------------------------------------------

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / name

    def _record(self, name: str) -> VMRecord | None:
        raw = host.read_json(self._vm_dir(name) / "vm.json")
        if raw is None:
            return None
        init = ProcRecord(**raw["init"]) if raw.get("init") else None  # type: ignore[arg-type]
        return VMRecord(**{**raw, "init": init})  # type: ignore[arg-type]

    def _save(self, rec: VMRecord) -> None:
        host.write(self._vm_dir(rec.name) / "vm.json", json.dumps(asdict(rec)))

    def _create_one(self, name: str, *, startup_script: str | None = None,
                    authorized_keys: Sequence[str] | None = None) -> None:
        index = int(name.rsplit("-w", 1)[-1]) if "-w" in name else 0
        if not 1 <= index <= MAX_VMS:
            raise ProvisionError(f"lab VM {name!r}: names must end in -w001 .. -w{MAX_VMS:03d}")
        address = f"{self.address_prefix}{index}"
        d = self._vm_dir(name)
        (d / "home").mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / "ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        host_key = ensure_key_pair(d / "ssh" / "ssh_host_ed25519_key", comment=name)
        keys = [public_key(self.laptop_key)] if authorized_keys is None else list(authorized_keys)
        host.write(d / "ssh" / "authorized_keys", "".join(f"{k}\n" for k in keys), mode=0o600)
        if startup_script is not None:
            host.write(d / STARTUP_SCRIPT, startup_script, mode=0o755)
        host.write(d / "ssh" / "sshd_config", host.sshd_config(
            listen=f"{address}:{SSH_PORT}", host_key=host_key,
            authorized_keys=d / "ssh" / "authorized_keys",
            env={"SPOTFAN_HOME": str(d / "home"), "TMPDIR": str(d / "tmp")},  # tmp: init's tmpfs
        ))
        self._save(VMRecord(name=name, index=index, address=address,
                            host_key=public_key(host_key), init=None))
        self._boot(name)

    def _boot(self, name: str) -> None:
        rec = self._record(name)
        if rec is None:
            raise ProvisionError(f"lab VM {name} has no record in {self._vm_dir(name)}: `fab up` creates it again")
        if host.listening(rec.address, SSH_PORT):
            raise ProvisionError(
                f"lab VM {name}: {rec.address}:{SSH_PORT} is taken by another process "
                "(a leftover lab? run `fab down` with its config), or set lab.address_prefix"
            )
        d = self._vm_dir(name)
        (d / "preempted").unlink(missing_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
               "SPOTFAN_HOME": str(d / "home"), "TMPDIR": str(d / "tmp")}
        p = host.spawn(
            # -S and a path: PID 1 needs only the standard library, from any install.
            [*UNSHARE, "--", sys.executable, "-S", str(INIT_SCRIPT),
             "--name", name, "--vm-dir", str(d), "--max-run-s", str(self.max_run_s)],
            log=d / "console.log", cwd=d, env=env)
        deadline = time.monotonic() + INIT_APPEAR_TIMEOUT_S
        init = None
        while init is None:
            init = host.first_child(p.pid)
            if init is None and (p.poll() is not None or time.monotonic() > deadline):
                raise ProvisionError(f"lab VM {name} did not boot: {host.tail(d / 'console.log')}")
            if init is None:
                time.sleep(host.POLL_INTERVAL_S)
        self._save(VMRecord(**{**asdict(rec), "init": ProcRecord.of(init)}))
        logger.info("lab VM %s booted (PID 1 = host pid %d)", name, init)

    def _power_off(self, name: str) -> None:
        rec = self._record(name)
        if rec is None or rec.init is None:
            return
        host.kill(rec.init)
