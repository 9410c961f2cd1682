"""The `[gce]` table of cluster.toml, validated, and the hourly cost estimate `fab up` prints."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.errors import ConfigError

PROVISIONING_MODELS = ("spot", "preemptible", "standard")
TERMINATION_ACTIONS = ("STOP", "DELETE")
DEFAULT_MAX_RUN_DURATION_S = 24 * 3600  # a forgotten worker stops after a day
PRICING_URL = "https://cloud.google.com/spot-vms/pricing"
DEFAULT_HEAD_IMAGE = "projects/debian-cloud/global/images/family/debian-12"  # the head runs only sshd

# GCE label keys and values: lowercase letters, digits, '_' and '-', at most 63 characters.
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")


@dataclass(frozen=True)
class MachinePrice:
    """What one VM of a machine type costs per hour, in the currency the user wrote down."""

    standard: float  # on-demand price per hour
    spot: float | None = None  # spot (and legacy preemptible) price per hour; None if unknown


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
    prices: Mapping[str, MachinePrice] = field(default_factory=dict)  # machine type -> price
    head: HeadVmSettings | None = None  # `[gce.head] create = true`; None = the head is an existing host

    @property
    def image_path(self) -> str:
        """The image as the API wants it: `projects/P/global/images/NAME` (or `/family/F`)."""
        if self.image.startswith(("projects/", "https://")):
            return self.image
        return f"projects/{self.project}/global/images/{self.image}"

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "GceSettings":
        """Validate a parsed `[gce]` table; every problem is reported with its key."""
        return _parse(d)

    def cost_estimate(self, workers: int) -> "CostEstimate":
        return estimate_hourly_cost(
            self.prices, machine_type=self.machine_type, workers=workers, provisioning=self.provisioning
        )

    def head_cost_estimate(self) -> "CostEstimate | None":
        """What the head VM costs per hour (standard pricing), or None without `[gce.head]`."""
        if self.head is None:
            return None
        return estimate_hourly_cost(self.prices, machine_type=self.head.machine_type, workers=1, provisioning="standard")


@dataclass(frozen=True)
class CostEstimate:
    """An hourly cost estimate for the workers, for `fab up` to print before creating anything."""

    workers: int  # how many VMs
    machine_type: str  # of which type
    provisioning: str  # "spot", "preemptible" or "standard"
    per_vm_hour: float | None  # price of one VM per hour; None when the table has no price
    total_hour: float | None  # workers * per_vm_hour

    def describe(self) -> str:
        what = f"{self.workers} x {self.machine_type} ({self.provisioning})"
        if self.per_vm_hour is None or self.total_hour is None:
            return (
                f"{what}: no price for {self.machine_type} in [gce.prices], so no estimate; "
                f"see {PRICING_URL}"
            )
        return (
            f"{what} at {self.per_vm_hour:.4f}/h each = about {self.total_hour:.2f} per hour "
            f"(from [gce.prices]; boot disks and traffic not included; spot prices change, see "
            f"{PRICING_URL})"
        )


def estimate_hourly_cost(
    prices: Mapping[str, MachinePrice], *, machine_type: str, workers: int, provisioning: str
) -> CostEstimate:
    """Hourly cost of `workers` VMs of `machine_type` from the price table."""
    price = prices.get(machine_type)
    per_vm: float | None = None
    if price is not None:
        per_vm = price.standard if provisioning == "standard" else price.spot
    total = None if per_vm is None else per_vm * workers
    return CostEstimate(workers, machine_type, provisioning, per_vm, total)


# --- validation ------------------------------------------------------------------------

_TYPES: dict[str, type | tuple[type, ...]] = {
    "project": str, "zones": list, "image": str, "machine_type": str, "provisioning": str,
    "termination_action": str, "max_run_duration_s": int, "disk_size_gb": int,
    "disk_type": str, "labels": dict, "tags": list, "network": str, "subnetwork": str,
    "external_ip": bool, "service_account": str, "ssh_user": str, "ssh_port": int,
    "api_endpoint": str, "prices": dict, "head": dict,
}  # fmt: skip
_HEAD_TYPES: dict[str, type] = {
    "create": bool, "zone": str, "machine_type": str, "data_disk_gb": int, "data_disk_type": str, "image": str,
}  # fmt: skip
_REQUIRED = ("project", "zones", "image")


def _fail(key: str, problem: str) -> ConfigError:
    return ConfigError(f"cluster.toml [gce].{key}: {problem}")


def _parse(d: Mapping[str, Any]) -> GceSettings:
    if not isinstance(d, Mapping):
        raise ConfigError("cluster.toml: [gce] must be a table")
    unknown = sorted(set(d) - set(_TYPES))
    if unknown:
        raise ConfigError(
            f"cluster.toml [gce]: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_TYPES)}"
        )
    for key in _REQUIRED:
        if key not in d:
            raise _fail(key, "missing (required)")
    for key, value in d.items():
        expected = _TYPES[key]
        # bool is an int in Python; a `true` where a number belongs is still an error.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise _fail(key, f"expected {_type_name(expected)}, got {value!r}")

    zones = tuple(d["zones"])
    if not zones or not all(isinstance(z, str) and _ZONE.match(z) for z in zones):
        raise _fail("zones", f"expected a non-empty list of zone names like \"us-central1-a\", got {d['zones']!r}")
    if len(set(zones)) != len(zones):
        raise _fail("zones", f"a zone is listed twice: {list(zones)!r}")
    provisioning = d.get("provisioning", "spot")
    if provisioning not in PROVISIONING_MODELS:
        raise _fail("provisioning", f"must be one of {', '.join(PROVISIONING_MODELS)}, got {provisioning!r}")
    action = d.get("termination_action", "STOP").upper()
    if action not in TERMINATION_ACTIONS:
        raise _fail("termination_action", f"must be STOP or DELETE, got {d['termination_action']!r}")
    max_run = d.get("max_run_duration_s", DEFAULT_MAX_RUN_DURATION_S)
    if max_run < 0 or 0 < max_run < 30:
        raise _fail("max_run_duration_s", f"must be 0 (no cap) or at least 30 seconds, got {max_run}")
    if max_run and provisioning == "preemptible":
        raise _fail("max_run_duration_s", "is not available with provisioning = \"preemptible\"; set it to 0 or use \"spot\"")
    labels = d.get("labels", {})
    for k, v in labels.items():
        if not _LABEL_KEY.match(k) or not isinstance(v, str) or not _LABEL_VALUE.match(v):
            raise _fail("labels", f"{k} = {v!r} is not a valid GCE label (lowercase letters, digits, _ and -, at most 63)")
    tags = d.get("tags", ["spotfan"])
    if not all(isinstance(t, str) and _LABEL_KEY.match(t) for t in tags):
        raise _fail("tags", f"network tags are lowercase names like \"spotfan\", got {tags!r}")
    if not 0 < d.get("ssh_port", 22) < 65536 or d.get("disk_size_gb", 20) < 10:
        raise _fail("ssh_port/disk_size_gb", "ssh_port must be 1-65535 and disk_size_gb at least 10")
    endpoint = d.get("api_endpoint")
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise _fail("api_endpoint", f"must start with http:// or https://, got {endpoint!r}")

    return GceSettings(
        project=d["project"],
        zones=zones,
        image=d["image"],
        machine_type=d.get("machine_type", "e2-standard-4"),
        provisioning=provisioning,
        termination_action=action,
        max_run_duration_s=max_run,
        disk_size_gb=d.get("disk_size_gb", 20),
        disk_type=d.get("disk_type", "pd-balanced"),
        labels=dict(labels),
        tags=tuple(tags),
        network=d.get("network", "default"),
        subnetwork=d.get("subnetwork"),
        external_ip=d.get("external_ip", True),
        service_account=d.get("service_account"),
        ssh_user=d.get("ssh_user", "spotfan"),
        ssh_port=d.get("ssh_port", 22),
        api_endpoint=endpoint,
        prices=_parse_prices(d.get("prices", {})),
        head=_parse_head(d.get("head"), zones=zones),
    )


def _parse_head(table: Mapping[str, Any] | None, *, zones: tuple[str, ...]) -> HeadVmSettings | None:
    """`[gce.head]`: absent (or `create = false`) means the head is an existing host."""
    if table is None:
        return None
    unknown = sorted(set(table) - set(_HEAD_TYPES))
    if unknown:
        raise _fail("head", f"unknown key(s) {', '.join(unknown)}; known keys: {', '.join(_HEAD_TYPES)}")
    for key, value in table.items():
        expected = _HEAD_TYPES[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise _fail(f"head.{key}", f"expected {_type_name(expected)}, got {value!r}")
    if "create" not in table:
        raise _fail("head.create", "missing: write `create = true` to have spotfan create the head VM, or remove [gce.head] to use an existing head")
    if not table["create"]:
        return None
    zone = table.get("zone", zones[0])
    if not _ZONE.match(zone):
        raise _fail("head.zone", f"expected a zone name like \"us-central1-a\", got {zone!r}")
    size = table.get("data_disk_gb", 100)
    if not 10 <= size <= 65536:
        raise _fail("head.data_disk_gb", f"must be from 10 to 65536 (GB), got {size}")
    return HeadVmSettings(
        zone=zone,
        machine_type=table.get("machine_type", "e2-standard-2"),
        data_disk_gb=size,
        data_disk_type=table.get("data_disk_type", "pd-balanced"),
        image=table.get("image", DEFAULT_HEAD_IMAGE),
    )


def _parse_prices(table: Mapping[str, Any]) -> dict[str, MachinePrice]:
    prices = {}
    for machine_type, entry in table.items():
        if not isinstance(entry, Mapping) or not set(entry) <= {"standard", "spot"} or "standard" not in entry:
            raise _fail(f"prices.{machine_type}", f"expected {{ standard = 0.134, spot = 0.040 }}, got {entry!r}")
        numbers = [entry["standard"], entry.get("spot", 0.0)]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in numbers):
            raise _fail(f"prices.{machine_type}", f"prices must be non-negative numbers, got {entry!r}")
        spot = entry.get("spot")
        prices[machine_type] = MachinePrice(standard=float(entry["standard"]), spot=None if spot is None else float(spot))
    return prices


def _type_name(t: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a table"}
    return names.get(t, str(t)) if isinstance(t, type) else " or ".join(names[x] for x in t)
