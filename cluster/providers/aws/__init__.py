"""The Amazon EC2 provider: spot workers by tag with capacity failover across zones, then instance types,
and an optional head instance."""
from __future__ import annotations

import importlib
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from cluster.providers.aws import settings
from cluster.providers.aws.settings import AwsSettings
from cluster.providers.base import ProviderSpec

if TYPE_CHECKING:
    from cluster.config import ClusterConfig
    from cluster.providers.aws.bodies import CLUSTER_TAG
    from cluster.providers.aws.calls import Timing
    from cluster.providers.aws.head import AwsProviderWithHead
    from cluster.providers.aws.workers import AwsProvider

__all__ = ["AWS", "CLUSTER_TAG", "AwsProvider", "AwsProviderWithHead", "AwsSettings", "Timing", "make"]


# Imported on first use (PEP 562): reading cluster.toml needs only the settings, and a command
# that never makes an AWS provider (`fab push` to a lab head) should not load its machinery.
_LAZY = {"CLUSTER_TAG": "bodies", "Timing": "calls", "AwsProviderWithHead": "head", "AwsProvider": "workers"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def make(config: ClusterConfig) -> AwsProvider:
    """The provider of a parsed cluster.toml whose provider is "aws": its `[aws]` table."""
    from cluster.providers.aws.head import AwsProviderWithHead
    from cluster.providers.aws.workers import AwsProvider

    s = config.settings
    if not isinstance(s, AwsSettings):
        raise TypeError(f"the AWS provider needs AwsSettings, not {type(s).__name__}")
    vm = files("cluster.vm")  # package data, read when the first instance is launched
    public_key = config.ssh.key.with_name(config.ssh.key.name + ".pub")
    unprovisioned_stop_s = config.idle_timeout + config.ssh.boot_timeout
    if s.head is not None:
        return AwsProviderWithHead(s, keys_dir=config.ssh.known_hosts.parent, cluster_name=config.name,
                                   boot_script=vm / "boot.sh", spot_notice=vm / "spot_notice.sh",
                                   ssh_public_key=public_key, ssh_user=config.ssh.user,
                                   idle_action=config.idle_action, unprovisioned_stop_s=unprovisioned_stop_s)
    return AwsProvider(s, cluster_name=config.name, boot_script=vm / "boot.sh", spot_notice=vm / "spot_notice.sh",
                       ssh_public_key=public_key, ssh_user=config.ssh.user, idle_action=config.idle_action,
                       unprovisioned_stop_s=unprovisioned_stop_s)


AWS = ProviderSpec(name="aws", table="aws", fields=settings.AWS_FIELDS, parse=settings.parse, make=make)
