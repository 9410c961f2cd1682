"""The providers spotfan has, by their cluster.toml name: the registry, the only module that imports them.

Adding a provider is one folder here (its `__init__` defines its ProviderSpec: its
cluster.toml table, how that table is read, how the provider is made) and one line in
PROVIDERS. What it can do beyond the `Provider` protocol is shown by the capability
protocols of cluster.providers.base that it implements.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.errors import ConfigError
from cluster.providers.aws import AWS
from cluster.providers.base import Provider, ProviderSpec
from cluster.providers.gce import GCE
from cluster.providers.lab import LAB

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

PROVIDERS: dict[str, ProviderSpec] = {
    "lab": LAB,
    "gce": GCE,
    "aws": AWS,
}


def provider_for(config: ClusterConfig) -> Provider:
    """The provider of a parsed cluster.toml (made, not connected: constructing one does no I/O)."""
    spec = PROVIDERS.get(config.provider)
    if spec is None:
        raise ConfigError(f"{config.path}: cluster.provider = {config.provider!r} is unknown; "
                          f"choose one of {', '.join(PROVIDERS)}")
    return spec.make(config)
