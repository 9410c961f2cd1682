"""The lab provider: worker VMs that are namespaces on this machine, and a head sshd.

A lab VM is a process tree in new mount, UTS and PID namespaces with its own hostname and
its own sshd on `{address_prefix}{N}:22`; its "disk" is `state_dir/vms/NAME/`. Killing
its PID 1 kills every process in it at once, as a preemption does. The head is an sshd
on `head.address:head.port` that serves the shared directory over SFTP only. Every pid
is recorded (with its start time, so a recycled pid is never killed) in the state dir,
so separate `fab` runs see the same lab and a crashed run's leftovers can be cleaned up.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

import cluster
from cluster import jail as jail_setup
from cluster.config import ClusterConfig
from cluster.errors import ProvisionError
from cluster.keys import ensure_key_pair, host_pattern, known_hosts_lines, public_key
from cluster.provider import Charge, Instance, Status

logger = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_PORT = 22
INIT_APPEAR_TIMEOUT_S = 10.0  # unshare forks the VM's PID 1 almost at once
STOP_TIMEOUT_S = 10.0  # a SIGKILLed namespace is gone in milliseconds
HEAD_LISTEN_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
MAX_VMS = 254  # one loopback address per VM
REPO_ROOT = Path(cluster.__file__).resolve().parent.parent
_SPAWNED: list[subprocess.Popen[bytes]] = []  # our own children, reaped so none stays a zombie
_SPAWNED_LOCK = threading.Lock()  # VMs may be killed from several threads at once (an emulator's)
STARTUP_SCRIPT = "startup-script"  # in a VM's dir: run at every boot instead of home/boot.sh
UNSHARE = ["unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc", "--propagation", "private"]
HEAD_UNSHARE = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private"]


@dataclass(frozen=True)
class ProcRecord:
    """A process we started, recorded so that only that very process is ever signalled."""

    pid: int  # host pid
    started: float  # psutil create_time(): a recycled pid has another one

    def process(self) -> psutil.Process | None:
        """The live process, or None if it exited (or its pid now belongs to someone else)."""
        try:
            p = psutil.Process(self.pid)
            if abs(p.create_time() - self.started) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                return None
            return p
        except psutil.Error:
            return None

    @classmethod
    def of(cls, pid: int) -> ProcRecord:
        return cls(pid=pid, started=psutil.Process(pid).create_time())


@dataclass(frozen=True)
class VMRecord:
    """What the lab remembers about one VM (state_dir/vms/NAME/vm.json)."""

    name: str
    index: int  # N in the VM's address
    address: str
    host_key: str  # the host public key made at creation: what `host_keys` reports
    init: ProcRecord | None  # the VM's PID 1 while it runs


class LabProvider:
    """Provider of lab VMs; see the module docstring. Constructing it does no I/O."""

    # What a lab VM's idle guard runs to stop its own VM: PID 1 powers off on SIGTERM. A lab
    # VM always powers off (its disk stays), whatever idle_action says: nothing bills here.
    self_stop_command = "kill -TERM 1"

    def __init__(self, *, name: str, state_dir: Path, address_prefix: str, laptop_key: Path,
                 max_run_s: float) -> None:
        self.name = name
        self.state_dir = state_dir
        self.address_prefix = address_prefix
        self.laptop_key = laptop_key
        self.max_run_s = max_run_s

    @classmethod
    def from_config(cls, config: ClusterConfig) -> LabProvider:
        return cls(
            name=config.name,
            state_dir=config.lab.state_dir,
            address_prefix=config.lab.address_prefix,
            laptop_key=config.ssh.key,
            max_run_s=config.lab.max_run_hours * 3600,
        )

    # -- the provider interface ---------------------------------------------------------

    def create(self, names: Sequence[str], *, startup_script: str | None = None,
               authorized_keys: Sequence[str] | None = None) -> list[Instance]:
        """Create and boot the named VMs that do not exist yet.

        `startup_script` and `authorized_keys` stand for what a cloud's metadata gives a new
        VM (a Compute API emulator passes them): a script PID 1 runs at every boot instead of
        the disk's boot.sh, and the login keys instead of the laptop's key.
        """
        _check_host()
        new = [n for n in names if self._record(n) is None]
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(new)))) as pool:
            list(pool.map(lambda n: self._create_one(
                n, startup_script=startup_script, authorized_keys=authorized_keys), new))
        return [i for i in self.list() if i.name in set(names)]

    def list(self) -> list[Instance]:
        _reap_spawned()
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
        _check_host()
        missing = [n for n in names if self._record(n) is None]
        if missing:
            self.create(missing)
        todo = [i.name for i in self.list() if i.name in set(names) and i.status is Status.TERMINATED]
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(todo)))) as pool:
            list(pool.map(self._boot, todo))
        return [i for i in self.list() if i.name in set(names)]

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

    def stop(self, names: Sequence[str]) -> None:
        """Power the named VMs off (an ordinary stop, not a preemption); `start` boots them again."""
        for n in names:
            self._power_off(n)

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        return {"SPOTFAN_STOP_COMMAND": self.self_stop_command}

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        return []  # lab VMs run on this machine: nothing bills

    # -- lab only -----------------------------------------------------------------------

    def preempt(self, names: Sequence[str]) -> None:
        """Kill the named VMs the way a cloud preempts them: every process at once."""
        for n in names:
            (self._vm_dir(n) / "preempted").touch()
            self._power_off(n)

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

    def start_head(self, *, share: Path, address: str, port: int, authorized: Sequence[str],
                   user: str, jail: str, workers: int) -> None:
        """Start (or keep) the head's sshd, serving `share` only to the jailed `user` (see cluster.jail).

        `authorized` are that user's authorized_keys lines; `workers` sizes sshd for that
        many VMs connecting at once (jail.fleet_sshd_settings). The sshd runs in its own
        mount and PID namespaces: the share is bind-mounted at JAIL/share there only, and
        killing the sshd ends every session with it (`stop_head`). A change of settings
        alone is a reload (SIGHUP: sshd re-executes itself, and every session stays).
        """
        _check_host()
        d = self.state_dir / "head"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o711)  # sshd reads authorized_keys as the jailed user; nothing here is listable
        share.mkdir(parents=True, exist_ok=True)
        made = {"user": user, "jail": jail}
        if _read_json(d / "jail.json") not in (None, made):
            self.stop_head()  # head.user or head.jail changed: remove the old ones first
        _write(d / "jail.json", json.dumps(made))  # what stop_head removes
        uid, gid = jail_setup.ensure_user(user, marker=self._head_user_marker())
        jail_setup.hand_over(share, uid, gid)
        jail_setup.ensure_dirs(Path(jail))
        key = ensure_key_pair(d / "ssh_host_ed25519_key", comment=f"{self.name}-head")
        # sshd reads authorized_keys as the jailed user, so it lives beside the jail (root-owned,
        # searchable by all) rather than in the state dir, which may sit in a 0700 home.
        keys_file = jail_setup.lab_keys_file(Path(jail), user)
        jail_setup.ensure_keys_dir(keys_file.parent)
        _write(keys_file, "".join(f"{line}\n" for line in authorized), mode=0o644)
        jail_setup.check_reachable(keys_file)
        config = (f"# lab head of {self.name}: {share} is bind-mounted at {jail}/share\n"
                  + _sshd_config(listen=f"{address}:{port}", host_key=key,
                                 authorized_keys=keys_file, only_user=user,
                                 fleet=jail_setup.fleet_sshd_settings(workers))
                  + jail_setup.match_block(user=user, jail=jail))
        rec = _read_proc(d / "sshd.json")
        running = rec is not None and rec.process() is not None
        old = (d / "sshd_config").read_text() if (d / "sshd_config").exists() else None
        if running and old == config:
            # sshd reads authorized_keys on every login, so new lines apply without a restart.
            return
        if running and old is not None and _listen_line(old) == _listen_line(config):
            logger.info("lab head: its settings changed; reloading it (sessions stay)")
            _write(d / "sshd_config", config)
            rec.process().send_signal(signal.SIGHUP)  # type: ignore[union-attr]
            deadline = time.monotonic() + HEAD_LISTEN_TIMEOUT_S
            time.sleep(POLL_INTERVAL_S)  # it closes its socket, re-executes and listens again
            while not _listening(address, port) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_S)
            return
        if running:
            logger.info("lab head: its settings changed; restarting it")
            _kill(rec)
        _write(d / "sshd_config", config)
        if _listening(address, port):
            raise ProvisionError(
                f"lab head: {address}:{port} is taken by another process: stop it, or set "
                "head.port in cluster.toml to a free port"
            )
        log = open(d / "sshd.log", "ab")
        p = subprocess.Popen(
            [*HEAD_UNSHARE, "--", "/bin/sh", "-c", 'mount --bind "$1" "$2" && exec "$3" -D -f "$4" -E "$5"',
             "lab-head", str(share), f"{jail}/share", SSHD, str(d / "sshd_config"), str(d / "sshd.log")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        _SPAWNED.append(p)
        deadline = time.monotonic() + HEAD_LISTEN_TIMEOUT_S
        init = None
        while not _listening(address, port):
            if init is None:
                init = _first_child(p.pid)
                if init is not None:
                    # PID 1 of the head's namespaces: killing it ends every session too.
                    _write(d / "sshd.json", json.dumps(asdict(ProcRecord.of(init))))
            if p.poll() is not None or time.monotonic() > deadline:
                raise ProvisionError(
                    f"lab head: sshd did not start on {address}:{port}: "
                    f"{_tail(d / 'sshd.log')} (see {d / 'sshd.log'})"
                )
            time.sleep(POLL_INTERVAL_S)
        if init is None:
            init = _first_child(p.pid)
            _write(d / "sshd.json", json.dumps(asdict(ProcRecord.of(init or p.pid))))

    def stop_head(self) -> None:
        """Stop the head's sshd and every session with it; remove its jailed user and jail folders.

        The share and the head's host key stay, so a later `fab up` serves the same data
        under the same key.
        """
        d = self.state_dir / "head"
        _kill(_read_proc(d / "sshd.json"))
        made = _read_json(d / "jail.json")
        if made is None:
            return
        jail_setup.remove_user(made["user"], marker=self._head_user_marker())
        jail_setup.lab_keys_file(Path(made["jail"]), made["user"]).unlink(missing_ok=True)
        jail_setup.remove_dirs(Path(made["jail"]))
        (d / "jail.json").unlink()

    def _head_user_marker(self) -> str:
        """The GECOS comment of the head user this lab makes: only such a user is ever deleted."""
        return f"spotfan lab head {hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:12]}"

    def head_host_keys(self, address: str, port: int) -> list[str]:
        key = self.state_dir / "head" / "ssh_host_ed25519_key"
        if not key.exists():
            return []
        return known_hosts_lines(host_pattern(address, port), [public_key(key)])

    # -- inside -------------------------------------------------------------------------

    def _vm_dir(self, name: str) -> Path:
        return self.state_dir / "vms" / name

    def _record(self, name: str) -> VMRecord | None:
        try:
            raw = json.loads((self._vm_dir(name) / "vm.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        init = ProcRecord(**raw["init"]) if raw.get("init") else None
        return VMRecord(**{**raw, "init": init})

    def _save(self, rec: VMRecord) -> None:
        _write(self._vm_dir(rec.name) / "vm.json", json.dumps(asdict(rec)))

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
        _write(d / "ssh" / "authorized_keys", "".join(f"{k}\n" for k in keys), mode=0o600)
        if startup_script is not None:
            _write(d / STARTUP_SCRIPT, startup_script, mode=0o755)
        _write(d / "ssh" / "sshd_config", _sshd_config(
            listen=f"{address}:{SSH_PORT}", host_key=host_key,
            authorized_keys=d / "ssh" / "authorized_keys", env={"SPOTFAN_HOME": str(d / "home")},
        ))
        self._save(VMRecord(name=name, index=index, address=address,
                            host_key=public_key(host_key), init=None))
        self._boot(name)

    def _boot(self, name: str) -> None:
        rec = self._record(name)
        assert rec is not None
        if _listening(rec.address, SSH_PORT):
            raise ProvisionError(
                f"lab VM {name}: {rec.address}:{SSH_PORT} is taken by another process "
                "(a leftover lab? run `fab down` with its config), or set lab.address_prefix"
            )
        d = self._vm_dir(name)
        (d / "preempted").unlink(missing_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "SPOTFAN_HOME": str(d / "home"),
            "PYTHONPATH": str(REPO_ROOT),
        }
        console = open(d / "console.log", "ab")
        p = subprocess.Popen(
            # -S: PID 1 needs only the standard library (and cluster, on PYTHONPATH).
            [*UNSHARE, "--", sys.executable, "-S", "-m", "cluster.labinit",
             "--name", name, "--vm-dir", str(d), "--max-run-s", str(self.max_run_s)],
            stdin=subprocess.DEVNULL, stdout=console, stderr=console, env=env, cwd=str(d),
            start_new_session=True,
        )
        _SPAWNED.append(p)
        deadline = time.monotonic() + INIT_APPEAR_TIMEOUT_S
        children: list[psutil.Process] = []
        while not children:
            try:
                children = psutil.Process(p.pid).children()
            except psutil.NoSuchProcess:
                children = []
            if p.poll() is not None or time.monotonic() > deadline:
                raise ProvisionError(f"lab VM {name} did not boot: {_tail(d / 'console.log')}")
            if not children:
                time.sleep(POLL_INTERVAL_S)
        self._save(VMRecord(**{**asdict(rec), "init": ProcRecord.of(children[0].pid)}))
        logger.info("lab VM %s booted (PID 1 = host pid %d)", name, children[0].pid)

    def _power_off(self, name: str) -> None:
        rec = self._record(name)
        if rec is None or rec.init is None:
            return
        _kill(rec.init)


def _check_host() -> None:
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


def _listen_line(config: str) -> str:
    return next((ln for ln in config.splitlines() if ln.startswith("ListenAddress ")), "")


def _sshd_config(*, listen: str, host_key: Path, authorized_keys: Path,
                 env: dict[str, str] | None = None, only_user: str | None = None,
                 fleet: Sequence[str] = ("MaxStartups 100:30:200",)) -> str:
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


def _kill(rec: ProcRecord | None) -> None:
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
        raise ProvisionError(f"process {rec.pid} did not die within {STOP_TIMEOUT_S}s of SIGKILL") from e
    finally:
        _reap_spawned()


def _reap_spawned() -> None:
    with _SPAWNED_LOCK:
        for p in list(_SPAWNED):
            if p.poll() is not None:
                _SPAWNED.remove(p)


def _read_json(path: Path) -> dict[str, str] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _read_proc(path: Path) -> ProcRecord | None:
    try:
        return ProcRecord(**json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _first_child(pid: int) -> int | None:
    """The pid of `unshare --fork`'s child (PID 1 of the new namespace), once it exists."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return None
    return children[0].pid if children else None


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((address, port)) == 0


def _write(path: Path, text: str, *, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
