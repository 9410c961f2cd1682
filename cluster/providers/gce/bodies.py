"""The VMs as the Compute API sees them: the Instance bodies we send (workers, the head) and how we
read one back.

The head holds the only state a cluster has (the share), so unlike a worker it is never
spot, migrates on host maintenance, restarts by itself, and keeps its data on a separate
persistent disk that outlives the VM (`autoDelete` false). Its startup-script formats that
disk only when it carries no filesystem, mounts it, and runs the jail steps of
`cluster.jail.setup_steps` (the very text `fab head-setup` prints for an existing head).
"""
from __future__ import annotations

import re
import shlex
from typing import Any

from cluster.errors import ConfigError
from cluster.providers.base import Status
from cluster.providers.gce.api import compute
from cluster.providers.gce.settings import GceSettings, HeadVmSettings
from cluster.providers.head_vm import DATA_MOUNT, format_and_mount

CLUSTER_LABEL = "spotfan-cluster"  # label key whose value is the cluster name
ROLE_LABEL = "spotfan-role"  # "worker" on workers, HEAD_ROLE on the head VM
WORKER_ROLE = "worker"
HEAD_ROLE = "head"
DATA_DEVICE = "spotfan-data"  # device name: the disk shows up as /dev/disk/by-id/google-spotfan-data
DEVICE_WAIT_S = 60  # how long the head's startup-script waits for the data disk's device to appear
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
KEY_TYPE = re.compile(r"^[a-z0-9@.-]+$")  # "ssh-ed25519", "ecdsa-sha2-nistp256", ...
KEY_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
SPOTFAN_HOME = "/var/lib/spotfan"  # the boot script's default state directory on a VM

# Runs at every shutdown; Compute Engine gives a preempted VM about 30 s for it. It leaves
# a mark on the boot disk (seen by the next boot of a STOP-action VM) and in the guest
# attributes, next to the `compute.instances.preempted` operation that `list` reads.
SHUTDOWN_SCRIPT = """#!/bin/sh
# spotfan: record a preemption (not an ordinary stop).
md=http://metadata.google.internal/computeMetadata/v1/instance
if [ "$(curl -sf -H 'Metadata-Flavor: Google' "$md/preempted")" = "TRUE" ]; then
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  mkdir -p /var/lib/spotfan && echo "$now" >> /var/lib/spotfan/preempted
  curl -sf -X PUT --data "$now" -H 'Metadata-Flavor: Google' \\
    "$md/guest-attributes/spotfan/preempted" || true
  logger -t spotfan "preempted at $now"
fi
"""


def startup_script(boot_script: str, *, user: str, home: str = SPOTFAN_HOME) -> str:
    """The `startup-script`: the boot script, run at every boot as the user `fab up` uses.

    Compute Engine runs startup scripts as root, while `fab up` runs the same boot script
    over SSH as `user`; running both as `user` keeps every file in `home` one owner's.
    """
    if user == "root":
        return boot_script
    u = shlex.quote(user)
    return f"""#!/bin/sh
# spotfan: run the boot script as {user} (the SSH user of `fab up`) at every boot.
if ! id -u {u} >/dev/null 2>&1; then
  echo "spotfan: user {user} does not exist yet; fab up will run the boot script over SSH"
  exit 0
fi
install -d -o {u} -m 700 {shlex.quote(home)}
exec runuser -u {u} -- env SPOTFAN_HOME={shlex.quote(home)} sh -c {shlex.quote(boot_script)}
"""


def instance_body(
    s: GceSettings, *, name: str, zone: str, cluster_name: str, boot_script: str, ssh_public_key: str
) -> Any:
    """The `compute_v1.Instance` to insert for worker `name` in `zone`."""
    c = compute()
    region = zone.rsplit("-", 1)[0]
    nic = c.NetworkInterface(network=s.network if "/" in s.network else f"global/networks/{s.network}")
    if s.subnetwork:
        nic.subnetwork = s.subnetwork if "/" in s.subnetwork else f"regions/{region}/subnetworks/{s.subnetwork}"
    if s.external_ip:
        nic.access_configs = [c.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
    metadata = {
        # Runs at every boot: a restarted VM resumes by itself.
        "startup-script": startup_script(boot_script, user=s.ssh_user),
        "shutdown-script": SHUTDOWN_SCRIPT,
        "enable-guest-attributes": "TRUE",  # lets the guest agent publish the host keys
        "ssh-keys": f"{s.ssh_user}:{ssh_public_key}",
    }
    gpu = s.accelerator
    return c.Instance(
        name=name,
        machine_type=f"zones/{zone}/machineTypes/{s.machine_type}",
        scheduling=scheduling(s),
        # GPUs cannot live-migrate: scheduling() sets onHostMaintenance TERMINATE with them.
        guest_accelerators=[c.AcceleratorConfig(accelerator_type=accelerator_type_path(zone, gpu.type),
                                                accelerator_count=gpu.count)] if gpu else [],
        disks=[
            c.AttachedDisk(
                boot=True,
                auto_delete=True,
                type_="PERSISTENT",
                initialize_params=c.AttachedDiskInitializeParams(
                    source_image=s.image_path,
                    disk_size_gb=s.disk_size_gb,
                    disk_type=f"zones/{zone}/diskTypes/{s.disk_type}",
                ),
            )
        ],
        network_interfaces=[nic],
        labels={**s.labels, CLUSTER_LABEL: cluster_name, ROLE_LABEL: WORKER_ROLE},
        tags=c.Tags(items=list(s.tags)),
        metadata=c.Metadata(items=[c.Items(key=k, value=v) for k, v in metadata.items()]),
        # No service account unless asked: a worker needs no Google credentials to compute.
        service_accounts=(
            [c.ServiceAccount(email=s.service_account, scopes=[CLOUD_PLATFORM_SCOPE])] if s.service_account else []
        ),
    )


def accelerator_type_path(zone: str, accelerator_type: str) -> str:
    return f"zones/{zone}/acceleratorTypes/{accelerator_type}"


def scheduling(s: GceSettings) -> Any:
    """SPOT (or legacy preemptible, or on-demand) scheduling with the run-duration cap.

    A VM with GPUs must TERMINATE on host maintenance (GPUs cannot live-migrate), so an
    on-demand GPU worker restarts instead of migrating.
    """
    c = compute()
    if s.provisioning == "preemptible":
        return c.Scheduling(preemptible=True, on_host_maintenance="TERMINATE", automatic_restart=False)
    if s.provisioning == "spot":
        result = c.Scheduling(
            provisioning_model="SPOT",
            instance_termination_action=s.termination_action,
            on_host_maintenance="TERMINATE",
            automatic_restart=False,
        )
    else:
        result = c.Scheduling(provisioning_model="STANDARD", automatic_restart=True,
                              on_host_maintenance="TERMINATE" if s.accelerator else "MIGRATE")
    if s.max_run_duration_s:
        result.max_run_duration = c.Duration(seconds=s.max_run_duration_s)
        result.instance_termination_action = s.termination_action  # required with a cap
    return result


def check_public_key(text: str, *, source: str) -> str:
    """`text` as one "type base64 [comment]" line, or ConfigError."""
    fields = text.strip().split()
    if len(fields) < 2 or not KEY_TYPE.match(fields[0]) or not KEY_BASE64.match(fields[1]):
        raise ConfigError(f"{source}: not an OpenSSH public key (\"ssh-ed25519 AAAA... comment\")")
    return " ".join(fields[:3])


def status_of(raw: Any) -> Status:
    """Our Status for a Compute `Instance.status` string."""
    value = str(raw.status)
    if value in ("STOPPING", "SUSPENDING", "PENDING_STOP"):
        return Status.STOPPING
    if value in ("TERMINATED", "STOPPED", "SUSPENDED"):
        return Status.TERMINATED
    if value in Status.__members__:
        return Status(value)
    return Status.STAGING  # e.g. REPAIRING: not usable yet, not ours to start


def zone_of(raw: Any) -> str:
    return str(raw.zone).rsplit("/", 1)[-1]


def address_of(raw: Any, *, external: bool) -> str:
    """The worker's external IP (or internal IP without one); "" until assigned or when stopped."""
    for nic in raw.network_interfaces:
        if not external:
            return nic.network_i_p
        for access in nic.access_configs:
            if access.nat_i_p:
                return access.nat_i_p
    return ""


# -- the head VM ([gce.head]) ---------------------------------------------------------

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
    return f"""#!/bin/bash
# spotfan head VM: mount the data disk (format it only if it has no filesystem), then jail.
set -eu
dev={dev}
for _ in $(seq {DEVICE_WAIT_S}); do [ -b "$dev" ] && break; sleep 1; done
[ -b "$dev" ] || {{ echo "spotfan: no data disk at $dev" >&2; exit 1; }}
{format_and_mount(DATA_MOUNT)}
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
