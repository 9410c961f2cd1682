"""The lab provider: worker VMs that are namespaces on this machine, and the head's sshd beside them."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.providers.base import ProviderSpec
from cluster.providers.lab import settings
from cluster.providers.lab.settings import LabSettings
from cluster.providers.lab.vms import LabProvider

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

__all__ = ["LAB", "LabProvider", "LabSettings"]


def make(config: ClusterConfig) -> LabProvider:
    """The lab of a parsed cluster.toml whose provider is "lab"."""
    s = config.settings
    if not isinstance(s, LabSettings):
        raise TypeError(f"the lab provider needs LabSettings, not {type(s).__name__}")
    return LabProvider(name=config.name, state_dir=s.state_dir, address_prefix=s.address_prefix,
                       laptop_key=config.ssh.key, max_run_s=s.max_run_hours * 3600, gpus=s.gpus)


LAB = ProviderSpec(name="lab", table="lab", fields=settings.FIELDS, parse=settings.parse, make=make,
                   local_vms=True)
