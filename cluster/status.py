"""`fab status`: every VM (the provider's view and its agent's heartbeat), every run (its request and the
engine's counts), what bills now, and every file on the share that was refused.

A RUNNING VM whose heartbeat on the share is stale (a dead mount, or a dead agent) is
asked over SSH for the heartbeat its agent keeps on its own disk. A forged or broken
heartbeat or request is refused and listed; the other VMs and runs are shown as usual.
"""
from __future__ import annotations

import json
import logging
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from cluster.boot import hosts
from cluster.errors import GroupError, RecordError, SSHError, StoreError
from cluster.providers.base import Charge, Instance, LocalHead, Priced, Status
from cluster.records import (LOCAL_HEARTBEAT, STALE_S, VMS_DIR, EngineCounts, Heartbeat, RunRequest, VmRun,
                             is_heartbeat, plain_name)
from cluster.remote_tasks import engine_counts
from cluster.runs import finished, requests
from cluster.session import Cluster
from cluster.ssh import Host, Output

logger = logging.getLogger(__name__)

HEARTBEAT_STALE_S = 30.0  # a heartbeat older than this is shown as stale
LOCAL_BEAT_TIMEOUT_S = 15.0  # reading a VM's own heartbeat over SSH
MAX_VM_FILES = 10_000  # heartbeat files read from the share


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
    troubles: dict[str, VmRun] = field(default_factory=dict)  # VMs whose `tasks run` exited with work left
    stuck: bool = False  # not over, and every VM that took part gave up on it


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
    problem: str = ""  # why it cannot work, as its agent said (e.g. "GPU driver not found on the image ...")


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
    refused: list[str] = field(default_factory=list)  # files on the share refused, each message naming one
    prices: str = "known"  # known | local (its VMs run on this machine: nothing bills) | unknown

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def cluster_status(cluster: Cluster, *, live: bool = True) -> ClusterStatus:
    """Every VM (provider + heartbeat) and every run (request + engine counts), and the bill.

    With no VM left (after `fab down`) a head that does not answer is no error: there is
    nothing to show. `live` False asks no VM anything (only the provider and the share).
    """
    config, provider = cluster.config, cluster.provider
    instances = provider.list()
    bill = _bill(provider, instances)
    prices = "known" if isinstance(provider, Priced) else "local" if isinstance(provider, LocalHead) else "unknown"
    running = hosts([i for i in instances if i.status is Status.RUNNING])
    now = time.time()
    refused: list[str] = []
    try:
        share = cluster.board.open(attempts=1 if not instances else 3)
        beats: dict[str, Heartbeat | None] = {}
        for n in share.listdir(VMS_DIR)[:MAX_VM_FILES]:
            vm = n[: -len(".json")]
            if is_heartbeat(n) and plain_name(vm):
                beats[vm] = share_beat(cluster, vm, n, refused)
        listed = requests(cluster)
        refused += listed.refused
        runs = [_run_status(cluster, req, running, beats, live=live, refused=refused) for req in listed.requests]
    except (SSHError, StoreError):
        if instances:
            raise
        return ClusterStatus(name=config.name, provider=config.provider, vms=[], runs=[], billing=bill,
                             head="unreachable", prices=prices)
    sources = dict.fromkeys(beats, "share")
    merged: dict[str, Heartbeat | str | None] = dict(beats)
    if live:
        stale = [i for i in instances if i.status is Status.RUNNING
                 and (beats.get(i.name) is None or beats[i.name].age(now) > STALE_S)]  # type: ignore[union-attr]
        for name, beat in _local_beats(cluster, stale).items():
            merged[name] = beat
            sources[name] = "vm"
    vms = [_vm_state(i, merged.get(i.name), sources.get(i.name, "share"), now) for i in instances]
    return ClusterStatus(name=config.name, provider=config.provider, vms=vms, runs=runs, billing=bill,
                         refused=refused, prices=prices)


def run_status(cluster: Cluster, run_id: str) -> RunStatus | None:
    """One run's status (the engine asked on a running VM), for `fab run --wait`'s progress."""
    return next((r for r in cluster_status(cluster).runs if r.id == run_id), None)


def share_beat(cluster: Cluster, vm: str, name: str, refused: list[str]) -> Heartbeat | None:
    """VM `vm`'s heartbeat file `name` on the share, validated; None if absent (a refused one is added to `refused`)."""
    rel = f"{VMS_DIR}/{name}"
    try:
        text = cluster.board.read_text(rel)
        return None if text is None else Heartbeat.from_json(text, source=rel, vm=vm)
    except RecordError as e:
        refused.append(str(e))
        return None


def _vm_state(i: Instance, beat: Heartbeat | None | str, source: str, now: float) -> VMState:
    if isinstance(beat, str):  # what a stale VM's own disk said: no agent, or no answer
        return VMState(name=i.name, address=i.address, status=i.status.value, preempted=i.preempted,
                       agent=beat, heartbeat_age=None, rate=None, heartbeat_from=source)
    return VMState(
        name=i.name, address=i.address, status=i.status.value, preempted=i.preempted,
        agent=beat.state if beat else None,
        heartbeat_age=round(beat.age(now), 1) if beat else None,
        rate=beat.rate if beat else None,
        runs={rid: r.state for rid, r in beat.runs.items()} if beat else {},
        heartbeat_from=source,
        problem=beat.problem if beat else "",
    )


def _local_beats(cluster: Cluster, stale: list[Instance]) -> dict[str, Heartbeat | str]:
    """The heartbeat each VM's agent keeps on its own disk; "no-agent" when it is stale there
    too (or missing, or refused), "unreachable" when SSH did not answer."""
    if not stale:
        return {}
    command = f'cat "${{SPOTFAN_HOME:-/var/lib/spotfan}}/{LOCAL_HEARTBEAT}" 2>/dev/null; true'
    try:
        outs: dict[str, object] = dict(cluster.remote.run(hosts(stale), command, timeout=LOCAL_BEAT_TIMEOUT_S))
    except GroupError as e:
        outs = dict(e.results)
    found: dict[str, Heartbeat | str] = {}
    now = time.time()
    for i in stale:
        out = outs.get(i.name)
        if not isinstance(out, Output):
            found[i.name] = "unreachable"
            continue
        stdout = out.stdout
        try:
            beat: Heartbeat | None = (Heartbeat.from_json(stdout, source=f"{i.name}:{LOCAL_HEARTBEAT}", vm=i.name)
                                      if stdout.strip() else None)
        except RecordError as e:
            logger.warning("%s", e)
            beat = None
        # Fresh here, stale on the share: the agent lives, and says why (mount-dead, mostly).
        found[i.name] = "no-agent" if beat is None or beat.age(now) > STALE_S * 3 else beat
    return found


def _run_status(cluster: Cluster, req: RunRequest, running: Sequence[Host], beats: dict[str, Heartbeat | None],
                *, live: bool, refused: list[str]) -> RunStatus:
    try:
        done = finished(cluster, req.id)
    except RecordError as e:
        refused.append(str(e))
        done = None
    counts: EngineCounts | None
    if done is not None:
        counts = done.status
    else:
        counts = engine_counts(cluster, req.spec_args, running) if live else None
    parts = {vm: b.runs[req.id] for vm, b in beats.items() if b is not None and req.id in b.runs}
    starts = [p.started for p in parts.values() if p.started is not None]
    troubles = {vm: p for vm, p in sorted(parts.items())
                if done is None and p.state in ("waiting", "gave-up") and p.restarts}
    return RunStatus(
        id=req.id, spec=shlex.join(req.spec_args), result=done.result if done else None,
        requested=req.created, started=min(starts) if starts else None,  # type: ignore[type-var]
        ended=done.time if done else None,
        **(asdict(counts) if counts else {}),
        troubles=troubles,
        stuck=done is None and bool(parts) and all(p.state == "gave-up" for p in parts.values()),
    )


def _bill(provider: object, instances: Sequence[Instance]) -> Bill:
    if not isinstance(provider, Priced):
        return Bill([], None)
    charges: Sequence[Charge] = provider.billing(instances)
    prices = [c.per_hour for c in charges]
    total = sum(p for p in prices if p is not None) if charges and all(p is not None for p in prices) else None
    return Bill([{"what": c.what, "per_hour": c.per_hour} for c in charges], total)
