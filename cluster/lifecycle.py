"""Bringing a cluster to its working state and taking it down: up (and heal), down, preempt, exec.

`up` and `heal` share one idempotent path: make sure the right VMs exist and run, rebuild
known_hosts from what the provider reports, boot every VM (cluster.boot) and wait for
each agent's first heartbeat. Any VM that does not end up working is a failure of the
command, and is left stopped or deleted, never billing.
"""
from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cluster import jail
from cluster.boot import boot, confirm, head_known_hosts, hosts, refresh_known_hosts
from cluster.config import MAX_WORKERS
from cluster.bucket_share import BucketShare
from cluster.errors import ClusterError, GroupError, ProvisionError, RecordError, SSHError, StoreError
from cluster.providers.base import HeadDeleted, HeadLocation, HeadVM, LocalHead, Preemptible, Status
from cluster.records import DESIRED_FILE, DesiredCount
from cluster.session import Cluster
from cluster.ssh import Host, Output
from cluster.ssh_keys import ensure_key_pair
from tasks.layout import BOOKKEEPING_DIR

logger = logging.getLogger(__name__)

__all__ = ["BucketLeft", "UpPlan", "VMReport", "down", "left_in_bucket", "down_head", "exec_all", "head_known_hosts", "head_setup", "head_vm_cost",
           "kept_head", "preempt", "prepare", "running_hosts", "up", "up_head"]


@dataclass(frozen=True)
class VMReport:
    """What bringing one VM up did."""

    name: str
    action: str  # created | started | recreated (could not be started: made anew) | running (already was) | deleted
    boot: str  # what boot.sh printed (mount and agent lines)
    zone: str | None = None  # where the VM runs, for providers with zones


@dataclass(frozen=True)
class BucketLeft:
    """What `fab down` leaves in a headless cluster's bucket: everything (outputs are the user's)."""

    url: str  # the cluster's root, s3://BUCKET/PREFIX or gs://...
    records: bool  # the bookkeeping (PREFIX/.spotfan/: run requests, heartbeats, logs, claims) is there
    names: tuple[str, ...]  # the other names directly under the prefix (files and folders: inputs, outputs)


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


def ensure_keys(cluster: Cluster) -> None:
    """The cluster's key pairs (laptop -> VMs and head; VMs -> head, where there is a head), made if missing (0600)."""
    config = cluster.config
    ensure_key_pair(config.ssh.key, comment=f"spotfan-{config.name}-laptop")
    if not cluster.headless:
        ensure_key_pair(config.ssh.worker_key, comment=f"spotfan-{config.name}-worker")


def head_setup(cluster: Cluster, *, workers: int | None = None) -> str:
    """What a real head's administrator runs to jail this cluster's SFTP user and size its sshd
    for `workers` VMs (default: cluster.toml's) connecting at once (the lab does it itself)."""
    cluster.config.the_head()  # a headless cluster has no head to set up
    ensure_keys(cluster)
    return jail.setup_steps(cluster.config, workers=workers)


def head_vm_cost(cluster: Cluster) -> str | None:
    """What the head VM the provider makes costs per hour, in one line; None when it makes none."""
    provider = cluster.provider
    return provider.describe_head_cost() if isinstance(provider, HeadVM) else None


def up_head(cluster: Cluster, *, workers: int | None = None) -> HeadLocation | None:
    """With a provider that makes the head VM: create (or find) it first, and point the cluster at it;
    None when the head is an existing host (or the lab's own, started by `prepare`)."""
    provider = cluster.provider
    if cluster.headless or not isinstance(provider, HeadVM):
        return None
    # The head's sshd is sized at its creation for this many VMs connecting at once.
    location = provider.up_head(jail_steps=head_setup(cluster, workers=workers), port=cluster.config.head.port)
    cluster.use_head(location)
    return location


def prepare(cluster: Cluster, *, workers: int | None = None) -> None:
    """Keys, and where the provider runs the head itself its sshd (sized for `workers` VMs):
    everything the VMs will need before they exist."""
    ensure_keys(cluster)
    if not cluster.headless:
        _start_head(cluster, workers=cluster.config.workers if workers is None else workers)
    refresh_known_hosts(cluster, [i.name for i in cluster.provider.list()], require=False)


def _start_head(cluster: Cluster, *, workers: int) -> None:
    provider, head = cluster.provider, cluster.config.the_head()
    if isinstance(provider, LocalHead):
        provider.start_head(share=head.share, address=head.address, port=head.port,
                            authorized=jail.authorized_keys(cluster.config), user=head.user, jail=head.jail,
                            workers=workers)


def up(cluster: Cluster, *, count: int | None = None,
       on_plan: Callable[[UpPlan], None] | None = None,
       on_booted: Callable[[str, int, int], None] | None = None,
       on_waiting: Callable[[list[str], float, float], None] | None = None) -> list[VMReport]:
    """Make the cluster have `count` (default: last asked, else config) working VMs.

    `on_plan` sees what will be created, started and deleted before anything is;
    `on_booted(name, booted, of)` each VM whose boot script returned, as it does;
    `on_waiting(vms, waited_s, timeout_s)` the VMs whose agents have not reported yet, every
    15 s while there are some. Raises
    GroupError (its results: a VMReport per working VM, the error of each other one) if
    any VM does not end up working; those are left stopped or deleted, never billing.
    """
    config, provider = cluster.config, cluster.provider
    prepared = config.workers if count is None else count  # the head's sshd is sized for this many
    prepare(cluster, workers=prepared)
    remembered = None
    if count is None:
        saved = cluster.board.read_text(DESIRED_FILE)
        remembered = DesiredCount.from_json(saved, source=DESIRED_FILE).workers if saved else None
        if remembered is not None and remembered > MAX_WORKERS:
            raise RecordError(f"refused {DESIRED_FILE} on the share: {remembered} workers, more than "
                              f"{MAX_WORKERS}; `fab up --count N` writes it again")
        count = config.workers if remembered is None else remembered
    cluster.board.write_text(DESIRED_FILE, DesiredCount(count).to_json())
    if not cluster.headless and jail.fleet_size(count) != jail.fleet_size(prepared):
        _start_head(cluster, workers=count)  # sized for the remembered count instead
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
    recreated: set[str] = set()
    if stopped:
        logger.info("starting %s", ", ".join(stopped))
        recreated = {i.name for i in provider.start(stopped) if i.recreated}
    actions = ({n: "created" for n in missing} | {n: "started" for n in stopped}
               | {n: "recreated" for n in recreated})
    instances = [i for i in provider.list() if i.name in set(wanted)]
    zones = {i.name: i.zone for i in instances}
    refresh_known_hosts(cluster, [i.name for i in instances])
    booted: list[str] = []
    lock = threading.Lock()

    def one_booted(name: str) -> None:
        with lock:
            booted.append(name)
            n = len(booted)
        if on_booted is not None:
            on_booted(name, n, len(instances))

    try:
        boots: dict[str, str | BaseException] = dict(boot(cluster, instances, on_booted=one_booted))
    except GroupError as e:
        boots = dict(e.results)
    results = confirm(cluster, boots, on_waiting=on_waiting)
    results = {n: VMReport(name=n, action=actions.get(n, "running"), boot=r, zone=zones.get(n))
               if isinstance(r, str) else r for n, r in results.items()}
    failed = {n: r for n, r in results.items() if isinstance(r, BaseException)}
    if failed:
        lines = "\n".join(f"  {n}: {e}" for n, e in sorted(failed.items()))
        raise GroupError(f"{len(failed)} of {len(wanted)} VMs are not working:\n{lines}", results)
    return reports + [results[n] for n in wanted]  # type: ignore[misc]


def down(cluster: Cluster) -> list[str]:
    """Delete every VM of the cluster (and stop a head the provider runs itself); verify none is left."""
    provider = cluster.provider
    names = [i.name for i in provider.list()]
    provider.delete(names)
    left = [i.name for i in provider.list()]
    if left:
        raise ProvisionError(f"still present after delete: {', '.join(left)}; run `fab down` again")
    _forget_count(cluster)
    if isinstance(provider, LocalHead) and not cluster.headless:
        provider.stop_head()
    return names


def left_in_bucket(cluster: Cluster) -> BucketLeft | None:
    """After `fab down` on a headless cluster: what stays in the bucket (one listing of the prefix);
    None on a cluster with a head."""
    board = cluster.board
    if not isinstance(board, BucketShare):
        return None
    names = board.listdir("")
    return BucketLeft(url=board.url.url, records=BOOKKEEPING_DIR in names,
                      names=tuple(n for n in names if n != BOOKKEEPING_DIR))


def down_head(cluster: Cluster) -> HeadDeleted | None:
    """Delete the head VM the provider made (its data stays); None when the head is an existing host."""
    provider = cluster.provider
    return provider.delete_head() if isinstance(provider, HeadVM) and not cluster.headless else None


def kept_head(cluster: Cluster) -> str | None:
    """The name of the head VM `fab down` keeps ("" when none is there); None without a head VM."""
    provider = cluster.provider
    if cluster.headless or not isinstance(provider, HeadVM):
        return None
    vm = provider.head()
    return vm.name if vm is not None else ""


def _forget_count(cluster: Cluster) -> None:
    """After `fab down`, the next `fab up` follows cluster.toml's `workers` again."""
    try:
        cluster.board.open(attempts=1).remove(DESIRED_FILE)
    except (SSHError, StoreError, OSError) as e:
        logger.info("could not forget the worker count on the share (%s); `fab up --count N` sets it", e)


def preempt(cluster: Cluster, *, count: int, names: Sequence[str] = ()) -> list[str]:
    """Kill `count` running VMs (or the named ones) the way a cloud preempts, where the provider can."""
    provider = cluster.provider
    if not isinstance(provider, Preemptible):
        raise ClusterError(f"fab preempt works only with the lab provider, not {cluster.config.provider!r}")
    running = [i.name for i in provider.list() if i.status is Status.RUNNING]
    chosen = list(names) if names else random.sample(running, min(count, len(running)))
    provider.preempt(chosen)
    return chosen


def running_hosts(cluster: Cluster) -> list[Host]:
    return hosts([i for i in cluster.provider.list() if i.status is Status.RUNNING])


def exec_all(cluster: Cluster, command: str) -> dict[str, Output]:
    """Run `command` on every running VM; GroupError carries each VM's output or error."""
    return cluster.remote.run(running_hosts(cluster), command)
