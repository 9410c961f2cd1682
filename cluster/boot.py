"""Provisioning VMs that run: known_hosts from the provider, the boot files over SSH, boot.sh, the agent's proof.

On every VM at once: wait for SSH, put the boot files (cluster/vm's boot.sh, mount.sh,
watchdog.sh, read from the installed package, and boot.env, the worker key, the head's
known_hosts) on the VM's disk and run boot.sh (start the idle guard, mount the share,
start the agent). On a headless cluster there is no head: no worker key, no known_hosts,
no mount; boot.sh checks that the VM can use the bucket (as its instance role or service
account; the lab's VMs get the local store's endpoint in store.env instead) and fails
closed when it cannot. A VM counts as working only once its agent's first heartbeat is on
the share; one that does not report within AGENT_REPORT_TIMEOUT_S, or whose agent is seen
gone before it did (looked for over SSH every AGENT_ALIVE_EVERY_S), is named with the end of
its agent log and the likely fix, and stopped (or deleted) so that it does not bill.
"""
from __future__ import annotations

import base64
import io
import logging
import re
import shlex
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files

from cluster.errors import ClusterError, GroupError, HostKeyError, ProvisionError, RecordError, SSHError
from cluster.providers.base import Accelerated, Instance, LocalHead, SelfStopping, Status, StoreAccess
from cluster.records import STALE_S, Heartbeat, heartbeat_file
from cluster.session import Cluster
from cluster.ssh import Host
from cluster.ssh_keys import read_known_hosts, write_known_hosts
from cluster.vm.env import pythonpath

logger = logging.getLogger(__name__)

BOOT_FILES = ("boot.sh", "mount.sh", "watchdog.sh")  # package data of cluster.vm
BOOT_COMMAND_TIMEOUT_S = 120.0
AGENT_REPORT_TIMEOUT_S = 60.0  # `fab up`/`heal`: how long a booted VM's agent has to report
REPORT_POLL_S = 0.5
AGENT_ALIVE_EVERY_S = 5.0  # while waiting for a first heartbeat, this often: is the agent still there?
AGENT_ALIVE_TIMEOUT_S = 15.0
WAITING_SAY_EVERY_S = 15.0  # while agents have not reported, `fab up` says so this often
AGENT_LOG_TIMEOUT_S = 30.0
LOG_LINES = 12  # of a VM's agent log, shown when its agent did not report
# Prints "agent-gone PID" when the process boot.sh started (agent.pid) is not an agent any more.
AGENT_GONE = ('H="${SPOTFAN_HOME:-/var/lib/spotfan}"; pid=$(cat "$H/agent.pid" 2>/dev/null); '
              'if [ -n "$pid" ] && tr "\\0" " " < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-m cluster.vm.agent "; '
              'then echo "agent-alive $pid"; else echo "agent-gone $pid"; fi')
# Runs on the VM with the boot files on stdin. SPOTFAN_HOME is the VM's own disk area
# (the lab sets it per VM; a cloud VM uses the default).
UNPACK_AND_BOOT = (
    'H="${SPOTFAN_HOME:-/var/lib/spotfan}" && umask 077 && mkdir -p "$H" && '
    'base64 -d | tar -x -o -f - -C "$H" && SPOTFAN_HOME="$H" sh "$H/boot.sh"'
)
AGENT_LINE = re.compile(r"^agent: (starting|running) \(pid (\d+), id ([0-9a-f]*)\)$", re.M)


class AgentDidNotReport(ClusterError):
    """A VM booted but its agent never reported; the VM was stopped (or deleted) after."""


def hosts(instances: Sequence[Instance]) -> list[Host]:
    return [Host(name=i.name, address=i.address, port=i.port) for i in instances]


def head_known_hosts(cluster: Cluster) -> list[str]:
    """The head's known_hosts lines: from the provider that runs it, else from head.host_keys."""
    config, provider = cluster.config, cluster.provider
    if config.head is None:
        return []  # headless: the VMs reach no head
    if isinstance(provider, LocalHead):
        return provider.head_host_keys(config.head.address, config.head.port)
    if config.head.host_keys is None:
        raise ClusterError(
            f"{config.path}: head.host_keys is not set: point it at a file with the head's "
            "known_hosts lines (ssh-keyscan output you have checked), so workers can verify the head"
        )
    return [ln for lines in read_known_hosts(config.head.host_keys).values() for ln in lines]


def refresh_known_hosts(cluster: Cluster, names: Sequence[str], *, require: bool = True) -> None:
    """known_hosts = exactly what the provider reports for the VMs, plus the head."""
    lines = cluster.provider.host_keys(names)
    missing = [n for n in names if not lines.get(n)]
    if missing and require:
        raise ProvisionError(
            f"the provider reports no host key for {', '.join(missing)} yet; run `fab heal` in a "
            "minute (spotfan never trusts a host key on first use)"
        )
    head = {"head": head_known_hosts(cluster)} if not cluster.headless else {}
    write_known_hosts(cluster.config.ssh.known_hosts, {**lines, **head})


def boot(cluster: Cluster, instances: Sequence[Instance], *,
         on_booted: Callable[[str], None] | None = None) -> dict[str, str]:
    """On every VM at once: wait for SSH, put the boot files on its disk, run boot.sh;
    `on_booted(name)` as each VM's boot script returns (from the fan-out's threads)."""
    config, provider, remote = cluster.config, cluster.provider, cluster.remote
    scripts = {n: files("cluster.vm").joinpath(n).read_bytes() for n in BOOT_FILES}
    if cluster.headless:  # no head: no key for it, and the bucket's access instead
        share: dict[str, tuple[bytes, int]] = {"store.env": (store_env(cluster).encode(), 0o600)}
    else:
        share = {"worker_key": (config.ssh.worker_key.read_bytes(), 0o600),
                 "known_hosts": ("".join(f"{ln}\n" for ln in head_known_hosts(cluster)).encode(), 0o644)}
    by_name = {i.name: i for i in instances}

    def one(host: Host) -> str:
        vm = by_name[host.name]
        if vm.status is not Status.RUNNING:
            raise ProvisionError(f"{host.name} is {vm.status.value}, not RUNNING: run `fab heal`")
        stop = provider.self_stop_env(vm) if isinstance(provider, SelfStopping) else {}
        payload = boot_files({
            "boot.env": (boot_env(cluster, host.name, stop).encode(), 0o644),
            **share,
            **{n: (data, 0o755) for n, data in scripts.items()},
        })
        with remote.wait_ready(host, timeout=config.ssh.boot_timeout) as conn:
            # One round trip: unpack the boot files onto the VM's disk, then boot. Its lines
            # say what failed, if anything (`confirm` reads them), whatever its exit code.
            out = remote.run_on(conn, host, UNPACK_AND_BOOT, stdin=payload, timeout=BOOT_COMMAND_TIMEOUT_S,
                                check=False)
            said = out.stdout.strip()
            if not out.ok and "FAILED" not in said:
                why = ' | '.join(out.stderr.strip().splitlines()[-3:]) or "it printed nothing"
                said += f"\nboot: FAILED (exit {out.exit_code}): {why}"
        if on_booted is not None:
            on_booted(host.name)
        return said

    return remote.each(hosts(instances), one, what="boot")


def boot_files(named: dict[str, tuple[bytes, int]]) -> bytes:
    """The boot files as a base64 tar (modes kept: the worker key stays 0600)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in named.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return base64.encodebytes(buf.getvalue())


def boot_env(cluster: Cluster, name: str, stop: Mapping[str, str]) -> str:
    """The VM's settings as shell assignments (sourced by boot.sh, mount.sh and watchdog.sh);
    `stop` is the provider's part for the idle guard (SelfStopping.self_stop_env)."""
    config, head = cluster.config, cluster.config.head
    where = {
        "SPOTFAN_HEAD_USER": head.user,
        "SPOTFAN_HEAD_ADDRESS": head.address,
        "SPOTFAN_HEAD_PORT": str(head.port),
        "SPOTFAN_SHARE": head.sftp_share,  # as the jailed head user sees it
        "SPOTFAN_MOUNT": config.mount_point,
    } if head is not None else {"SPOTFAN_ROOT_URL": config.run_root}  # headless: the bucket, no mount
    values = {
        "SPOTFAN_NAME": name,
        **where,
        "SPOTFAN_PYTHON": config.python,
        "SPOTFAN_PYTHONPATH": pythonpath(extra=config.python_path),
        "SPOTFAN_IDLE_TIMEOUT": f"{config.idle_timeout:g}",
        "SPOTFAN_WORKERS_PER_VM": str(config.workers_per_vm),
        "SPOTFAN_KEX": config.ssh.kex_algorithms,
        # GPUs: the agent checks the driver shows them, and starts a worker process per group.
        "SPOTFAN_GPUS": str(cluster.provider.gpus_per_vm() if isinstance(cluster.provider, Accelerated) else 0),
        "SPOTFAN_GPUS_PER_WORKER": str(config.gpus_per_worker),
        "SPOTFAN_NVIDIA_SMI": config.nvidia_smi,
        **stop,
    }
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    return "# written by `fab up`; edit cluster.toml instead\n" + "\n".join(lines) + "\n"


def store_env(cluster: Cluster) -> str:
    """A headless VM's store.env (sourced and exported by boot.sh): what the provider must hand its
    VMs to reach the bucket (the lab: the local store's endpoint and test credentials), or nothing
    where the VMs have an identity of their own (a service account, an instance profile)."""
    url = cluster.config.share.url
    assert url is not None
    provider = cluster.provider
    values = provider.store_env(url.scheme) if isinstance(provider, StoreAccess) else {}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(values.items())]
    return "# written by `fab up`: how this VM reaches the bucket (docs/objstore.md)\n" + "".join(
        f"{ln}\n" for ln in lines)


# -- the agent's proof ----------------------------------------------------------------------


def confirm(cluster: Cluster, boots: dict[str, str | BaseException], *,
            on_waiting: Callable[[list[str], float, float], None] | None = None) -> dict[str, str | BaseException]:
    """Each booted VM whose agent's heartbeat reaches the share: its boot lines, "agent: ok".

    A VM whose agent did not report (boot failed, no mount, no interpreter, a crash) gets
    an AgentDidNotReport naming what it said, the end of its agent log and the fix, and is
    stopped (or deleted, per idle_action); a VM whose boot over SSH failed but whose agent
    reports anyway (its own boot got there) keeps its error and is left running: it works.
    `on_waiting(vms, waited_s, timeout_s)` every WAITING_SAY_EVERY_S while some have not.
    """
    agents: dict[str, tuple[str, bool]] = {}
    pids: dict[str, str] = {}
    for name, out in boots.items():
        m = AGENT_LINE.search(out) if isinstance(out, str) else None
        if isinstance(out, str) and ("mount: FAILED" in out or "store: FAILED" in out):
            continue  # without the share its agent cannot report: no use waiting
        if m is not None:
            agents[name] = (m.group(3), m.group(1) == "starting")
            pids[name] = m.group(2)
        elif isinstance(out, BaseException):
            agents[name] = ("", False)  # its own boot may have started an agent: any live one counts
    waiting = {n: a for n, a in agents.items() if a[0]}
    proved, exited = wait_first(lambda vm: read_heartbeat(cluster, vm), waiting,
                                gone=lambda vms: _agents_gone(cluster, {vm: pids[vm] for vm in vms}),
                                on_waiting=on_waiting)
    now = time.time()
    for name in (n for n, a in agents.items() if not a[0]):
        beat = read_heartbeat(cluster, name)
        if beat is not None and beat.age(now) <= STALE_S:
            proved[name] = beat
    results: dict[str, str | BaseException] = {}
    broken: dict[str, str] = {}  # VM -> what it said
    for name, out in boots.items():
        if name in proved and proved[name].state == "no-gpu-driver":
            broken[name] = f"agent: FAILED: {proved[name].problem}"  # it stops itself; stopped here too
        elif name in proved and isinstance(out, str):
            results[name] = _agent_ok(out)
        elif name in proved:
            results[name] = out  # the boot failed, but the VM works: report the error, keep it
        else:
            broken[name] = out if isinstance(out, str) else str(out)
    if broken:
        idle_action = cluster.config.idle_action
        tails = _agent_logs(cluster, sorted(broken))
        try:
            _stop_failed(cluster, sorted(broken))
            fate = ("deleted (idle_action = \"delete\")" if idle_action == "delete" else
                    "stopped so that it does not bill (its disk stays; `fab heal` starts it again)")
        except ClusterError as e:
            fate = f"NOT stopped ({e}): stop it by hand, it may be billing"
        for name, said in broken.items():
            out = boots[name]
            if isinstance(out, HostKeyError):  # keep what it is (exit 3): maybe not our VM at all
                results[name] = HostKeyError(f"{out}; the VM was {fate}")
            else:
                results[name] = AgentDidNotReport(_diagnosis(name, said, tails.get(name, ""), fate,
                                                             exited=name in exited))
    return results


def read_heartbeat(cluster: Cluster, vm: str) -> Heartbeat | None:
    """A VM's heartbeat on the share; None if there is none, or it is refused (and logged)."""
    rel = heartbeat_file(vm)
    try:
        text = cluster.board.read_text(rel)
        return None if text is None else Heartbeat.from_json(text, source=rel, vm=vm)
    except RecordError as e:
        logger.warning("%s", e)
        return None


def wait_first(read: Callable[[str], Heartbeat | None], agents: Mapping[str, tuple[str, bool]], *,
               timeout: float = AGENT_REPORT_TIMEOUT_S,
               gone: Callable[[list[str]], set[str]] | None = None,
               on_waiting: Callable[[list[str], float, float], None] | None = None,
               ) -> tuple[dict[str, Heartbeat], set[str]]:
    """Wait until each VM's agent has reported: (the heartbeats that proved it, the VMs whose
    agent was seen gone before it did).

    `read(vm)` gives the VM's heartbeat on the share (or None); `agents` maps each VM to
    (the id of its agent, whether that agent was started just now). The first heartbeat
    of a new agent proves it alive; an agent that was already running must write one
    more (its seq grows), so an old heartbeat of a hung agent proves nothing. Returns as
    soon as every VM has reported or been seen gone, else at the deadline. `gone(vms)`,
    asked every AGENT_ALIVE_EVERY_S about the VMs still waited for, names those whose agent
    is seen gone: after one more look at their heartbeat (an agent may report, then exit),
    they are waited for no more. `on_waiting(vms, waited_s, timeout_s)` hears of the VMs still
    waited for every WAITING_SAY_EVERY_S.
    """
    first_seq: dict[str, int] = {}
    proved: dict[str, Heartbeat] = {}
    dead: set[str] = set()
    start = time.monotonic()
    deadline, next_look, next_say = start + timeout, start + AGENT_ALIVE_EVERY_S, start + WAITING_SAY_EVERY_S

    def look(vm: str) -> None:
        agent_id, new = agents[vm]
        beat = read(vm)
        if beat is None or beat.agent_id != agent_id:
            return
        if new or (vm in first_seq and beat.seq > first_seq[vm]):
            proved[vm] = beat
        else:
            first_seq.setdefault(vm, beat.seq)

    for _ in range(int(timeout / REPORT_POLL_S) + 2):
        for vm in agents:
            if vm not in proved and vm not in dead:
                look(vm)
        if len(proved) + len(dead) == len(agents) or time.monotonic() >= deadline:
            break
        if gone is not None and time.monotonic() >= next_look:
            for vm in gone(sorted(set(agents) - set(proved) - dead)):
                look(vm)
                if vm not in proved:
                    dead.add(vm)
            next_look = time.monotonic() + AGENT_ALIVE_EVERY_S
            if len(proved) + len(dead) == len(agents):
                break
        if on_waiting is not None and time.monotonic() >= next_say:
            on_waiting(sorted(set(agents) - set(proved) - dead), time.monotonic() - start, timeout)
            next_say = time.monotonic() + WAITING_SAY_EVERY_S
        time.sleep(REPORT_POLL_S)
    return proved, dead


def _agents_gone(cluster: Cluster, pids: Mapping[str, str]) -> set[str]:
    """Of these VMs, those where the agent boot.sh started (its pid) is seen gone over SSH. A
    VM that cannot be asked, or whose agent.pid names another process (a later boot's), is not
    named: it is waited for to the deadline."""
    outs = _ask_running(cluster, list(pids), AGENT_GONE, timeout=AGENT_ALIVE_TIMEOUT_S)
    return {n for n, out in outs.items() if out.split() == ["agent-gone", pids[n]]}


def _agent_ok(boot_lines: str) -> str:
    """boot.sh's agent line, now that the agent has reported: "agent: ok (started, pid N)"."""
    def ok(m: re.Match[str]) -> str:
        return f"agent: ok ({'started' if m.group(1) == 'starting' else 'already running'}, pid {m.group(2)})"

    return AGENT_LINE.sub(ok, boot_lines)


def _diagnosis(name: str, said: str, log_tail: str, fate: str, *, exited: bool = False) -> str:
    lines = [ln for ln in said.splitlines() if ln.strip()]
    failed = [ln for ln in lines if "FAILED" in ln]
    if any(ln.startswith("agent: FAILED") for ln in failed):
        why = next(ln for ln in failed if ln.startswith("agent: FAILED")).removeprefix("agent: FAILED: ")
    elif any(ln.startswith(("mount: FAILED", "store: FAILED")) for ln in failed):
        line = next(ln for ln in failed if ln.startswith(("mount: FAILED", "store: FAILED")))
        why = (line.removeprefix("mount: FAILED ").removeprefix("store: FAILED: ")
               + "; without the share its agent cannot report")
    elif exited and (m := AGENT_LINE.search(said)):
        why = f"its agent (pid {m.group(2)}) exited before it wrote a heartbeat to the share: see the end of its log below"
    elif AGENT_LINE.search(said):
        why = (f"its agent started but wrote no heartbeat to the share within "
               f"{AGENT_REPORT_TIMEOUT_S:g}s: see the end of its log below")
    else:
        why = lines[-1] if lines else "boot.sh printed nothing"
    text = f"agent did not report: {why}; the VM was {fate}"
    if log_tail.strip():
        text += f"\n    last lines of {name}'s agent.log:\n" + "\n".join(
            f"      | {ln}" for ln in log_tail.rstrip().splitlines())
    return text


def _agent_logs(cluster: Cluster, names: list[str]) -> dict[str, str]:
    """The end of each VM's agent log, read over SSH from its own disk (it may never have
    reached the share); "" where it cannot be read."""
    command = f'tail -n {LOG_LINES} "${{SPOTFAN_HOME:-/var/lib/spotfan}}/agent.log" 2>/dev/null; true'
    return _ask_running(cluster, names, command, timeout=AGENT_LOG_TIMEOUT_S)


def _ask_running(cluster: Cluster, names: Sequence[str], command: str, *, timeout: float) -> dict[str, str]:
    """`command`'s stdout on each of these VMs that is running and answers SSH (the others
    are left out: what is asked of them is a diagnosis, never a reason to fail)."""
    running = [i for i in cluster.provider.list() if i.name in set(names) and i.status is Status.RUNNING]
    try:
        outs = cluster.remote.run(hosts(running), command, timeout=timeout)
    except GroupError as e:
        outs = e.succeeded
    except SSHError:
        return {}
    return {n: o.stdout for n, o in outs.items()}


def _stop_failed(cluster: Cluster, names: list[str]) -> None:
    delete = cluster.config.idle_action == "delete"
    logger.warning("%s %s: not working", "deleting" if delete else "stopping", ", ".join(names))
    if delete:
        cluster.provider.delete(names)
    else:
        cluster.provider.stop(names)
