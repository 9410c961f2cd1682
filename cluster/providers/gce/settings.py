"""The `[gce]` table of cluster.toml, read by cluster.schema as every table is, with [cluster]
values as its defaults."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import schema
from cluster.errors import ConfigError
from cluster.providers.base import TableContext
from cluster.providers.gce.cost import CostEstimate, MachinePrice, estimate_hourly_cost
from cluster.providers.head_vm import DATA_MOUNT, head_vm_problems

PROVISIONING_MODELS = ("spot", "preemptible", "standard")
TERMINATION_ACTIONS = ("STOP", "DELETE")
DEFAULT_MAX_RUN_DURATION_S = 24 * 3600  # a forgotten worker stops after a day
DEFAULT_HEAD_IMAGE = "projects/debian-cloud/global/images/family/debian-12"  # the head runs only sshd

# GCE label keys and values: lowercase letters, digits, '_' and '-', at most 63 characters.
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_ACCELERATOR_TYPE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")  # "nvidia-tesla-t4", "nvidia-l4", ...
GPU_COUNTS = (1, 2, 4, 8, 16)  # what Compute Engine attaches to one VM


@dataclass(frozen=True)
class Accelerator:
    """The optional `[gce.accelerator]` table: the GPUs attached to every worker VM."""

    type: str  # accelerator type, e.g. "nvidia-tesla-t4" (`gcloud compute accelerator-types list`)
    count: int  # GPUs per worker VM: 1, 2, 4, 8 (or 16 where the type offers it)


@dataclass(frozen=True)
class HeadVmSettings:
    """The optional `[gce.head]` table: a standard (never spot) head VM with a data disk."""

    zone: str  # where the head VM and its data disk live; default the first of [gce].zones
    machine_type: str = "e2-standard-2"  # the head serves SFTP only
    data_disk_gb: int = 100  # the persistent data disk that holds the share
    data_disk_type: str = "pd-balanced"
    image: str = DEFAULT_HEAD_IMAGE  # boot image: any Debian-like image (no spotfan install needed)
    boot_disk_gb: int = 10  # the head's boot disk; the data lives on the data disk


@dataclass(frozen=True)
class GceSettings:
    """Everything the GCE provider needs from cluster.toml's `[gce]` table."""

    project: str  # Google Cloud project id, e.g. "my-project-123"
    zones: tuple[str, ...]  # tried in order; on stockout the next one is used
    image: str  # boot image: a name in `project`, "family/NAME", or "projects/P/global/images/..."
    machine_type: str = "e2-standard-4"  # worker machine type
    provisioning: str = "spot"  # "spot", "preemptible" (legacy) or "standard" (on-demand)
    termination_action: str = "STOP"  # what preemption does to a spot VM: STOP (restartable) or DELETE
    max_run_duration_s: int = DEFAULT_MAX_RUN_DURATION_S  # each run is capped; 0 = no cap
    disk_size_gb: int = 20  # boot disk size
    disk_type: str = "pd-balanced"  # boot disk type
    labels: Mapping[str, str] = field(default_factory=dict)  # extra labels on every VM
    tags: tuple[str, ...] = ("spotfan",)  # network tags, the target of the SSH firewall rule
    network: str = "default"  # VPC network name or URL
    subnetwork: str | None = None  # subnetwork name or URL; needed on custom-mode networks
    external_ip: bool = True  # give each worker a public IP (SSH goes to it); else the internal IP
    service_account: str | None = None  # email; None = the workers get no Google credentials
    ssh_user: str = "spotfan"  # the user the `ssh-keys` metadata entry is for
    ssh_port: int = 22  # where sshd listens on the image
    api_endpoint: str | None = None  # Compute API root; None = Google's. "http://..." = emulator
    prices: Mapping[str, MachinePrice] = field(default_factory=dict)  # machine or accelerator type -> price
    disk_prices: Mapping[str, float] = field(default_factory=dict)  # disk type -> price per GB and month
    head: HeadVmSettings | None = None  # `[gce.head] create = true`; None = the head is an existing host
    accelerator: Accelerator | None = None  # `[gce.accelerator]`: GPUs on every worker; None = CPU only

    @property
    def image_path(self) -> str:
        """The image as the API wants it: `projects/P/global/images/NAME` (or `/family/F`)."""
        if self.image.startswith(("projects/", "https://")):
            return self.image
        return f"projects/{self.project}/global/images/{self.image}"

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], *, file: Path | str = "cluster.toml") -> "GceSettings":
        """Validate a parsed `[gce]` table; every problem is reported with its key, in file order."""
        return _parse(d, file=file)

    def cost_estimate(self, workers: int) -> CostEstimate:
        gpu = self.accelerator
        return estimate_hourly_cost(
            self.prices, machine_type=self.machine_type, workers=workers, provisioning=self.provisioning,
            accelerator_type=gpu.type if gpu else None, accelerator_count=gpu.count if gpu else 0,
        )

    def head_cost_estimate(self) -> CostEstimate | None:
        """What the head VM costs per hour (standard pricing), or None without `[gce.head]`."""
        if self.head is None:
            return None
        return estimate_hourly_cost(self.prices, machine_type=self.head.machine_type, workers=1, provisioning="standard")


# --- validation: the [gce] table through the one reader of cluster.toml (cluster.schema) ---


def _zones(zones: list[str]) -> str | None:
    if not zones or not all(_ZONE.match(z) for z in zones):
        return 'must be a non-empty list of zone names like "us-central1-a"'
    if len(set(zones)) != len(zones):
        return "lists a zone twice"
    return None


def _zone(zone: str) -> str | None:
    return None if _ZONE.match(zone) else 'must be a zone name like "us-central1-a"'


def _max_run(seconds: int) -> str | None:
    return "must be 0 (no cap) or at least 30 seconds" if 0 < seconds < 30 else None


def _labels(labels: dict[str, Any]) -> str | None:
    bad = [k for k in labels if not _LABEL_KEY.match(k)]
    return f"has {bad[0]!r}, not a valid GCE label key (lowercase letters, digits, _ and -, at most 63)" if bad else None


def _label_value(value: str) -> str | None:
    return None if _LABEL_VALUE.match(value) else "is not a valid GCE label value (lowercase letters, digits, _ and -, at most 63)"


def _tags(tags: list[str]) -> str | None:
    return None if all(_LABEL_KEY.match(t) for t in tags) else 'must be network tags, lowercase names like "spotfan"'


def _endpoint(url: str) -> str | None:
    return None if url.startswith(("http://", "https://")) else "must start with http:// or https://"


def _accelerator_type(name: str) -> str | None:
    if not _ACCELERATOR_TYPE.match(name):
        return ('must be an accelerator type name like "nvidia-tesla-t4" '
                "(`gcloud compute accelerator-types list` shows them)")
    return None


def _gpu_count(count: int) -> str | None:
    return None if count in GPU_COUNTS else f"must be one of {', '.join(map(str, GPU_COUNTS))}"


ACCELERATOR_FIELDS: dict[str, schema.Field] = {
    "type": schema.text(check=_accelerator_type),
    "count": schema.whole(1, 1, 16, check=_gpu_count),
}
PRICE_FIELDS: dict[str, schema.Field] = {
    "standard": schema.number(schema.REQUIRED, 0),  # on-demand price per hour
    "spot": schema.number(None, 0),  # spot (and preemptible) price per hour
}
HEAD_FIELDS: dict[str, schema.Field] = {
    "create": schema.flag(schema.REQUIRED),
    "zone": schema.text(None, check=_zone),  # default: the first of [gce].zones
    "machine_type": schema.text("e2-standard-2"),
    "data_disk_gb": schema.whole(100, 10, 65536),
    "data_disk_type": schema.text("pd-balanced"),
    "image": schema.text(DEFAULT_HEAD_IMAGE),
}
GCE_FIELDS: dict[str, schema.Field] = {
    "project": schema.text(),
    "zones": schema.strings(schema.REQUIRED, check=_zones),
    "image": schema.text(),
    "machine_type": schema.text("e2-standard-4"),
    "provisioning": schema.text("spot", choices=PROVISIONING_MODELS),
    "termination_action": schema.text("STOP", choices=TERMINATION_ACTIONS),
    "max_run_duration_s": schema.whole(DEFAULT_MAX_RUN_DURATION_S, 0, check=_max_run),
    "disk_size_gb": schema.whole(20, 10),
    "disk_type": schema.text("pd-balanced"),
    "labels": schema.mapping(schema.text("", check=_label_value), check=_labels),
    "tags": schema.strings(["spotfan"], check=_tags),
    "network": schema.text("default"),
    "subnetwork": schema.text(None),
    "external_ip": schema.flag(True),
    "service_account": schema.text(None),
    "ssh_user": schema.text("spotfan"),
    "ssh_port": schema.whole(22, 1, 65535),
    "api_endpoint": schema.text(None, check=_endpoint),
    "prices": schema.mapping(schema.table(PRICE_FIELDS)),  # machine or GPU type -> { standard, spot } per hour
    "disk_prices": schema.mapping(schema.number(schema.REQUIRED, 0)),  # disk type -> per GB and month
    "head": schema.table(HEAD_FIELDS),
    "accelerator": schema.table(ACCELERATOR_FIELDS),  # GPUs on every worker: { type, count }
}


def _parse(d: Mapping[str, Any], *, file: Path | str) -> GceSettings:
    found = schema.problems({"gce": dict(d)}, {"gce": GCE_FIELDS})
    v = schema.values(d, GCE_FIELDS) if not found else {}
    if not found and v["provisioning"] == "preemptible" and v["max_run_duration_s"]:
        found.append(schema.Problem("gce", "max_run_duration_s", (
            'is not available with provisioning = "preemptible"; set it to 0 or use "spot"')))
    if found:
        raise schema.error(file, found)
    return GceSettings(
        project=v["project"],
        zones=tuple(v["zones"]),
        image=v["image"],
        machine_type=v["machine_type"],
        provisioning=v["provisioning"].lower(),
        termination_action=v["termination_action"].upper(),
        max_run_duration_s=v["max_run_duration_s"],
        disk_size_gb=v["disk_size_gb"],
        disk_type=v["disk_type"],
        labels=dict(v["labels"]),
        tags=tuple(v["tags"]),
        network=v["network"],
        subnetwork=v["subnetwork"],
        external_ip=v["external_ip"],
        service_account=v["service_account"],
        ssh_user=v["ssh_user"],
        ssh_port=v["ssh_port"],
        api_endpoint=v["api_endpoint"],
        prices={m: MachinePrice(standard=float(p["standard"]), spot=None if p.get("spot") is None else float(p["spot"]))
                for m, p in v["prices"].items()},
        disk_prices={t: float(p) for t, p in v["disk_prices"].items()},
        head=_head(v["head"], zones=tuple(v["zones"])),
        accelerator=None if v["accelerator"] is None else Accelerator(
            type=v["accelerator"]["type"], count=v["accelerator"].get("count", 1)),
    )


def _head(table: Mapping[str, Any] | None, *, zones: tuple[str, ...]) -> HeadVmSettings | None:
    """`[gce.head]`: absent (or `create = false`) means the head is an existing host."""
    if table is None or not table["create"]:
        return None
    h = schema.values(table, HEAD_FIELDS)
    return HeadVmSettings(
        zone=h["zone"] or zones[0],
        machine_type=h["machine_type"],
        data_disk_gb=h["data_disk_gb"],
        data_disk_type=h["data_disk_type"],
        image=h["image"],
    )


def parse(table: Mapping[str, Any], ctx: TableContext) -> tuple[GceSettings | None, list[schema.Problem]]:
    """The [gce] table of cluster.toml, with [cluster] zones, image, machine_type and spot and
    [ssh] user as defaults; and what provider = "gce" needs of the other tables."""
    c, ssh = ctx.cluster, ctx.ssh
    if not table:
        return None, [schema.Problem("cluster", "provider", '= "gce" needs a [gce] table with at least '
                                     'project = "..." (docs/cluster-toml.md has every field)')]
    table = dict(table)
    defaults: dict[str, Any] = {
        "zones": list(c["zones"]), "image": c["image"], "machine_type": c["machine_type"],
        "provisioning": "spot" if c["spot"] else "standard", "ssh_user": ssh["user"],
    }
    for k, v in defaults.items():
        if v:
            table.setdefault(k, v)
    try:
        settings = GceSettings.from_mapping(table, file=ctx.path)
    except ConfigError as e:
        return None, list(e.problems) or [schema.Problem("gce", None, str(e))]
    problems = head_vm_problems(ctx, table="gce.head") if settings.head is not None else []
    if ctx.share.headless:
        problems += _bucket_access_problems(ctx, settings)
    if str(c["idle_action"]).lower() == "delete" and not settings.service_account:
        problems.append(schema.Problem(
            "cluster", "idle_action", '= "delete": an idle worker deletes itself through the Compute '
            "API with its own service account's token: set [gce] service_account to one that may "
            'delete instances (roles/compute.instanceAdmin.v1), or use idle_action = "stop"'))
    return settings, problems



def _bucket_access_problems(ctx: TableContext, settings: GceSettings) -> list[schema.Problem]:
    """A GCE fleet on a bucket reaches it as its VMs' service account, never with copied keys."""
    if ctx.share.kind != "gcs":
        return [schema.Problem("share", "kind", (
            f'= "{ctx.share.kind}" with provider = "gce": GCE VMs reach a bucket through their service '
            'account, which only Cloud Storage accepts: use kind = "gcs" with url = "gs://BUCKET/PREFIX" '
            "(spotfan never copies storage keys to VMs)"))]
    if not settings.service_account:
        bucket = ctx.share.url.bucket if ctx.share.url else "BUCKET"
        return [schema.Problem("gce", "service_account", (
            f'is required with [share] kind = "gcs": the VMs use the bucket as this service account '
            f"(with the cloud-platform scope); grant it roles/storage.objectUser on gs://{bucket} "
            "(docs/objstore.md)"))]
    return []
