"""What GCE VMs cost per hour, from the prices written in cluster.toml ([gce.prices], [gce.disk_prices]).

[gce.prices] is keyed by machine type and by accelerator type alike ("n1-standard-8",
"nvidia-tesla-t4"): a GPU is billed per GPU and hour on top of its VM's machine type.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.providers.base import HOURS_PER_MONTH, Charge

PRICING_URL = "https://cloud.google.com/spot-vms/pricing"
GPU_PRICING_URL = "https://cloud.google.com/compute/gpus-pricing"


@dataclass(frozen=True)
class MachinePrice:
    """What one VM of a machine type costs per hour, in the currency the user wrote down."""

    standard: float  # on-demand price per hour
    spot: float | None = None  # spot (and legacy preemptible) price per hour; None if unknown


@dataclass(frozen=True)
class CostEstimate:
    """An hourly cost estimate for the workers, for `fab up` to print before creating anything."""

    workers: int  # how many VMs
    machine_type: str  # of which type
    provisioning: str  # "spot", "preemptible" or "standard"
    per_vm_hour: float | None  # price of one VM (with its GPUs) per hour; None when a price is missing
    total_hour: float | None  # workers * per_vm_hour
    accelerator: str = ""  # each VM's GPUs, e.g. "1 x nvidia-tesla-t4"; "" for none
    missing: tuple[str, ...] = ()  # the [gce.prices] rows the estimate lacks

    def describe(self) -> str:
        gpus = f" + {self.accelerator}" if self.accelerator else ""
        what = f"{self.workers} x {self.machine_type}{gpus} ({self.provisioning})"
        if self.per_vm_hour is None or self.total_hour is None:
            lacking = " and ".join(self.missing) or self.machine_type
            return (
                f"{what}: no price for {lacking} in [gce.prices], so no estimate; "
                f"see {PRICING_URL}" + (f" and {GPU_PRICING_URL}" if self.accelerator else "")
            )
        return (
            f"{what} at {self.per_vm_hour:.4f}/h each = about {self.total_hour:.2f} per hour "
            f"(from [gce.prices]; boot disks and traffic not included; spot prices change, see "
            f"{PRICING_URL})"
        )


def estimate_hourly_cost(
    prices: Mapping[str, MachinePrice], *, machine_type: str, workers: int, provisioning: str,
    accelerator_type: str | None = None, accelerator_count: int = 0,
) -> CostEstimate:
    """Hourly cost of `workers` VMs of `machine_type`, each with `accelerator_count` GPUs of
    `accelerator_type`, from the price table."""
    def hourly(row: str) -> float | None:
        price = prices.get(row)
        if price is None:
            return None
        return price.standard if provisioning == "standard" else price.spot

    per_vm = hourly(machine_type)
    missing = [] if per_vm is not None else [machine_type]
    gpus = ""
    if accelerator_type and accelerator_count:
        gpus = f"{accelerator_count} x {accelerator_type}"
        gpu = hourly(accelerator_type)
        if gpu is None:
            missing.append(accelerator_type)
        per_vm = None if per_vm is None or gpu is None else per_vm + accelerator_count * gpu
    total = None if per_vm is None else per_vm * workers
    return CostEstimate(workers, machine_type, provisioning, per_vm, total, accelerator=gpus, missing=tuple(missing))


def disk_charge(what: str, gb: int, disk_type: str, prices: Mapping[str, float]) -> Charge:
    """A disk's charge: `gb` GB of `disk_type`, priced per GB and month by `prices`."""
    price = prices.get(disk_type)
    return Charge(f"{what} ({gb} GB {disk_type})", None if price is None else gb * price / HOURS_PER_MONTH)
