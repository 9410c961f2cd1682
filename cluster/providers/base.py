"""What every provider is: the records it reports, the `Provider` protocol, and the optional capabilities.

A provider creates, lists, starts, stops and deletes the worker VMs of one cluster and
reports each VM's SSH host keys, so that nothing ever trusts a host key on first use.
What only some providers can do is a small protocol of its own (`Preemptible`,
`LocalHead`, `HeadVM`, `Priced`, `SelfStopping`, `Accelerated`, `StoreAccess`), checked with `isinstance`; the
registry (cluster.providers) knows each provider by its cluster.toml name. This module
imports no implementation: implementations import it.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from cluster.config import ClusterConfig, HeadConfig, ShareConfig
    from cluster.schema import Field, Problem


class Status(str, enum.Enum):
    """A VM's lifecycle state, named as Compute Engine names them."""

    PROVISIONING = "PROVISIONING"  # being created; not reachable yet
    STAGING = "STAGING"  # created, booting
    RUNNING = "RUNNING"  # booted; SSH may take a few more seconds
    STOPPING = "STOPPING"  # being stopped or preempted
    TERMINATED = "TERMINATED"  # stopped or preempted; `start` brings it back


@dataclass(frozen=True)
class Instance:
    """One worker VM as the provider sees it."""

    name: str  # unique within the cluster, e.g. "demo-w003"
    address: str  # where SSH reaches it (an IP address or host name)
    port: int  # SSH port on `address`
    status: Status  # lifecycle state at the time of listing
    zone: str | None = None  # where it landed (None where zones mean nothing, as in the lab)
    preempted: bool = False  # True if the provider knows it was preempted (not stopped by us)
    recreated: bool = False  # True from `start`: it could not start that VM and made a new one in its place


HOURS_PER_MONTH = 730.0  # how clouds turn a monthly disk price into an hourly one


@dataclass(frozen=True)
class Charge:
    """One thing that bills now, as `fab status` shows it."""

    what: str  # e.g. "2 running workers (e2-standard-4, spot)"
    per_hour: float | None  # None: the provider knows no price for it


@dataclass(frozen=True)
class HeadLocation:
    """Where a head VM that a provider made is, as the last `fab up` recorded it."""

    name: str  # the head VM's name
    address: str  # the address workers and the laptop reach its sshd at
    zone: str | None  # where it runs
    known_hosts: Path  # its host keys as known_hosts lines, from the provider (never a first connect)


@dataclass(frozen=True)
class HeadDeleted:
    """What deleting a head VM did, and what it kept."""

    vm: str | None  # the VM deleted; None when none was there
    kept: str  # what stays (its data disk): the share is never deleted with the VM
    how_to_delete: str  # the command that deletes what was kept, for good


@runtime_checkable
class Provider(Protocol):
    """What spotfan needs from a cloud. Every method is idempotent; constructing one does no I/O."""

    def create(self, names: Sequence[str]) -> list[Instance]:
        """Create the named VMs that do not exist yet and boot them; return all of them."""
        ...

    def list(self) -> list[Instance]:
        """Every VM of this cluster, in any state."""
        ...

    def start(self, names: Sequence[str]) -> list[Instance]:
        """Start the named TERMINATED VMs again; recreate those that are gone or cannot be started
        (marked `recreated` in what it returns)."""
        ...

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named VMs (their disks stay); a stopped or missing VM counts as stopped."""
        ...

    def delete(self, names: Sequence[str]) -> None:
        """Delete the named VMs; a VM that is already gone counts as deleted."""
        ...

    def host_keys(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Each VM's SSH host public keys as `known_hosts` lines ("host keytype base64")."""
        ...

    def close(self) -> None:
        """Release what the provider holds open (API clients); it may be used again after."""
        ...


@runtime_checkable
class SelfStopping(Protocol):
    """A provider whose VMs can stop (or delete) themselves when idle (cluster/vm/watchdog.sh)."""

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        """boot.env lines for the VM's idle guard: SPOTFAN_STOP_COMMAND, and for a self-delete
        SPOTFAN_SELF_DELETE_URL and SPOTFAN_TOKEN_URL."""
        ...


@runtime_checkable
class Accelerated(Protocol):
    """A provider whose worker VMs can carry GPUs (GCE's [gce.accelerator]; EC2 GPU instance types)."""

    def gpus_per_vm(self) -> int:
        """How many GPUs every worker VM has (0: none). The boot checks the driver sees them, and
        the agent starts one worker process per `gpus_per_worker` of them (cluster/vm/gpus.py)."""
        ...


@runtime_checkable
class StoreAccess(Protocol):
    """A provider that must hand its VMs the object-store share's endpoint and credentials
    itself (the lab: its VMs have no instance role). A cloud provider gives its VMs an
    identity instead (a service account, an instance profile) and does not implement this."""

    def store_env(self, scheme: str) -> dict[str, str]:
        """The environment a VM's agent and `tasks run` need to reach the bucket (`scheme` "s3"
        or "gs"); ProvisionError when it cannot be given safely."""
        ...


@runtime_checkable
class Priced(Protocol):
    """A provider that knows what its VMs cost."""

    def describe_cost(self, workers: int) -> str:
        """What `workers` workers cost per hour, in one line (no API call)."""
        ...

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """What bills now for these VMs (and the provider's head VM, if it made one)."""
        ...


@runtime_checkable
class Preemptible(Protocol):
    """A provider that can preempt its own VMs on request, the way a cloud does (the lab)."""

    def preempt(self, names: Sequence[str]) -> None:
        """Kill the named VMs the way a cloud preempts them: every process at once."""
        ...


@runtime_checkable
class LocalHead(Protocol):
    """A provider that runs the head's sshd itself, on this machine (the lab)."""

    def start_head(self, *, share: Path, address: str, port: int, authorized: Sequence[str],
                   user: str, jail: str, workers: int) -> None:
        """Start (or keep, or resize) the head's sshd, serving `share` only to the jailed `user`."""
        ...

    def stop_head(self) -> None:
        """Stop the head's sshd and remove its jailed user; the share stays."""
        ...

    def head_host_keys(self, address: str, port: int) -> list[str]:
        """The head's known_hosts lines."""
        ...


@runtime_checkable
class HeadVM(Protocol):
    """A provider that makes the head as a VM of its own (GCE's `[gce.head] create = true`)."""

    def describe_head_cost(self) -> str:
        """What the head VM costs per hour, in one line."""
        ...

    def up_head(self, *, jail_steps: str, port: int) -> HeadLocation:
        """Create (or find, or start) the head VM, record where it is and its host keys; wait until it runs."""
        ...

    def saved_head(self) -> HeadLocation | None:
        """The head VM the last `up_head` recorded, if any."""
        ...

    def head(self) -> Instance | None:
        """The head VM as the provider lists it now, or None."""
        ...

    def delete_head(self) -> HeadDeleted:
        """Delete the head VM (a missing one is fine); its data stays."""
        ...


@dataclass(frozen=True)
class TableContext:
    """What a provider's cluster.toml table is read with, besides the table itself."""

    path: Path  # the cluster.toml
    cluster: Mapping[str, Any]  # the [cluster] values, defaults filled in
    ssh: Mapping[str, Any]  # the [ssh] values, defaults filled in
    head: HeadConfig | None  # the [head] table, read and resolved; None on a headless cluster (an object-store share)
    share: ShareConfig  # the [share] table: where the run root is
    resolve: Callable[[str], Path]  # a path of cluster.toml, resolved against its folder


@dataclass(frozen=True)
class ProviderSpec:
    """One provider as the registry knows it: its cluster.toml table and how to build it."""

    name: str  # `provider = NAME` in cluster.toml
    table: str  # its own cluster.toml table, checked for typos whatever the provider
    fields: Mapping[str, Field]  # that table's keys (cluster.schema)
    parse: Callable[[Mapping[str, Any], TableContext], tuple[object, list[Problem]]]  # -> settings, problems
    make: Callable[[ClusterConfig], Provider]  # the provider of a parsed config
    local_vms: bool = False  # its VMs share this machine's files: relative VM paths are resolved here
