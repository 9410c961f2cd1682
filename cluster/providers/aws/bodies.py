"""The instances as EC2 sees them: the RunInstances request we send, the user-data, and how we read one back.

User-data is a MIME multipart of a `#cloud-config` part that sets cloud-init's
`scripts-user` module to run `always` (every boot, not only the first) and the shell
script, so a stopped and restarted spot instance runs the boot script again and resumes
by itself, as a GCE startup-script does. The script first starts the spot notice watch
(cluster/vm/spot_notice.sh), which records the two-minute interruption notice of IMDS.
"""
from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from cluster.providers.aws.settings import AwsSettings, HeadSettings
from cluster.providers.base import Status
from cluster.providers.head_vm import DATA_MOUNT, format_and_mount

CLUSTER_TAG = "spotfan-cluster"  # tag key whose value is the cluster name
ROLE_TAG = "spotfan-role"  # "worker" on workers, "head" on the head instance, "head-data" on its data volume
WORKER_ROLE = "worker"
HEAD_ROLE = "head"
DATA_ROLE = "head-data"
DATA_DEVICE = "/dev/sdf"  # where the data volume is attached (a Nitro instance shows an NVMe device instead)
DEVICE_WAIT_S = 600  # the head's user-data waits this long for its data volume, attached once it runs
CREATED_TAG = "spotfan-created"  # on a security group or key pair spotfan made: it may delete it
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")  # everything but terminated
SPOTFAN_HOME = "/var/lib/spotfan"  # the boot script's default state directory on a VM
ROOT_DEVICE = "/dev/xvda"  # the root device name most Linux AMIs use (Amazon Linux, Debian)
INTERRUPTED_CODES = ("Server.SpotInstanceShutdown", "Server.SpotInstanceTermination")
HOST_KEYS_BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
HOST_KEYS_END = "-----END SSH HOST KEY KEYS-----"
KEY_TYPE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521))$")
KEY_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
PER_BOOT_CLOUD_CONFIG = "#cloud-config\ncloud_final_modules:\n- [scripts-user, always]\n"
MAX_USER_DATA = 16 * 1024  # EC2's limit on user-data before base64


@dataclass(frozen=True)
class Launch:
    """One try at creating one worker: where, of which type, the how-many-th try."""

    name: str  # the worker, e.g. "demo-w003"
    instance_type: str  # e.g. "c6i.xlarge"
    placement: str | None  # a subnet id, an availability zone, or None (EC2 chooses)
    attempt: int  # counts this create call's tries for the VM, from 1


def client_token(cluster: str, launch: Launch, nonce: str) -> str:
    """A ClientToken from cluster, slot, attempt, type and place, unique per create call (`nonce`):
    EC2 refuses a token it saw with other parameters, or whose instance is terminated."""
    parts = "|".join((cluster, launch.name, str(launch.attempt), launch.instance_type,
                      launch.placement or "-", nonce))
    return "sf-" + hashlib.sha256(parts.encode()).hexdigest()[:40]


def shell_script(boot_script: str, *, user: str, spot_notice: str, imds_url: str,
                 home: str = SPOTFAN_HOME) -> str:
    """The user-data shell part, run as root by cloud-init at every boot: start the spot notice
    watch, then the boot script as the SSH user `fab up` uses (so every file in `home` is one owner's)."""
    u = shlex.quote(user)
    run_as = "" if user == "root" else f"runuser -u {u} -- "
    return f"""#!/bin/sh
# spotfan: at every boot, watch for a spot interruption notice, then run the boot script as {user}.
if ! id -u {u} >/dev/null 2>&1; then
  echo "spotfan: user {user} does not exist yet; fab up will run the boot script over SSH"
  exit 0
fi
SPOTFAN_HOME=${{SPOTFAN_HOME:-{shlex.quote(home)}}}
install -d -o {u} -m 700 "$SPOTFAN_HOME"
SPOTFAN_IMDS_URL={shlex.quote(imds_url)} SPOTFAN_HOME="$SPOTFAN_HOME" setsid sh -c {shlex.quote(spot_notice)} \\
  </dev/null >>"$SPOTFAN_HOME/spot_notice.log" 2>&1 &
exec {run_as}env SPOTFAN_HOME="$SPOTFAN_HOME" sh -c {shlex.quote(boot_script)}
"""


def user_data(shell: str) -> str:
    """The MIME multipart user-data: cloud-init runs `shell` at every boot."""
    mime = MIMEMultipart(boundary="==spotfan==")
    for text, subtype, filename in ((PER_BOOT_CLOUD_CONFIG, "cloud-config", "cloud-config.txt"),
                                    (shell, "x-shellscript", "spotfan-boot.sh")):
        part = MIMEText(text, subtype, "us-ascii")
        part.add_header("Content-Disposition", "attachment", filename=filename)
        mime.attach(part)
    return mime.as_string()


def run_request(s: AwsSettings, launch: Launch, *, cluster: str, user_data_text: str, group_id: str,
                key_name: str, shutdown_behavior: str, token: str) -> dict[str, Any]:
    """The RunInstances parameters for one worker."""
    tags = [{"Key": k, "Value": v} for k, v in {**s.tags, CLUSTER_TAG: cluster, ROLE_TAG: WORKER_ROLE,
                                                 "Name": launch.name}.items()]
    nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": s.public_ip, "Groups": [group_id],
                           "DeleteOnTermination": True}
    params: dict[str, Any] = {
        "ImageId": s.image, "InstanceType": launch.instance_type, "MinCount": 1, "MaxCount": 1,
        "KeyName": key_name, "UserData": user_data_text, "ClientToken": token,
        "NetworkInterfaces": [nic],
        "InstanceInitiatedShutdownBehavior": shutdown_behavior,
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": ROOT_DEVICE, "Ebs": {
            "VolumeSize": s.disk_size_gb, "VolumeType": s.volume_type, "DeleteOnTermination": True}}],
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "volume", *(("spot-instances-request",) if s.spot else ()))],
    }
    if launch.placement and launch.placement.startswith("subnet-"):
        nic["SubnetId"] = launch.placement
    elif launch.placement:
        params["Placement"] = {"AvailabilityZone": launch.placement}
    if s.spot:
        options: dict[str, Any] = {"InstanceInterruptionBehavior": s.interruption}
        # Only a persistent request can stop an instance (and start it again); terminate is one-time.
        options["SpotInstanceType"] = "persistent" if s.interruption == "stop" else "one-time"
        if s.max_price:
            options["MaxPrice"] = s.max_price
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    if s.instance_profile:
        key = "Arn" if s.instance_profile.startswith("arn:") else "Name"
        params["IamInstanceProfile"] = {key: s.instance_profile}
    return params


# -- the head instance ([aws.head]) -------------------------------------------------------

def head_name(cluster: str) -> str:
    return f"{cluster}-head"


def data_volume_name(cluster: str) -> str:
    return f"{head_name(cluster)}-data"


def head_script(jail_steps: str, *, volume_id: str) -> str:
    """The head's user-data shell part, run as root at every boot: the data volume, then the jail.

    The volume is found by its id (a Nitro instance names it by its serial, the id without
    the dash; an older one at the device it was attached at). `jail_steps` is
    `cluster.jail.setup_steps(config)`, the very text `fab head-setup` prints.
    """
    devices = f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')} /dev/xvdf {DATA_DEVICE}"
    return f"""#!/bin/bash
# spotfan head instance: mount the data volume {volume_id} (format it only if it has no filesystem), then jail.
set -eu
dev=
for _ in $(seq {DEVICE_WAIT_S}); do
  for d in {devices}; do if [ -b "$d" ]; then dev=$(readlink -f "$d"); break 2; fi; done
  sleep 1
done
[ -n "$dev" ] || {{ echo "spotfan: data volume {volume_id} is not attached (none of {devices})" >&2; exit 1; }}
{format_and_mount(DATA_MOUNT)}
# The jail: the steps `fab head-setup` prints for an existing head, run here by spotfan
# itself, on the head instance it made.
{jail_steps}"""


def head_run_request(s: AwsSettings, h: HeadSettings, *, cluster: str, zone: str, user_data_text: str,
                     group_id: str, key_name: str, token: str) -> dict[str, Any]:
    """The RunInstances parameters for the head: on-demand (never spot), IMDSv2, stops on shutdown."""
    tags = [{"Key": k, "Value": v} for k, v in {**s.tags, CLUSTER_TAG: cluster, ROLE_TAG: HEAD_ROLE,
                                                 "Name": head_name(cluster)}.items()]
    nic: dict[str, Any] = {"DeviceIndex": 0, "AssociatePublicIpAddress": s.public_ip, "Groups": [group_id],
                           "DeleteOnTermination": True}
    params: dict[str, Any] = {
        "ImageId": h.image, "InstanceType": h.instance_type, "MinCount": 1, "MaxCount": 1,
        "KeyName": key_name, "UserData": user_data_text, "ClientToken": token, "NetworkInterfaces": [nic],
        "InstanceInitiatedShutdownBehavior": "stop",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{"DeviceName": ROOT_DEVICE, "Ebs": {
            "VolumeSize": h.boot_disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}],
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
    }
    if h.subnet:
        nic["SubnetId"] = h.subnet
    else:
        params["Placement"] = {"AvailabilityZone": zone}
    return params


def data_volume_request(h: HeadSettings, *, cluster: str, zone: str, tags: dict[str, str]) -> dict[str, Any]:
    """The CreateVolume parameters of the head's data volume: encrypted, tagged, in the head's zone."""
    every = {**tags, CLUSTER_TAG: cluster, ROLE_TAG: DATA_ROLE, "Name": data_volume_name(cluster)}
    return {"AvailabilityZone": zone, "Size": h.data_volume_gb, "VolumeType": h.data_volume_type, "Encrypted": True,
            "TagSpecifications": [{"ResourceType": "volume",
                                   "Tags": [{"Key": k, "Value": v} for k, v in every.items()]}]}


def name_of(raw: dict[str, Any]) -> str:
    return next((t["Value"] for t in raw.get("Tags", []) if t["Key"] == "Name"), "")


def tag_of(raw: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in raw.get("Tags", []) if t["Key"] == key), None)


def status_of(raw: dict[str, Any]) -> Status:
    """Our Status for an EC2 instance state name."""
    state = raw["State"]["Name"]
    return {"pending": Status.PROVISIONING, "running": Status.RUNNING, "stopping": Status.STOPPING,
            "shutting-down": Status.STOPPING, "stopped": Status.TERMINATED}.get(state, Status.TERMINATED)


def zone_of(raw: dict[str, Any]) -> str | None:
    return raw.get("Placement", {}).get("AvailabilityZone")


def address_of(raw: dict[str, Any], *, public: bool) -> str:
    """The worker's public address (or private one, with public_ip = false); "" while it has none."""
    return str(raw.get("PublicIpAddress" if public else "PrivateIpAddress") or "")


def interrupted(raw: dict[str, Any]) -> bool:
    """Whether EC2 stopped or terminated it for a spot interruption (not we, nor its own shutdown)."""
    return raw.get("StateReason", {}).get("Code") in INTERRUPTED_CODES


def console_host_keys(console: str) -> list[tuple[str, str]] | None:
    """The (key type, base64) pairs cloud-init printed to the console; None if it printed no block.

    Raises ValueError when the block is there but holds something that is not a key: what
    a VM prints ends up in known_hosts.
    """
    if HOST_KEYS_BEGIN not in console:
        return None
    block = console.split(HOST_KEYS_BEGIN, 1)[1]
    if HOST_KEYS_END not in block:
        return None  # printed half-way: read again
    keys = []
    for line in block.split(HOST_KEYS_END, 1)[0].splitlines():
        fields = line.strip().split()
        if not fields:
            continue
        if len(fields) < 2 or not KEY_TYPE.match(fields[0]) or not KEY_BASE64.match(fields[1]):
            raise ValueError(f"not a host key line: {line.strip()[:80]!r}")
        keys.append((fields[0], fields[1]))
    return keys
