"""The Google Compute Engine provider: spot workers by label with zone failover, and an optional head VM."""
from __future__ import annotations

import importlib
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from cluster.providers.base import ProviderSpec
from cluster.providers.gce import settings
from cluster.providers.gce.cost import CostEstimate, MachinePrice, estimate_hourly_cost
from cluster.providers.gce.settings import GceSettings

if TYPE_CHECKING:
    from cluster.config import ClusterConfig
    from cluster.providers.gce.bodies import CLUSTER_LABEL
    from cluster.providers.gce.calls import Timing
    from cluster.providers.gce.head import GceProviderWithHead
    from cluster.providers.gce.workers import GceProvider

__all__ = [
    "CLUSTER_LABEL", "GCE", "CostEstimate", "GceProvider", "GceProviderWithHead", "GceSettings", "MachinePrice",
    "Timing", "estimate_hourly_cost", "make",
]  # fmt: skip


# Imported on first use (PEP 562): reading cluster.toml needs only the settings, and a command
# that never makes a GCE provider (`fab push` to a lab head) should not load its machinery.
_LAZY = {"CLUSTER_LABEL": "bodies", "Timing": "calls", "GceProviderWithHead": "head", "GceProvider": "workers"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def make(config: ClusterConfig) -> GceProvider:
    """The provider of a parsed cluster.toml whose provider is "gce": its `[gce]` table, read with
    [cluster] values as defaults; with `[gce.head] create = true` the one that makes the head VM too."""
    from cluster.providers.gce.head import GceProviderWithHead
    from cluster.providers.gce.workers import GceProvider

    s = config.settings
    if not isinstance(s, GceSettings):
        raise TypeError(f"the GCE provider needs GceSettings, not {type(s).__name__}")
    boot_script = files("cluster.vm") / "boot.sh"  # package data, read when the first VM is created
    public_key = config.ssh.key.with_name(config.ssh.key.name + ".pub")
    unprovisioned_stop_s = config.idle_timeout + config.ssh.boot_timeout
    if s.head is not None:
        return GceProviderWithHead(s, keys_dir=config.ssh.known_hosts.parent, cluster_name=config.name,
                                   boot_script=boot_script, ssh_public_key=public_key,
                                   idle_action=config.idle_action, unprovisioned_stop_s=unprovisioned_stop_s)
    return GceProvider(s, cluster_name=config.name, boot_script=boot_script, ssh_public_key=public_key,
                       idle_action=config.idle_action, unprovisioned_stop_s=unprovisioned_stop_s)


GCE = ProviderSpec(name="gce", table="gce", fields=settings.GCE_FIELDS, parse=settings.parse, make=make)
