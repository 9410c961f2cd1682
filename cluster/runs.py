"""Runs on a cluster: requests written to the share, their progress, per-VM state, logs.

`submit` writes a run request under ROOT/.spotfan/cluster/runs/; every VM's agent picks
it up and starts `python -m tasks run` against the mounted share. Progress comes from
the engine itself (`python -m tasks status --json`, run on a live VM over SSH), per-VM
state from the agents' heartbeats, and the end of a run from the `.done.json` record
the first agent to see it finish writes.
"""
from __future__ import annotations

import json
import logging
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster import heartbeat
from cluster.bootstrap import provider_for
from cluster.config import ClusterConfig
from cluster.errors import ClusterError, ConfigError, GroupError, SSHError
from cluster.provider import Charge, Instance, Status
from cluster.share import CLUSTER_DIR, Share
from cluster.ssh import Host, Remote
from tasks import bounds
from tasks.keys import name_problem

logger = logging.getLogger(__name__)

RUNS_DIR = f"{CLUSTER_DIR}/runs"
VMS_DIR = f"{CLUSTER_DIR}/vms"
LOGS_DIR = f"{CLUSTER_DIR}/logs"
WAIT_POLL_S = 2.0
WAIT_TIMEOUT_S = 3600.0  # `fab run --wait`: how long to follow a run before giving up (--wait-timeout)
STATUS_TIMEOUT_S = 120.0
HEARTBEAT_STALE_S = 30.0  # a heartbeat older than this is shown as stale
LOCAL_BEAT_TIMEOUT_S = 15.0  # reading a VM's own heartbeat over SSH
LOG_TAIL_BYTES = 8000
MAX_WORKERS_PER_VM = 1024  # `tasks run` on the VM caps it further, per core
MAX_WAIT_S = 30 * 86400.0  # `fab run --wait --wait-timeout`
MAX_KEY_TIMEOUT_S = 7 * 86400.0  # `fab run --timeout`: one key may run this long at most


@dataclass(frozen=True)
class RunRequest:
    """One run, as `fab run` asked for it (ROOT/.spotfan/cluster/runs/<id>.json)."""

    id: str  # e.g. "r20250101-120000-ab12"
    spec_args: list[str]  # what picks the task: SPEC or --cmd/--src/--out/--keys (+ --lease)
    run_args: list[str]  # options only `tasks run` takes (--max-attempts, --limit, ...)
    workers_per_vm: int | None  # `tasks run --workers` on each VM; None: the VM's default
    created: float  # epoch seconds
    after: str | None = None  # a run this one follows: on each VM it starts once that run's
    # process there has ended (`fab failures --retry` while the run it retries still goes)


@dataclass(frozen=True)
class RunStatus:
    """A run's progress; counts are None when no VM could be asked."""

    id: str
    spec: str  # the spec args, shell-quoted, for display
    result: str | None  # None while running; done | failed | spec-error when over
    requested: float | None = None  # epoch seconds: when `fab run` wrote the request
    started: float | None = None  # the first `tasks run` start any VM reported
    ended: float | None = None  # when the first agent saw the run over
    total: int | None = None
    done: int | None = None
    failed: int | None = None
    running: int | None = None
    pending: int | None = None


@dataclass(frozen=True)
class VMState:
    """One VM: the provider's view plus its agent's last heartbeat."""

    name: str
    address: str
    status: str  # provider status: RUNNING, TERMINATED, ...
    preempted: bool
    agent: str | None  # working | waiting | idle | mount-dead | stopped-idle | stopped | no-agent |
    # unreachable (RUNNING, but SSH did not answer); None: never heard
    heartbeat_age: float | None  # seconds since its last heartbeat
    rate: float | None  # task executions per second on this VM (last 30 s)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> this VM's part: running, done, ...
    heartbeat_from: str = "share"  # share | vm: read over SSH from the VM's disk, the share's being stale


@dataclass(frozen=True)
class Bill:
    """What bills now: the provider's charges and, where every one has a price, their sum."""

    items: list[dict[str, object]]  # {"what": ..., "per_hour": float | None}
    per_hour: float | None  # None if some charge has no known price (or there is nothing)


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    provider: str
    vms: list[VMState]
    runs: list[RunStatus]
    billing: Bill = field(default_factory=lambda: Bill([], None))
    head: str = "ok"  # ok | unreachable (then runs are unknown; with no VM left that is no news)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def spec_arguments(spec: str, *, src: str = "", keys: str = "", out: str = "", name: str = "",
                   lease: float = 0.0) -> list[str]:
    """`tasks` arguments that pick the task: SPEC is module:function, or a command line.

    A module:function never holds a space or a brace, so a SPEC that does is a command
    (`tasks run --cmd SPEC`) and needs --src or --keys, and --out.
    """
    spec = spec.strip()
    is_cmd = any(ch in spec for ch in " {")
    if is_cmd:
        if not out or bool(src) == bool(keys):
            raise ConfigError(
                f"command task {spec!r} needs --out TEMPLATE and exactly one of --src GLOB or --keys FILE"
            )
        args = ["--cmd", spec, *(["--src", src] if src else ["--keys", keys]), "--out", out]
    else:
        if ":" not in spec or src or keys or out:
            raise ConfigError(
                f"SPEC {spec!r}: give module:function (a @filetask), or a command line with "
                "{src}/{out} placeholders plus --src/--keys and --out"
            )
        args = [spec]
    if name:
        _check(f"--name {name[:80]!r}", name_problem(name))
        args += ["--name", name]
    if lease:
        _check("--lease", bounds.seconds_problem(lease, bounds.MIN_LEASE_S, bounds.MAX_LEASE_S))
        args += ["--lease", f"{lease:g}"]
    return args


def check_wait_timeout(timeout: float) -> None:
    """`fab run --wait --wait-timeout`: a finite number of seconds, at most MAX_WAIT_S."""
    _check("--wait-timeout", bounds.seconds_problem(timeout, 1, MAX_WAIT_S))


def _check(option: str, why: str | None) -> None:
    """Refuse a `fab run` number here, before a request reaches the VMs (the same bounds
    as `tasks run`, tasks.bounds)."""
    if why is not None:
        raise ConfigError(f"{option} {why}")


def run_arguments(*, max_attempts: int = 0, limit: int = 0, retry_failed: bool = False,
                  fsync: bool = False, timeout: float = 0.0) -> list[str]:
    """Options only `tasks run` takes (not `tasks status`); 0 leaves one at its default.
    `timeout`: `tasks run --timeout`, the seconds after which a key's worker is stopped and
    the attempt counts as failed."""
    args = []
    if timeout:
        _check("--timeout", bounds.seconds_problem(timeout, 0.1, MAX_KEY_TIMEOUT_S))
        args += ["--timeout", f"{timeout:g}"]
    if max_attempts:
        _check("--max-attempts", bounds.count_problem(max_attempts, 1, bounds.MAX_ATTEMPTS_LIMIT))
        args += ["--max-attempts", str(max_attempts)]
    if limit:
        _check("--limit", bounds.count_problem(limit, 1, bounds.MAX_LIMIT))
        args += ["--limit", str(limit)]
    if retry_failed:
        args.append("--retry-failed")
    if fsync:
        args.append("--fsync")
    return args


def new_run_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def submit(config: ClusterConfig, *, spec_args: Sequence[str], run_args: Sequence[str] = (),
           workers_per_vm: int | None = None, ship: Sequence[Path] = (),
           after: str | None = None) -> RunRequest:
    """Ship code to the share (optional) and write a run request the agents will pick up."""
    if not spec_args:
        raise ClusterError("nothing to run: give SPEC (module:function) or --cmd with --src/--keys and --out")
    if workers_per_vm is not None:
        _check("--workers-per-vm", bounds.count_problem(workers_per_vm, 1, MAX_WORKERS_PER_VM))
    req = RunRequest(id=new_run_id(), spec_args=list(spec_args), run_args=list(run_args),
                     workers_per_vm=workers_per_vm, created=time.time(), after=after)
    with Share.from_config(config) as share:
        for path in ship:
            n = share.ship(path)
            logger.info("shipped %s (%d files) to the share", path, n)
        share.write_text(f"{RUNS_DIR}/{req.id}.json", json.dumps(asdict(req), indent=1))
    return req


def requests(share: Share) -> list[RunRequest]:
    out = []
    for n in share.listdir(RUNS_DIR):
        if n.endswith(".json") and not n.endswith(".done.json") and not n.startswith("."):
            text = share.read_text(f"{RUNS_DIR}/{n}")
            if text:
                out.append(RunRequest(**json.loads(text)))
    return sorted(out, key=lambda r: r.created)


def finished(share: Share, run_id: str) -> dict[str, object] | None:
    text = share.read_text(f"{RUNS_DIR}/{run_id}.done.json")
    return json.loads(text) if text else None


def tasks_command(config: ClusterConfig, args: Sequence[str]) -> str:
    """The shell command that runs `python -m tasks ARGS` on a VM, in the mounted run root."""
    argv = [config.python, "-m", "tasks", *args]
    pythonpath = ":".join([config.mount_point, *config.python_path])
    return f"cd {shlex.quote(config.mount_point)} && PYTHONPATH={shlex.quote(pythonpath)} {shlex.join(argv)}"


def engine_status(config: ClusterConfig, req: RunRequest, hosts: Sequence[Host]) -> dict[str, int] | None:
    """`python -m tasks status --json` for the run, asked of the first live VM that answers."""
    remote = Remote.from_config(config)
    command = tasks_command(config, ["status", *req.spec_args, "--root", config.mount_point, "--json"])
    for host in hosts:
        try:
            with remote.open(host, attempts=1) as conn:
                out = remote.run_on(conn, host, command, timeout=STATUS_TIMEOUT_S)
            return json.loads(out.stdout)
        except (SSHError, ValueError) as e:
            logger.info("status via %s failed: %s", host.name, e)
    return None


def cluster_status(config: ClusterConfig, *, live: bool = True) -> ClusterStatus:
    """Every VM (provider + heartbeat) and every run (request + engine counts), and the bill.

    A RUNNING VM whose heartbeat on the share is stale (a dead mount, or a dead agent) is
    asked over SSH for the heartbeat its agent keeps on its own disk. With no VM left
    (after `fab down`) a head that does not answer is no error: there is nothing to show.
    """
    provider = provider_for(config)
    instances = provider.list()
    bill = _bill(provider.billing(instances))
    running = [Host(i.name, i.address, i.port) for i in instances if i.status is Status.RUNNING]
    now = time.time()
    try:
        with Share.from_config(config, attempts=1 if not instances else 3) as share:
            beats = {n[:-5]: heartbeat.parse(share.read_text(f"{VMS_DIR}/{n}")) for n in share.listdir(VMS_DIR)
                     if n.endswith(".json") and not n.startswith(".")}
            runs = []
            for req in requests(share):
                runs.append(_run_status(config, share, req, running, beats, live=live))
    except SSHError:
        if instances:
            raise
        return ClusterStatus(name=config.name, provider=config.provider, vms=[], runs=[], billing=bill,
                             head="unreachable")
    sources = dict.fromkeys(beats, "share")
    if live:
        stale = [i for i in instances if i.status is Status.RUNNING
                 and (beats.get(i.name) is None or beats[i.name].age(now) > heartbeat.STALE_S)]
        for name, beat in _local_beats(config, stale).items():
            beats[name] = beat
            sources[name] = "vm"
    vms = [_vm_state(i, beats.get(i.name), sources.get(i.name, "share"), now) for i in instances]
    return ClusterStatus(name=config.name, provider=config.provider, vms=vms, runs=runs, billing=bill)


def _vm_state(i: Instance, beat: heartbeat.Heartbeat | None | str, source: str, now: float) -> VMState:
    if isinstance(beat, str):  # what a stale VM's own disk said: no agent, or no answer
        return VMState(name=i.name, address=i.address, status=i.status.value, preempted=i.preempted,
                       agent=beat, heartbeat_age=None, rate=None, heartbeat_from=source)
    return VMState(
        name=i.name, address=i.address, status=i.status.value, preempted=i.preempted,
        agent=beat.state if beat else None,
        heartbeat_age=round(beat.age(now), 1) if beat else None,
        rate=beat.rate if beat else None,
        runs={rid: str(r.get("state")) for rid, r in beat.runs.items()} if beat else {},
        heartbeat_from=source,
    )


def _local_beats(config: ClusterConfig, stale: list[Instance]) -> dict[str, heartbeat.Heartbeat | str]:
    """The heartbeat each VM's agent keeps on its own disk; "no-agent" when it is stale there
    too (or missing), "unreachable" when SSH did not answer."""
    if not stale:
        return {}
    command = f'cat "${{SPOTFAN_HOME:-/var/lib/spotfan}}/{heartbeat.LOCAL_FILE}" 2>/dev/null; true'
    try:
        outs: dict[str, object] = dict(Remote.from_config(config).run(
            [Host(i.name, i.address, i.port) for i in stale], command, timeout=LOCAL_BEAT_TIMEOUT_S))
    except GroupError as e:
        outs = dict(e.results)
    found: dict[str, heartbeat.Heartbeat | str] = {}
    now = time.time()
    for i in stale:
        out = outs.get(i.name)
        if not hasattr(out, "stdout"):
            found[i.name] = "unreachable"
            continue
        beat = heartbeat.parse(out.stdout)  # type: ignore[union-attr]
        # Fresh here, stale on the share: the agent lives, and says why (mount-dead, mostly).
        found[i.name] = "no-agent" if beat is None or beat.age(now) > heartbeat.STALE_S * 3 else beat
    return found


def _run_status(config: ClusterConfig, share: Share, req: RunRequest, running: Sequence[Host],
                beats: dict[str, heartbeat.Heartbeat | None], *, live: bool) -> RunStatus:
    done = finished(share, req.id)
    counts = (done or {}).get("status") if done else (engine_status(config, req, running) if live else None)
    starts = [float(b.runs[req.id]["started"]) for b in beats.values()
              if b is not None and isinstance(b.runs.get(req.id, {}).get("started"), (int, float))]
    return RunStatus(
        id=req.id, spec=shlex.join(req.spec_args), result=done["result"] if done else None,
        requested=req.created, started=min(starts) if starts else None,
        ended=float(done["time"]) if done and isinstance(done.get("time"), (int, float)) else None,
        **{k: counts.get(k) for k in ("total", "done", "failed", "running", "pending")} if counts else {},
    )


def _bill(charges: Sequence[Charge]) -> Bill:
    prices = [c.per_hour for c in charges]
    total = sum(p for p in prices if p is not None) if charges and all(p is not None for p in prices) else None
    return Bill([{"what": c.what, "per_hour": c.per_hour} for c in charges], total)


def wait(config: ClusterConfig, run_id: str, *, timeout: float,
         on_progress: Callable[[RunStatus], None] | None = None, progress_every: float = 10.0) -> dict[str, object]:
    """Block until the run is over (its `.done.json` exists); return that record."""
    check_wait_timeout(timeout)
    deadline = time.monotonic() + timeout
    last_progress = 0.0
    with Share.from_config(config) as share:
        for _ in range(int(timeout / WAIT_POLL_S) + 2):
            done = finished(share, run_id)
            if done is not None:
                return done
            if on_progress and time.monotonic() - last_progress >= progress_every:
                last_progress = time.monotonic()
                st = next((r for r in cluster_status(config).runs if r.id == run_id), None)
                if st is not None:
                    on_progress(st)
            if time.monotonic() > deadline:
                break
            time.sleep(WAIT_POLL_S)
    raise ClusterError(
        f"run {run_id} not finished after {timeout:g}s; `fab status` shows where it is, "
        "`fab heal` restarts stopped VMs"
    )


def logs(config: ClusterConfig, vm: str, *, max_bytes: int = LOG_TAIL_BYTES) -> dict[str, str]:
    """The tail of each log this VM wrote to the share: its agent's and one per run."""
    with Share.from_config(config) as share:
        names = share.listdir(f"{LOGS_DIR}/{vm}")
        if not names:
            known = share.listdir(LOGS_DIR)
            raise ClusterError(
                f"no logs for {vm!r} on the share; VMs with logs: {', '.join(known) or 'none'}"
            )
        return {n: share.tail(f"{LOGS_DIR}/{vm}/{n}", max_bytes=max_bytes) or "" for n in names}
