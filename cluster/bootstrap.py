"""Bringing a cluster to its working state and taking it down: up, heal, down, preempt, exec.

`up` and `heal` share one idempotent path: make sure the right VMs exist and run, rebuild
known_hosts from what the provider reports, then on every VM at once wait for SSH, put
the boot files on the VM's disk and run boot.sh (start the idle guard, mount the share,
start the agent). A VM counts as working only once its agent's first heartbeat is on the
share (cluster.heartbeat); one that does not report within AGENT_REPORT_TIMEOUT_S is a
failure of the command, is named with the end of its agent log and the likely fix, and
is stopped (or deleted, per idle_action) so that it does not bill.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import shlex
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster import heartbeat, jail
from cluster.config import ClusterConfig
from cluster.errors import ClusterError, GroupError, HostKeyError, ProvisionError, SSHError
from cluster.keys import ensure_key_pair, read_known_hosts, write_known_hosts
from cluster.provider import PROVIDERS, Instance, Provider, Status
from cluster.share import CLUSTER_DIR, Share
from cluster.ssh import Host, Output, Remote

logger = logging.getLogger(__name__)

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
BOOT_FILES = ("boot.sh", "mount.sh", "watchdog.sh")
BOOT_COMMAND_TIMEOUT_S = 120.0
# Runs on the VM with the boot files on stdin. SPOTFAN_HOME is the VM's own disk area
# (the lab sets it per VM; a cloud VM uses the default).
UNPACK_AND_BOOT = (
    'H="${SPOTFAN_HOME:-/var/lib/spotfan}" && umask 077 && mkdir -p "$H" && '
    'base64 -d | tar -x -o -f - -C "$H" && SPOTFAN_HOME="$H" sh "$H/boot.sh"'
)
DESIRED_FILE = f"{CLUSTER_DIR}/cluster.json"  # the worker count `fab up` last asked for
LOG_LINES = 12  # of a VM's agent log, shown when its agent did not report
AGENT_LINE = re.compile(r"^agent: (starting|running) \(pid (\d+), id ([0-9a-f]*)\)$", re.M)


class AgentDidNotReport(ClusterError):
    """A VM booted but its agent never reported; the VM was stopped (or deleted) after."""


@dataclass(frozen=True)
class VMReport:
    """What bringing one VM up did."""

    name: str
    action: str  # created | started | running (already was) | deleted
    boot: str  # what boot.sh printed (mount and agent lines)
    zone: str | None = None  # where the VM runs, for providers with zones


@dataclass(frozen=True)
class UpPlan:
    """What `up` is about to do, known before it creates, starts or deletes anything."""

    create: tuple[str, ...]  # missing VMs
    start: tuple[str, ...]  # stopped (TERMINATED) VMs
    keep: tuple[str, ...]  # wanted VMs that exist and are not stopped
    delete: tuple[str, ...]  # VMs beyond the wanted count
    remembered: int | None = None  # the count an earlier `fab up --count` left, when it is used
    configured: int = 0  # `workers` in cluster.toml

    @property
    def workers(self) -> int:
        """How many VMs the cluster has once `up` is done."""
        return len(self.create) + len(self.start) + len(self.keep)


def provider_for(config: ClusterConfig) -> Provider:
    try:
        factory = PROVIDERS[config.provider]
    except KeyError:
        raise ClusterError(
            f"{config.path}: cluster.provider = {config.provider!r} is unknown; "
            f"choose one of {', '.join(sorted(PROVIDERS))}"
        ) from None
    return factory(config)


def hosts(instances: Sequence[Instance]) -> list[Host]:
    return [Host(name=i.name, address=i.address, port=i.port) for i in instances]


def head_authorized_keys(config: ClusterConfig) -> list[str]:
    """The head user's authorized_keys lines: both keys reach the share by SFTP only (cluster.jail)."""
    return jail.authorized_keys(config)


def ensure_keys(config: ClusterConfig) -> None:
    """The cluster's two key pairs (laptop -> VMs and head, VMs -> head), made if missing (0600)."""
    ensure_key_pair(config.ssh.key, comment=f"spotfan-{config.name}-laptop")
    ensure_key_pair(config.ssh.worker_key, comment=f"spotfan-{config.name}-worker")


def head_setup(config: ClusterConfig, *, workers: int | None = None) -> str:
    """What a real head's administrator runs to jail this cluster's SFTP user and size its sshd
    for `workers` VMs (default: cluster.toml's) connecting at once (the lab does it itself)."""
    ensure_keys(config)
    return jail.setup_steps(config, workers=workers)


def prepare(config: ClusterConfig, provider: Provider, *, workers: int | None = None) -> None:
    """Keys, and on the lab the head's sshd (sized for `workers` VMs): everything the VMs
    will need before they exist."""
    ensure_keys(config)
    _start_head(config, provider, workers=config.workers if workers is None else workers)
    refresh_known_hosts(config, provider, [i.name for i in provider.list()], require=False)


def _start_head(config: ClusterConfig, provider: Provider, *, workers: int) -> None:
    start_head = getattr(provider, "start_head", None)
    if start_head is not None:
        start_head(share=config.head.share, address=config.head.address, port=config.head.port,
                   authorized=head_authorized_keys(config), user=config.head.user, jail=config.head.jail,
                   workers=workers)


def head_known_hosts(config: ClusterConfig, provider: Provider) -> list[str]:
    lab_keys = getattr(provider, "head_host_keys", None)
    if lab_keys is not None:
        return lab_keys(config.head.address, config.head.port)
    if config.head.host_keys is None:
        raise ClusterError(
            f"{config.path}: head.host_keys is not set: point it at a file with the head's "
            "known_hosts lines (ssh-keyscan output you have checked), so workers can verify the head"
        )
    return [ln for lines in read_known_hosts(config.head.host_keys).values() for ln in lines]


def up(config: ClusterConfig, *, count: int | None = None,
       on_plan: Callable[[UpPlan], None] | None = None) -> list[VMReport]:
    """Make the cluster have `count` (default: last asked, else config) working VMs.

    `on_plan` sees what will be created, started and deleted before anything is. Raises
    GroupError (its results: a VMReport per working VM, the error of each other one) if
    any VM does not end up working; those are left stopped or deleted, never billing.
    """
    provider = provider_for(config)
    prepared = config.workers if count is None else count  # the head's sshd is sized for this many
    prepare(config, provider, workers=prepared)
    remembered = None
    with Share.from_config(config) as share:
        if count is None:
            saved = share.read_text(DESIRED_FILE)
            remembered = json.loads(saved)["workers"] if saved else None
            count = config.workers if remembered is None else remembered
        share.write_text(DESIRED_FILE, json.dumps({"workers": count}))
    if jail.fleet_size(count) != jail.fleet_size(prepared):
        _start_head(config, provider, workers=count)  # sized for the remembered count instead
    wanted = config.vm_names(count)
    existing = {i.name: i for i in provider.list()}
    reports = []
    extra = sorted(set(existing) - set(wanted))
    missing = [n for n in wanted if n not in existing]
    stopped = [n for n in wanted if n in existing and existing[n].status is Status.TERMINATED]
    if on_plan is not None:
        keep = [n for n in wanted if n in existing and n not in stopped]
        on_plan(UpPlan(create=tuple(missing), start=tuple(stopped), keep=tuple(keep), delete=tuple(extra),
                       remembered=remembered if remembered != config.workers else None,
                       configured=config.workers))
    if extra:
        logger.info("shrinking: deleting %s", ", ".join(extra))
        provider.delete(extra)
        reports += [VMReport(name=n, action="deleted", boot="") for n in extra]
    if missing:
        logger.info("creating %s", ", ".join(missing))
        provider.create(missing)
    if stopped:
        logger.info("starting %s", ", ".join(stopped))
        provider.start(stopped)
    actions = {n: "created" for n in missing} | {n: "started" for n in stopped}
    instances = [i for i in provider.list() if i.name in set(wanted)]
    zones = {i.name: i.zone for i in instances}
    refresh_known_hosts(config, provider, [i.name for i in instances])
    try:
        boots: dict[str, str | BaseException] = dict(boot(config, provider, instances))
    except GroupError as e:
        boots = dict(e.results)
    results = confirm(config, provider, boots, idle_action=config.idle_action)
    results = {n: VMReport(name=n, action=actions.get(n, "running"), boot=r, zone=zones.get(n))
               if isinstance(r, str) else r for n, r in results.items()}
    failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    if failed:
        lines = "\n".join(f"  {n}: {e}" for n, e in sorted(failed.items()))
        raise GroupError(f"{len(failed)} of {len(wanted)} VMs are not working:\n{lines}", results)
    return reports + [results[n] for n in wanted]  # type: ignore[misc]


def confirm(config: ClusterConfig, provider: Provider, boots: dict[str, str | BaseException], *,
            idle_action: str) -> dict[str, str | BaseException]:
    """Each booted VM whose agent's heartbeat reaches the share: its boot lines, "agent: ok".

    A VM whose agent did not report (boot failed, no mount, no interpreter, a crash) gets
    an AgentDidNotReport naming what it said, the end of its agent log and the fix, and is
    stopped (or deleted); a VM whose boot over SSH failed but whose agent reports anyway
    (its own boot got there) keeps its error and is left running: it works.
    """
    agents: dict[str, tuple[str, bool]] = {}
    for name, out in boots.items():
        m = AGENT_LINE.search(out) if isinstance(out, str) else None
        if isinstance(out, str) and "mount: FAILED" in out:
            continue  # without the share its agent cannot report: no use waiting
        if m is not None:
            agents[name] = (m.group(3), m.group(1) == "starting")
        elif isinstance(out, BaseException):
            agents[name] = ("", False)  # its own boot may have started an agent: any live one counts
    waiting = {n: a for n, a in agents.items() if a[0]}
    with Share.from_config(config) as share:
        proved = heartbeat.wait_first(lambda vm: share.read_text(f"{heartbeat.VMS_DIR}/{vm}.json"), waiting)
        for name in (n for n, a in agents.items() if not a[0]):
            beat = heartbeat.parse(share.read_text(f"{heartbeat.VMS_DIR}/{name}.json"))
            if beat is not None and beat.age() <= heartbeat.STALE_S:
                proved[name] = beat
    results: dict[str, str | BaseException] = {}
    broken: dict[str, str] = {}  # VM -> what it said
    for name, out in boots.items():
        if name in proved and isinstance(out, str):
            results[name] = _agent_ok(out)
        elif name in proved:
            results[name] = out  # the boot failed, but the VM works: report the error, keep it
        else:
            broken[name] = out if isinstance(out, str) else str(out)
    if broken:
        tails = _agent_logs(config, provider, sorted(broken))
        try:
            _stop_failed(provider, sorted(broken), idle_action=idle_action)
            fate = ("deleted (idle_action = \"delete\")" if idle_action == "delete" else
                    "stopped so that it does not bill (its disk stays; `fab heal` starts it again)")
        except ClusterError as e:
            fate = f"NOT stopped ({e}): stop it by hand, it may be billing"
        for name, said in broken.items():
            out = boots[name]
            if isinstance(out, HostKeyError):  # keep what it is (exit 3): maybe not our VM at all
                results[name] = HostKeyError(f"{out}; the VM was {fate}")
            else:
                results[name] = AgentDidNotReport(_diagnosis(name, said, tails.get(name, ""), fate))
    return results


def _agent_ok(boot_lines: str) -> str:
    """boot.sh's agent line, now that the agent has reported: "agent: ok (started, pid N)"."""
    def ok(m: re.Match[str]) -> str:
        return f"agent: ok ({'started' if m.group(1) == 'starting' else 'already running'}, pid {m.group(2)})"

    return AGENT_LINE.sub(ok, boot_lines)


def _diagnosis(name: str, said: str, log_tail: str, fate: str) -> str:
    lines = [ln for ln in said.splitlines() if ln.strip()]
    failed = [ln for ln in lines if "FAILED" in ln]
    if any(ln.startswith("agent: FAILED") for ln in failed):
        why = next(ln for ln in failed if ln.startswith("agent: FAILED")).removeprefix("agent: FAILED: ")
    elif any(ln.startswith("mount: FAILED") for ln in failed):
        why = (next(ln for ln in failed if ln.startswith("mount: FAILED")).removeprefix("mount: FAILED ")
               + "; without the share its agent cannot report")
    elif AGENT_LINE.search(said):
        why = (f"its agent started but wrote no heartbeat to the share within "
               f"{heartbeat.AGENT_REPORT_TIMEOUT_S:g}s: see the end of its log below")
    else:
        why = lines[-1] if lines else "boot.sh printed nothing"
    text = f"agent did not report: {why}; the VM was {fate}"
    if log_tail.strip():
        text += f"\n    last lines of {name}'s agent.log:\n" + "\n".join(
            f"      | {ln}" for ln in log_tail.rstrip().splitlines())
    return text


def _agent_logs(config: ClusterConfig, provider: Provider, names: list[str]) -> dict[str, str]:
    """The end of each VM's agent log, read over SSH from its own disk (it may never have
    reached the share); "" where it cannot be read."""
    running = [i for i in provider.list() if i.name in set(names) and i.status is Status.RUNNING]
    command = f'tail -n {LOG_LINES} "${{SPOTFAN_HOME:-/var/lib/spotfan}}/agent.log" 2>/dev/null; true'
    try:
        outs = Remote.from_config(config).run(hosts(running), command, timeout=30)
    except GroupError as e:
        outs = e.succeeded
    except SSHError:
        return {}
    return {n: o.stdout for n, o in outs.items()}


def _stop_failed(provider: Provider, names: list[str], *, idle_action: str) -> None:
    logger.warning("%s %s: not working", "deleting" if idle_action == "delete" else "stopping", ", ".join(names))
    if idle_action == "delete":
        provider.delete(names)
    else:
        provider.stop(names)


def refresh_known_hosts(config: ClusterConfig, provider: Provider, names: Sequence[str], *,
                        require: bool = True) -> None:
    """known_hosts = exactly what the provider reports for the VMs, plus the head."""
    lines = provider.host_keys(names)
    missing = [n for n in names if not lines.get(n)]
    if missing and require:
        raise ProvisionError(
            f"the provider reports no host key for {', '.join(missing)} yet; run `fab heal` in a "
            "minute (spotfan never trusts a host key on first use)"
        )
    write_known_hosts(config.ssh.known_hosts, {**lines, "head": head_known_hosts(config, provider)})


def boot(config: ClusterConfig, provider: Provider, instances: Sequence[Instance]) -> dict[str, str]:
    """On every VM at once: wait for SSH, put the boot files on its disk, run boot.sh."""
    remote = Remote.from_config(config)
    head_lines = "".join(f"{ln}\n" for ln in head_known_hosts(config, provider)).encode()
    scripts = {n: (SCRIPTS / n).read_bytes() for n in BOOT_FILES}
    worker_key = config.ssh.worker_key.read_bytes()

    status = {i.name: i.status for i in instances}
    by_name = {i.name: i for i in instances}

    def one(host: Host) -> str:
        if status[host.name] is not Status.RUNNING:
            raise ProvisionError(f"{host.name} is {status[host.name].value}, not RUNNING: run `fab heal`")
        files = boot_files({
            "boot.env": (boot_env(config, host.name, provider.self_stop_env(by_name[host.name])).encode(), 0o644),
            "worker_key": (worker_key, 0o600),
            "known_hosts": (head_lines, 0o644),
            **{n: (data, 0o755) for n, data in scripts.items()},
        })
        with remote.wait_ready(host, timeout=config.ssh.boot_timeout) as conn:
            # One round trip: unpack the boot files onto the VM's disk, then boot. Its lines
            # say what failed, if anything (`confirm` reads them), whatever its exit code.
            out = remote.run_on(conn, host, UNPACK_AND_BOOT, stdin=files, timeout=BOOT_COMMAND_TIMEOUT_S,
                                check=False)
            said = out.stdout.strip()
            if not out.ok and "FAILED" not in said:
                said += f"\nboot: FAILED (exit {out.exit_code}): {' | '.join(out.stderr.strip().splitlines()[-3:])}"
            return said

    return remote.each(hosts(instances), one, what="boot")


def boot_files(files: dict[str, tuple[bytes, int]]) -> bytes:
    """The boot files as a base64 tar (modes kept: the worker key stays 0600)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return base64.encodebytes(buf.getvalue())


def boot_env(config: ClusterConfig, name: str, stop: dict[str, str]) -> str:
    """The VM's settings as shell assignments (sourced by boot.sh, mount.sh and watchdog.sh);
    `stop` is the provider's part for the idle guard (Provider.self_stop_env)."""
    values = {
        "SPOTFAN_NAME": name,
        "SPOTFAN_HEAD_USER": config.head.user,
        "SPOTFAN_HEAD_ADDRESS": config.head.address,
        "SPOTFAN_HEAD_PORT": str(config.head.port),
        "SPOTFAN_SHARE": config.head.sftp_share,  # as the jailed head user sees it
        "SPOTFAN_MOUNT": config.mount_point,
        "SPOTFAN_PYTHON": config.python,
        "SPOTFAN_PYTHONPATH": ":".join(config.python_path),
        "SPOTFAN_IDLE_TIMEOUT": f"{config.idle_timeout:g}",
        "SPOTFAN_WORKERS_PER_VM": str(config.workers_per_vm),
        "SPOTFAN_KEX": config.ssh.kex_algorithms,
        **stop,
    }
    lines = [f"{k}={shlex.quote(v)}" for k, v in values.items()]
    return "# written by `fab up`; edit cluster.toml instead\n" + "\n".join(lines) + "\n"


def down(config: ClusterConfig) -> list[str]:
    """Delete every VM of the cluster (and stop a lab head); verify none is left."""
    provider = provider_for(config)
    names = [i.name for i in provider.list()]
    provider.delete(names)
    left = [i.name for i in provider.list()]
    if left:
        raise ProvisionError(f"still present after delete: {', '.join(left)}; run `fab down` again")
    forget_count(config)
    stop_head = getattr(provider, "stop_head", None)
    if stop_head is not None:
        stop_head()
    return names


def forget_count(config: ClusterConfig) -> None:
    """After `fab down`, the next `fab up` follows cluster.toml's `workers` again."""
    try:
        with Share.from_config(config, attempts=1) as share:
            share.remove(DESIRED_FILE)
    except (SSHError, OSError) as e:
        logger.info("could not forget the worker count on the share (%s); `fab up --count N` sets it", e)


def preempt(config: ClusterConfig, *, count: int, names: Sequence[str] = ()) -> list[str]:
    """Lab only: kill `count` running VMs (or the named ones) the way a cloud preempts."""
    provider = provider_for(config)
    kill = getattr(provider, "preempt", None)
    if kill is None:
        raise ClusterError(f"fab preempt works only with the lab provider, not {config.provider!r}")
    running = [i.name for i in provider.list() if i.status is Status.RUNNING]
    chosen = list(names) if names else random.sample(running, min(count, len(running)))
    kill(chosen)
    return chosen


def running_hosts(config: ClusterConfig) -> list[Host]:
    return hosts([i for i in provider_for(config).list() if i.status is Status.RUNNING])


def exec_all(config: ClusterConfig, command: str) -> dict[str, Output]:
    """Run `command` on every running VM; GroupError carries each VM's output or error."""
    return Remote.from_config(config).run(running_hosts(config), command)
