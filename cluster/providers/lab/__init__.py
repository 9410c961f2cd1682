"""The lab provider: worker VMs that are namespaces on this machine, and the head's sshd beside them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cluster.providers.base import ProviderSpec
from cluster.providers.lab import settings
from cluster.providers.lab.settings import LabSettings

if TYPE_CHECKING:
    from cluster.config import ClusterConfig
    from cluster.providers.lab.vms import LabProvider

__all__ = ["LAB", "LabProvider", "LabSettings"]


def __getattr__(name: str) -> Any:
    """LabProvider on first use (PEP 562): reading a cluster.toml of another provider does not load the lab."""
    if name != "LabProvider":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from cluster.providers.lab.vms import LabProvider

    return LabProvider


def make(config: ClusterConfig) -> LabProvider:
    """The lab of a parsed cluster.toml whose provider is "lab"."""
    from cluster.providers.lab.vms import LabProvider

    s = config.settings
    if not isinstance(s, LabSettings):
        raise TypeError(f"the lab provider needs LabSettings, not {type(s).__name__}")
    return LabProvider(name=config.name, state_dir=s.state_dir, address_prefix=s.address_prefix,
                       laptop_key=config.ssh.key, max_run_s=s.max_run_hours * 3600, gpus=s.gpus)


LAB = ProviderSpec(name="lab", table="lab", fields=settings.FIELDS, parse=settings.parse, make=make,
                   local_vms=True)
