"""The EC2 calls of one cluster: instances by tag, one run/start/stop/terminate, console host keys,
and the security group and key pair spotfan makes (or reuses) by name.

Every wait has a deadline and a bound on its polls (`Timing`); throttling and error
translation are api.Ec2Api.call's. Nothing here keeps state between commands: the
cluster tag is the truth.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cluster.errors import ProvisionError
from cluster.providers.aws.api import Ec2Api, Exists, Gone
from cluster.providers.aws.bodies import (
    CLUSTER_TAG,
    CREATED_TAG,
    DATA_ROLE,
    LIVE_STATES,
    ROLE_TAG,
    WORKER_ROLE,
    address_of,
    console_host_keys,
    name_of,
    status_of,
    tag_of,
)
from cluster.providers.base import Status

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timing:
    """Every wait bound of the provider; tests shorten them, nothing else should."""

    boot_timeout_s: float = 600.0  # a new or started instance to be running with an address
    stopping_timeout_s: float = 300.0  # a stopping instance to be stopped before `start`
    host_key_timeout_s: float = 600.0  # cloud-init to print the host keys to the console
    gone_timeout_s: float = 300.0  # terminated instances to leave the live states (`down`)
    poll_interval_s: float = 5.0  # between two looks
    max_polls: int = 1000  # hard bound on any polling loop, whatever the clock says


class Ec2:
    """EC2 as one cluster's provider uses it. Constructing it does no I/O."""

    def __init__(self, api: Ec2Api, *, cluster_name: str, timing: Timing, public: bool = True) -> None:
        self.api = api
        self.cluster_name = cluster_name
        self.timing = timing
        self.public = public  # SSH goes to the public address (else the private one)

    # -- instance types ------------------------------------------------------------------

    def gpus_of(self, types: Sequence[str]) -> dict[str, tuple[tuple[str, int], ...]]:
        """Each instance type's GPUs as EC2 describes them (`GpuInfo.Gpus[]`): (manufacturer, count)
        pairs, () for a type without GPUs. An unknown type is refused by EC2 (InvalidInstanceType)."""
        page = self.api.call("describe_instance_types", f"looking up instance types {', '.join(types)}",
                             InstanceTypes=list(types))
        found = {}
        for info in page.get("InstanceTypes", []):
            gpus = (info.get("GpuInfo") or {}).get("Gpus") or []
            found[str(info.get("InstanceType"))] = tuple((str(g.get("Manufacturer", "?")), int(g.get("Count") or 0))
                                                         for g in gpus)
        missing = [t for t in types if t not in found]
        if missing:
            raise ProvisionError(f"EC2 did not describe instance type(s) {', '.join(missing)}: check [aws] "
                                 f"instance_types (`aws ec2 describe-instance-types --instance-types {missing[0]}`)")
        return found

    # -- the cluster ---------------------------------------------------------------------

    def list_raw(self, *, role: str | None = WORKER_ROLE) -> dict[str, dict[str, Any]]:
        """The cluster's live instances of `role` (None: every role) in any state but terminated,
        by their Name tag."""
        filters = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster_name]},
                   *([{"Name": f"tag:{ROLE_TAG}", "Values": [role]}] if role else []),
                   {"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
        found: dict[str, dict[str, Any]] = {}
        token: str | None = None
        for _ in range(self.timing.max_polls):  # pages
            page = self.api.call("describe_instances", f"listing the instances of cluster {self.cluster_name}",
                                 Filters=filters, MaxResults=500, **({"NextToken": token} if token else {}))
            for reservation in page.get("Reservations", []):
                for inst in reservation.get("Instances", []):
                    name = name_of(inst)
                    if name and inst["State"]["Name"] in LIVE_STATES:
                        if name in found:  # two live instances of one slot: keep the newer, say so
                            logger.warning("two live instances named %s: %s and %s", name,
                                           found[name]["InstanceId"], inst["InstanceId"])
                        found[name] = inst
            token = page.get("NextToken")
            if not token:
                break
        return found

    def wait_settled(self, names: Sequence[str], *, settled: tuple[Status, ...], timeout_s: float,
                     what: str, role: str = WORKER_ROLE, public: bool | None = None) -> dict[str, dict[str, Any]]:
        """Poll until every named instance is in a `settled` state (and running ones have an address,
        public or private as `public` says; default the workers')."""
        public = self.public if public is None else public
        deadline = time.monotonic() + timeout_s
        raw: dict[str, dict[str, Any]] = {}
        waiting = list(names)
        for _ in range(self.timing.max_polls):
            raw = self.list_raw(role=role)
            waiting = [n for n in names if n not in raw or status_of(raw[n]) not in settled
                       or (status_of(raw[n]) is Status.RUNNING and not address_of(raw[n], public=public))]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        if waiting:
            states = ", ".join(f"{n}: {raw[n]['State']['Name'] if n in raw else 'gone'}" for n in waiting)
            raise ProvisionError(f"not {what} after {timeout_s:.0f} s ({states}); `fab heal` starts or recreates them")
        return raw

    def wait_gone(self, names: Sequence[str], *, role: str = WORKER_ROLE) -> list[str]:
        """Poll until none of `names` is live any more; the ones still live at the deadline."""
        deadline = time.monotonic() + self.timing.gone_timeout_s
        left = list(names)
        for _ in range(self.timing.max_polls):
            raw = self.list_raw(role=role)
            left = sorted(set(names) & set(raw))
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        return left

    # -- one instance ----------------------------------------------------------------------

    def run(self, params: dict[str, Any], *, doing: str) -> str:
        """RunInstances; the new instance's id."""
        out = self.api.call("run_instances", doing, **params)
        return str(out["Instances"][0]["InstanceId"])

    def start(self, instance_id: str, *, doing: str) -> None:
        self.api.call("start_instances", doing, InstanceIds=[instance_id])

    def stop(self, instance_id: str, *, doing: str) -> None:
        try:
            self.api.call("stop_instances", doing, InstanceIds=[instance_id])
        except Gone:
            return

    def terminate(self, raw: dict[str, Any], *, doing: str) -> None:
        """Cancel its spot request first (a persistent one would launch a new instance), then terminate."""
        request = raw.get("SpotInstanceRequestId")
        if request:
            try:
                self.api.call("cancel_spot_instance_requests", f"{doing} (its spot request)",
                              SpotInstanceRequestIds=[request])
            except Gone:
                pass
        try:
            self.api.call("terminate_instances", doing, InstanceIds=[raw["InstanceId"]])
        except Gone:
            return

    def cancel_open_requests(self) -> int:
        """Cancel the cluster's spot requests that are still open or active (none left to relaunch)."""
        out = self.api.call("describe_spot_instance_requests", "listing the cluster's spot requests",
                            Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster_name]},
                                     {"Name": "state", "Values": ["open", "active", "disabled"]}])
        ids = [r["SpotInstanceRequestId"] for r in out.get("SpotInstanceRequests", [])]
        if ids:
            self.api.call("cancel_spot_instance_requests", "cancelling the cluster's spot requests",
                          SpotInstanceRequestIds=ids)
        return len(ids)

    def console_host_keys(self, name: str, instance_id: str) -> list[tuple[str, str]]:
        """The host keys cloud-init printed to the instance's console, waited for."""
        deadline = time.monotonic() + self.timing.host_key_timeout_s
        for _ in range(self.timing.max_polls):
            out = self.api.call("get_console_output", f"reading the console of {name}",
                                InstanceId=instance_id, Latest=True)
            try:
                keys = console_host_keys(str(out.get("Output") or ""))
            except ValueError as e:
                raise ProvisionError(f"{name} printed a malformed host key block ({e}): refusing it") from e
            if keys:
                return keys
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        raise ProvisionError(
            f"{name} ({instance_id}) printed no SSH host keys to its console within "
            f"{self.timing.host_key_timeout_s:.0f} s: spotfan never trusts a host key on first use; use an "
            f"AMI whose cloud-init prints them (docs/aws.md, step 2), then `fab heal`")

    # -- the head's data volume -------------------------------------------------------------

    def data_volume(self) -> dict[str, Any] | None:
        """The cluster's head data volume (by its tags), unless it is being deleted or gone."""
        volumes = self.api.call("describe_volumes", f"looking for the data volume of cluster {self.cluster_name}",
                                Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster_name]},
                                         {"Name": f"tag:{ROLE_TAG}", "Values": [DATA_ROLE]},
                                         {"Name": "status", "Values": ["creating", "available", "in-use"]}])
        found = sorted(volumes.get("Volumes", []), key=lambda v: str(v.get("CreateTime", "")))
        if len(found) > 1:
            raise ProvisionError(f"cluster {self.cluster_name} has {len(found)} head data volumes "
                                 f"({', '.join(v['VolumeId'] for v in found)}): keep the one with the share, "
                                 f"delete or untag the others (`aws ec2 delete-volume --volume-id ID`)")
        return found[0] if found else None

    def create_volume(self, params: dict[str, Any]) -> dict[str, Any]:
        return dict(self.api.call("create_volume", f"creating the data volume of cluster {self.cluster_name}",
                                  **params))

    def attach_volume(self, volume_id: str, instance_id: str, *, device: str) -> None:
        self.api.call("attach_volume", f"attaching data volume {volume_id} to {instance_id}",
                      VolumeId=volume_id, InstanceId=instance_id, Device=device)

    def wait_volume(self, volume_id: str, *, ready: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Poll the volume until `ready` says so; ProvisionError at the deadline."""
        deadline = time.monotonic() + self.timing.boot_timeout_s
        volume: dict[str, Any] = {}
        for _ in range(self.timing.max_polls):
            (volume,) = self.api.call("describe_volumes", f"reading data volume {volume_id}",
                                      VolumeIds=[volume_id])["Volumes"]
            if ready(volume) or time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        if not ready(volume):
            raise ProvisionError(f"data volume {volume_id} not {what} after {self.timing.boot_timeout_s:.0f} s "
                                 f"(it is {volume.get('State')}); run `fab up` again")
        return volume

    # -- what spotfan makes once per cluster ------------------------------------------------

    def ensure_key_pair(self, name: str, public_key: str) -> str:
        """Import the laptop's public key as key pair `name`, or reuse the one of that name."""
        try:
            self.api.call("describe_key_pairs", f"looking for key pair {name}", KeyNames=[name])
            logger.info("reusing key pair %s", name)
            return name
        except Gone:
            pass
        try:
            self.api.call("import_key_pair", f"importing the laptop key as key pair {name}", KeyName=name,
                          PublicKeyMaterial=public_key.encode(), TagSpecifications=[
                              {"ResourceType": "key-pair", "Tags": self._created_tags()}])
            logger.info("imported the laptop key as key pair %s", name)
        except Exists:
            pass  # a concurrent `fab up` imported it
        return name

    def ensure_security_group(self, name: str, *, cidr: str, port: int, subnet: str | None) -> str:
        """The id of security group `name` in the VPC (of `subnet`, else the default one), made if
        missing, with SSH ingress from `cidr` (added if the group lacks it)."""
        vpc = self._vpc(subnet)
        found = self.api.call("describe_security_groups", f"looking for security group {name}", Filters=[
            {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
        if found:
            group = found[0]
            group_id = str(group["GroupId"])
            logger.info("reusing security group %s (%s)", name, group_id)
            if _allows(group, cidr=cidr, port=port):
                return group_id
        else:
            out = self.api.call("create_security_group", f"creating security group {name}", GroupName=name,
                                VpcId=vpc, Description=f"spotfan cluster {self.cluster_name}: SSH from {cidr}",
                                TagSpecifications=[{"ResourceType": "security-group", "Tags": self._created_tags()}])
            group_id = str(out["GroupId"])
            logger.info("created security group %s (%s) in %s", name, group_id, vpc)
        try:
            self.api.call("authorize_security_group_ingress", f"letting SSH into {name} from {cidr}",
                          GroupId=group_id, IpPermissions=[{
                              "IpProtocol": "tcp", "FromPort": port, "ToPort": port,
                              "IpRanges": [{"CidrIp": cidr, "Description": "spotfan: SSH from the laptop"}]}])
        except ProvisionError as e:
            if "InvalidPermission.Duplicate" not in str(e):
                raise
        return group_id

    def allow_from_itself(self, group_id: str, *, port: int) -> None:
        """Let the group's members reach `port` of one another: the workers, the head's sshd."""
        try:
            self.api.call("authorize_security_group_ingress", f"letting the workers reach the head on port {port}",
                          GroupId=group_id, IpPermissions=[{
                              "IpProtocol": "tcp", "FromPort": port, "ToPort": port, "UserIdGroupPairs": [
                                  {"GroupId": group_id, "Description": "spotfan: workers to the head's SSH"}]}])
        except ProvisionError as e:
            if "InvalidPermission.Duplicate" not in str(e):
                raise

    def delete_created(self, *, group: str, key_pair: str) -> list[str]:
        """Delete the group and key pair if spotfan made them for this cluster; what was deleted."""
        deleted = []
        groups = self.api.call("describe_security_groups", f"looking for security group {group}", Filters=[
            {"Name": "group-name", "Values": [group]},
            {"Name": f"tag:{CLUSTER_TAG}", "Values": [self.cluster_name]}])["SecurityGroups"]
        for g in groups:
            if tag_of(g, CREATED_TAG) == "true":
                try:
                    self.api.call("delete_security_group", f"deleting security group {group}", GroupId=g["GroupId"])
                    deleted.append(f"security group {group}")
                except Gone:
                    pass
        try:
            pairs = self.api.call("describe_key_pairs", f"looking for key pair {key_pair}",
                                  KeyNames=[key_pair])["KeyPairs"]
        except Gone:
            pairs = []
        for p in pairs:
            if tag_of(p, CLUSTER_TAG) == self.cluster_name and tag_of(p, CREATED_TAG) == "true":
                self.api.call("delete_key_pair", f"deleting key pair {key_pair}", KeyName=key_pair)
                deleted.append(f"key pair {key_pair}")
        return deleted

    def _created_tags(self) -> list[dict[str, str]]:
        return [{"Key": CLUSTER_TAG, "Value": self.cluster_name}, {"Key": CREATED_TAG, "Value": "true"}]

    def subnet_zone(self, subnet: str | None) -> str:
        """The availability zone of `subnet`."""
        if not subnet:
            raise ProvisionError("internal: a head without zone or subnet")  # settings never make one
        subnets = self.api.call("describe_subnets", f"reading subnet {subnet}", SubnetIds=[subnet])["Subnets"]
        return str(subnets[0]["AvailabilityZone"])

    def _vpc(self, subnet: str | None) -> str:
        if subnet:
            subnets = self.api.call("describe_subnets", f"reading subnet {subnet}", SubnetIds=[subnet])["Subnets"]
            return str(subnets[0]["VpcId"])
        vpcs = self.api.call("describe_vpcs", "looking for the default VPC",
                             Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ProvisionError(f"region {self.api.region} has no default VPC: set [aws] subnets to subnets "
                                 f"of your VPC (docs/aws.md, step 3)")
        return str(vpcs[0]["VpcId"])


def _allows(group: dict[str, Any], *, cidr: str, port: int) -> bool:
    for perm in group.get("IpPermissions", []):
        if perm.get("IpProtocol") in ("tcp", "-1") and perm.get("FromPort", 0) <= port <= perm.get("ToPort", 65535):
            if any(r.get("CidrIp") == cidr for r in perm.get("IpRanges", [])):
                return True
    return False
