"""The optional head instance of `[aws.head] create = true`: launched, found, started and terminated beside the workers.

It is told apart from the workers by its role tag (`spotfan-role=head`), so no worker path
ever counts or touches it. It is on-demand, never spot. Its EBS data volume is a resource
of its own, found by its tags (`spotfan-role=head-data`): created once, attached after the
instance runs, kept when the instance is terminated (`fab down --head`) and attached again
to the next head. The cluster's security group lets its own members reach the head's SSH
port, so the workers mount the share at the head's private address. `up_head` records
that address and the host keys the head printed to its console (never a first connection)
next to the cluster's known_hosts, for every later command.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError, ProvisionError
from cluster.providers.aws.bodies import (
    DATA_DEVICE,
    HEAD_ROLE,
    Launch,
    address_of,
    client_token,
    data_volume_name,
    data_volume_request,
    head_name,
    head_run_request,
    head_script,
    status_of,
    user_data,
    zone_of,
)
from cluster.providers.aws.api import Ec2Api
from cluster.providers.aws.calls import Timing
from cluster.providers.aws.cost import CostEstimate, estimate_hourly_cost
from cluster.providers.aws.settings import AwsSettings
from cluster.providers.aws.workers import AwsProvider
from cluster.providers.base import Charge, HeadDeleted, HeadLocation, Instance, Status
from cluster.providers.head_vm import record_head, saved_head
from cluster.ssh_keys import host_pattern

logger = logging.getLogger(__name__)


class AwsProviderWithHead(AwsProvider):
    """Workers on EC2 and the head instance of `[aws.head]`; `keys_dir` holds what `up_head` records."""

    def __init__(self, settings: AwsSettings, *, keys_dir: Path, cluster_name: str, boot_script: str | Traversable,
                 spot_notice: str | Traversable, ssh_public_key: str | Path, ssh_user: str,
                 api: Ec2Api | None = None, timing: Timing = Timing(), idle_action: str = "stop",
                 unprovisioned_stop_s: float | None = None) -> None:
        super().__init__(settings, cluster_name=cluster_name, boot_script=boot_script, spot_notice=spot_notice,
                         ssh_public_key=ssh_public_key, ssh_user=ssh_user, api=api, timing=timing,
                         idle_action=idle_action, unprovisioned_stop_s=unprovisioned_stop_s)
        if self.settings.head is None:
            raise ConfigError("no [aws.head] table with create = true: the head is an existing host")
        self.head_settings = self.settings.head
        self.keys_dir = keys_dir

    # -- capability: HeadVM ---------------------------------------------------------------

    def describe_head_cost(self) -> str:
        return self._head_estimate().describe()

    def head(self) -> Instance | None:
        """The cluster's head instance (by its role tag) at its private address; or None."""
        raw = self.ec2.list_raw(role=HEAD_ROLE)
        return self._head_instance(next(iter(raw.values()))) if raw else None

    def create_head(self, *, jail_steps: str, port: int) -> Instance:
        """Launch the head unless it exists (start it if stopped), attach its data volume; wait until it runs.

        `jail_steps` is `cluster.jail.setup_steps(config)`, run by the head's user-data at
        every boot after its data volume is mounted; `port` is the head's SSH port, which
        the cluster's security group opens to its own members (the workers).
        """
        s, h, name = self.settings, self.head_settings, head_name(self.cluster_name)
        zone = h.zone or self.ec2.subnet_zone(h.subnet)
        volume = self._data_volume(zone)
        existing = self.ec2.list_raw(role=HEAD_ROLE)
        subnet = h.subnet or (s.subnets[0] if s.subnets else None)
        group = self.ec2.ensure_security_group(s.security_group, cidr=s.ssh_cidr, port=s.ssh_port, subnet=subnet)
        self.ec2.allow_from_itself(group, port=port)
        if name in existing:
            logger.info("reusing head instance %s (%s) in %s", name, existing[name]["InstanceId"],
                        zone_of(existing[name]))
            settled = self.ec2.wait_settled([name], settled=(Status.RUNNING, Status.TERMINATED, Status.PROVISIONING),
                                            timeout_s=self.timing.stopping_timeout_s, what="stopped or running",
                                            role=HEAD_ROLE, public=False)
            if status_of(settled[name]) is Status.TERMINATED:
                self.ec2.start(settled[name]["InstanceId"], doing=f"starting head instance {name}")
        else:
            key = self.ec2.ensure_key_pair(s.key_pair, self.public_key())
            text = user_data(head_script(jail_steps, volume_id=volume["VolumeId"]))
            launch = Launch(name, h.instance_type, h.subnet or zone, 1)
            params = head_run_request(s, h, cluster=self.cluster_name, zone=zone, user_data_text=text, group_id=group,
                                      key_name=key, token=client_token(self.cluster_name, launch, uuid.uuid4().hex[:12]))
            self.ec2.run(params, doing=f"launching head instance {name} ({h.instance_type} in {h.subnet or zone})")
            logger.info("launched head instance %s in %s", name, h.subnet or zone)
        raw = self.ec2.wait_settled([name], settled=(Status.RUNNING,), timeout_s=self.timing.boot_timeout_s,
                                    what="running", role=HEAD_ROLE, public=False)[name]
        self._attach(volume, raw)
        return self._head_instance(raw)

    def up_head(self, *, jail_steps: str, port: int) -> HeadLocation:
        """Create (or find) the head; record its private address and console host keys for every later command."""
        vm = self.create_head(jail_steps=jail_steps, port=port)
        raw = self.ec2.list_raw(role=HEAD_ROLE)[vm.name]
        host = host_pattern(vm.address, port)
        lines = [f"{host} {t} {k}" for t, k in self.ec2.console_host_keys(vm.name, raw["InstanceId"])]
        return record_head(self.keys_dir, vm, lines)

    def saved_head(self) -> HeadLocation | None:
        return saved_head(self.keys_dir)

    def delete_head(self) -> HeadDeleted:
        """Terminate the head (a missing one is fine); its data volume is kept. Once no instance of
        the cluster is live, the security group and key pair spotfan made go too."""
        raw = self.ec2.list_raw(role=HEAD_ROLE)
        vm = next(iter(raw), None)
        for name, inst in raw.items():
            self.ec2.terminate(inst, doing=f"terminating head instance {name}")
        left = self.ec2.wait_gone(list(raw), role=HEAD_ROLE)
        if left:
            raise ProvisionError(f"head instance still live after terminate: {', '.join(left)}; "
                                 f"run `fab down --head` again")
        if not self.ec2.list_raw(role=None):
            for what in self.ec2.delete_created(group=self.settings.security_group, key_pair=self.settings.key_pair):
                logger.info("deleted %s (spotfan made it; no instance uses it now)", what)
        volume = self.ec2.data_volume()
        name = data_volume_name(self.cluster_name)
        if volume is None:
            return HeadDeleted(vm=vm, kept=f"no data volume (none tagged {name} is left)",
                               how_to_delete="nothing to delete")
        return HeadDeleted(vm=vm, kept=f"its data volume {name} ({volume['VolumeId']})", how_to_delete=(
            f"aws ec2 delete-volume --volume-id {volume['VolumeId']} --region {self.api.region}"))

    # -- capability: Priced, with the head's charges -----------------------------------------

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """The workers' charges, the head instance's (on-demand) and its data volume's (unpriced)."""
        out = super().billing(instances)
        h, head = self.head_settings, self.head()
        if head is not None and head.status is not Status.TERMINATED:
            out.append(Charge(f"head instance {head.name} ({h.instance_type}, on-demand)",
                              self._head_estimate().total_hour))
        if head is not None or self.ec2.data_volume() is not None:
            out.append(Charge(f"head data volume {data_volume_name(self.cluster_name)} "
                              f"({h.data_volume_gb} GB {h.data_volume_type})", None))
        return out

    # -- inside ------------------------------------------------------------------------

    def _head_estimate(self) -> CostEstimate:
        return estimate_hourly_cost(self.settings.prices, instance_type=self.head_settings.instance_type,
                                    workers=1, market="on-demand")

    def _data_volume(self, zone: str) -> dict[str, Any]:
        """The data volume kept from an earlier head, else a new one; it must be in the head's zone."""
        volume = self.ec2.data_volume()
        name = data_volume_name(self.cluster_name)
        if volume is None:
            volume = self.ec2.create_volume(data_volume_request(self.head_settings, cluster=self.cluster_name,
                                                                zone=zone, tags=dict(self.settings.tags)))
            logger.info("created data volume %s (%s, %d GB) in %s", name, volume["VolumeId"],
                        self.head_settings.data_volume_gb, zone)
        elif volume["AvailabilityZone"] != zone:
            raise ProvisionError(
                f"the data volume {name} ({volume['VolumeId']}) holds the share and is in {volume['AvailabilityZone']}, "
                f"but [aws.head] puts the head in {zone}: set [aws.head] zone = \"{volume['AvailabilityZone']}\" "
                f"(or a subnet there), or move the volume (a snapshot, then a volume in {zone})")
        else:
            logger.info("reusing data volume %s (%s)", name, volume["VolumeId"])
        return self.ec2.wait_volume(volume["VolumeId"], what="created",
                                    ready=lambda v: v.get("State") in ("available", "in-use"))

    def _attach(self, volume: dict[str, Any], raw: dict[str, Any]) -> None:
        """Attach the data volume to the head unless it is; a volume still on an old head is waited for."""
        vid, iid = volume["VolumeId"], raw["InstanceId"]
        volume = self.ec2.wait_volume(vid, what="attached here or free", ready=lambda v: v.get("State") == "available"
                                      or any(a.get("InstanceId") == iid for a in v.get("Attachments", [])))
        if any(a.get("InstanceId") == iid for a in volume.get("Attachments", [])):
            return
        self.ec2.attach_volume(vid, iid, device=DATA_DEVICE)
        self.ec2.wait_volume(vid, what="attached", ready=lambda v: any(
            a.get("InstanceId") == iid and a.get("State") == "attached" for a in v.get("Attachments", [])))
        logger.info("attached data volume %s to head instance %s at %s", vid, iid, DATA_DEVICE)

    def _head_instance(self, raw: dict[str, Any]) -> Instance:
        return Instance(name=head_name(self.cluster_name), address=address_of(raw, public=False),
                        port=self.settings.ssh_port, status=status_of(raw), zone=zone_of(raw))
