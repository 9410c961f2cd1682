"""The provider interface: the few operations spotfan needs from any cloud, and the registry.

A provider creates, lists, starts and deletes the worker VMs of one cluster and reports
each VM's SSH host keys, so that nothing ever trusts a host key on first use. Providers
are registered by name in `PROVIDERS`; `provider = "lab"` in cluster.toml picks one.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cluster.config import ClusterConfig


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


HOURS_PER_MONTH = 730.0  # how clouds turn a monthly disk price into an hourly one


@dataclass(frozen=True)
class Charge:
    """One thing that bills now, as `fab status` shows it."""

    what: str  # e.g. "2 running workers (e2-standard-4, spot)"
    per_hour: float | None  # None: the provider knows no price for it


class Provider(Protocol):
    """What spotfan needs from a cloud. Every method is idempotent."""

    def create(self, names: Sequence[str]) -> list[Instance]:
        """Create the named VMs that do not exist yet and boot them; return all of them."""
        ...

    def list(self) -> list[Instance]:
        """Every VM of this cluster, in any state."""
        ...

    def start(self, names: Sequence[str]) -> list[Instance]:
        """Start the named TERMINATED VMs again (recreate those that are gone)."""
        ...

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named VMs (their disks stay); a stopped or missing VM counts as stopped."""
        ...

    def delete(self, names: Sequence[str]) -> None:
        """Delete the named VMs; a VM that is already gone counts as deleted."""
        ...

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """What bills now for these VMs (and the provider's head VM, if it made one)."""
        ...

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        """boot.env lines for the VM's idle guard: SPOTFAN_STOP_COMMAND, and for a self-delete
        SPOTFAN_SELF_DELETE_URL and SPOTFAN_TOKEN_URL (scripts/watchdog.sh)."""
        ...

    def host_keys(self, names: Sequence[str]) -> dict[str, list[str]]:
        """Each VM's SSH host public keys as `known_hosts` lines ("host keytype base64")."""
        ...


# name in cluster.toml -> factory taking the parsed config. Filled in by each provider
# module; kept explicit here so that one look shows every provider there is.
ProviderFactory = Callable[["ClusterConfig"], Provider]


def _lab(config: "ClusterConfig") -> Provider:
    from cluster.lab import LabProvider

    return LabProvider.from_config(config)


def _gce(config: "ClusterConfig") -> Provider:
    from cluster.gce import GceProvider

    return GceProvider.from_config(config)


PROVIDERS: dict[str, ProviderFactory] = {
    "lab": _lab,
    "gce": _gce,
}
