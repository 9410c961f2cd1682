"""What GCE VMs cost per hour, from the prices written in cluster.toml ([gce.prices], [gce.disk_prices])."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.providers.base import HOURS_PER_MONTH, Charge

PRICING_URL = "https://cloud.google.com/spot-vms/pricing"


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


def disk_charge(what: str, gb: int, disk_type: str, prices: Mapping[str, float]) -> Charge:
    """A disk's charge: `gb` GB of `disk_type`, priced per GB and month by `prices`."""
    price = prices.get(disk_type)
    return Charge(f"{what} ({gb} GB {disk_type})", None if price is None else gb * price / HOURS_PER_MONTH)
