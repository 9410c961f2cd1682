"""The optional head VM as the Compute API sees it: a standard VM, a data disk, a jail built at boot.

The head holds the only state a cluster has (the share), so unlike a worker it is never
spot, migrates on host maintenance, restarts by itself, and keeps its data on a separate
persistent disk that outlives the VM (`autoDelete` false). Its startup-script formats that
disk only when it carries no filesystem, mounts it, and runs the jail steps of
`cluster.jail.setup_steps` (the very text `fab head-setup` prints for an existing head).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cluster.config import JAIL_SHARE, ClusterConfig
from cluster.errors import ConfigError
from cluster.gce_client import compute
from cluster.gce_instance import CLOUD_PLATFORM_SCOPE, CLUSTER_LABEL, ROLE_LABEL
from cluster.gce_settings import GceSettings, HeadVmSettings
from cluster.keys import write_known_hosts
from cluster.provider import Instance

if TYPE_CHECKING:
    from cluster.gce import GceProvider

HEAD_ROLE = "head"  # the ROLE_LABEL value of the head VM ("worker" on workers)
DATA_DEVICE = "spotfan-data"  # device name: the disk shows up as /dev/disk/by-id/google-spotfan-data
DATA_MOUNT = "/mnt/disks/spotfan-data"  # where the head mounts its data disk; head.share lives below it
HEAD_ADDRESS = "head_vm.json"  # next to ssh.known_hosts: the head VM's address, from the last `fab up`
HEAD_KNOWN_HOSTS = "head_known_hosts"  # next to ssh.known_hosts: the head VM's lines, from guest attributes
DEVICE_WAIT_S = 60  # how long the startup-script waits for the data disk's device to appear


def head_name(cluster_name: str) -> str:
    return f"{cluster_name}-head"


def data_disk_name(cluster_name: str) -> str:
    return f"{head_name(cluster_name)}-data"


def head_startup_script(jail_steps: str) -> str:
    """The head's `startup-script`, run as root at every boot: data disk, then the jail.

    `jail_steps` is `cluster.jail.setup_steps(config)`: idempotent shell that makes the
    jailed user, the jail, the bind mount of the share, the keys file and the Match block.
    """
    dev = f"/dev/disk/by-id/google-{DATA_DEVICE}"
    mnt = shlex.quote(DATA_MOUNT)
    return f"""#!/bin/bash
# spotfan head VM: mount the data disk (format it only if it has no filesystem), then jail.
set -eu
dev={dev}
for _ in $(seq {DEVICE_WAIT_S}); do [ -b "$dev" ] && break; sleep 1; done
[ -b "$dev" ] || {{ echo "spotfan: no data disk at $dev" >&2; exit 1; }}
# blkid -p exits 2 when the device carries no signature at all: only then is it new.
rc=0; blkid -p "$dev" >/dev/null 2>&1 || rc=$?
if [ "$rc" = 2 ]; then
  mkfs.ext4 -q -m 0 -E lazy_itable_init=0,lazy_journal_init=0,discard "$dev"
elif [ "$rc" != 0 ]; then
  echo "spotfan: blkid -p $dev failed ($rc); not formatting, not mounting" >&2; exit 1
fi
uuid=$(blkid -s UUID -o value "$dev")
install -d -m 755 {mnt}
grep -qs "^UUID=$uuid " /etc/fstab || echo "UUID=$uuid {DATA_MOUNT} ext4 discard,defaults,nofail 0 2" >> /etc/fstab
mountpoint -q {mnt} || mount {mnt}

# The jail: the steps `fab head-setup` prints for an existing head, run here by spotfan
# itself, on the head VM it made.
{jail_steps}"""


def head_body(
    s: GceSettings, h: HeadVmSettings, *, cluster_name: str, jail_steps: str, ssh_public_key: str,
    reuse_data_disk: bool = False,
) -> Any:
    """The `compute_v1.Instance` to insert for the head: STANDARD, MIGRATE, boot + data disk.

    `reuse_data_disk`: attach the existing data disk (kept by an earlier `fab down --head`)
    instead of creating it with the VM.
    """
    c = compute()
    zone, region = h.zone, h.zone.rsplit("-", 1)[0]
    nic = c.NetworkInterface(network=s.network if "/" in s.network else f"global/networks/{s.network}")
    if s.subnetwork:
        nic.subnetwork = s.subnetwork if "/" in s.subnetwork else f"regions/{region}/subnetworks/{s.subnetwork}"
    if s.external_ip:
        nic.access_configs = [c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    image = h.image if h.image.startswith(("projects/", "https://")) else f"projects/{s.project}/global/images/{h.image}"
    # Never deleted with the VM (autoDelete false): the share lives here.
    data_disk = c.AttachedDisk(boot=False, auto_delete=False, type_="PERSISTENT", device_name=DATA_DEVICE)
    if reuse_data_disk:
        data_disk.source = f"zones/{zone}/disks/{data_disk_name(cluster_name)}"
    else:
        data_disk.initialize_params = c.AttachedDiskInitializeParams(
            disk_name=data_disk_name(cluster_name), disk_size_gb=h.data_disk_gb,
            disk_type=f"zones/{zone}/diskTypes/{h.data_disk_type}",
        )
    metadata = {
        "startup-script": head_startup_script(jail_steps),
        "enable-guest-attributes": "TRUE",  # the guest agent publishes the host keys: no TOFU
        "ssh-keys": f"{s.ssh_user}:{ssh_public_key}",
    }
    return c.Instance(
        name=head_name(cluster_name),
        machine_type=f"zones/{zone}/machineTypes/{h.machine_type}",
        scheduling=c.Scheduling(provisioning_model="STANDARD", on_host_maintenance="MIGRATE", automatic_restart=True),
        disks=[
            c.AttachedDisk(
                boot=True, auto_delete=True, type_="PERSISTENT",
                initialize_params=c.AttachedDiskInitializeParams(
                    source_image=image, disk_size_gb=h.boot_disk_gb, disk_type=f"zones/{zone}/diskTypes/pd-balanced",
                ),
            ),
            data_disk,
        ],
        network_interfaces=[nic],
        labels={**s.labels, CLUSTER_LABEL: cluster_name, ROLE_LABEL: HEAD_ROLE},
        tags=c.Tags(items=list(s.tags)),
        metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in metadata.items()]),
        service_accounts=(
            [c.ServiceAccount(email=s.service_account, scopes=[CLOUD_PLATFORM_SCOPE])] if s.service_account else []
        ),
    )


def up_head(config: ClusterConfig, provider: GceProvider, *, jail_steps: str) -> tuple[ClusterConfig, Instance]:
    """Create (or find) the `[gce.head]` VM; return the config that points at it, and the VM.

    The head's host keys come from its guest attributes into HEAD_KNOWN_HOSTS (never
    from a first connection), and its internal address is the one workers use.
    """
    vm = provider.create_head(jail_steps=jail_steps)
    path = config.ssh.known_hosts.with_name(HEAD_KNOWN_HOSTS)
    write_known_hosts(path, {"head": provider.head_host_key_lines(port=config.head.port)})
    # Remembered for every later command (run, status, heal, ...), so no one has to copy
    # the head's address into cluster.toml; `fab up` refreshes it.
    saved = config.ssh.known_hosts.with_name(HEAD_ADDRESS)
    tmp = saved.with_name(saved.name + ".tmp")
    tmp.write_text(json.dumps({"name": vm.name, "address": vm.address}), encoding="utf-8")
    os.replace(tmp, saved)
    return replace(config, head=replace(config.head, address=vm.address, host_keys=path)), vm


def with_saved_head(config: ClusterConfig) -> ClusterConfig:
    """The config pointed at the head VM that the last `fab up` made, if there is one.

    Only for `[gce.head] create = true`; an existing host's address stays what
    cluster.toml says.
    """
    saved = config.ssh.known_hosts.with_name(HEAD_ADDRESS)
    keys = config.ssh.known_hosts.with_name(HEAD_KNOWN_HOSTS)
    if config.provider != "gce" or not saved.exists() or not keys.exists():
        return config
    try:
        address = str(json.loads(saved.read_text(encoding="utf-8"))["address"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{saved} is damaged ({e}); run `fab up` to write it again") from e
    return replace(config, head=replace(config.head, address=address, host_keys=keys))


def check_head_vm_config(config: ClusterConfig) -> None:
    """With `[gce.head] create = true` the share lives on the head's data disk, in a jail."""
    share = str(config.head.share)
    if not share.startswith(DATA_MOUNT + "/"):
        raise ConfigError(
            f"{config.path}: head.share = {share!r}: with [gce.head] create = true the share lives on "
            f"the head VM's data disk, mounted at {DATA_MOUNT}: set head.share = \"{DATA_MOUNT}/share\""
        )
    if not config.head.jail or config.head.user == "root":
        raise ConfigError(
            f"{config.path}: a head VM always jails its SFTP user: set head.jail (e.g. "
            f"\"/srv/spotfan/{config.name}\", the share appears at JAIL{JAIL_SHARE}) and a head.user that is not root"
        )
