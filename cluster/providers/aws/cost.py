"""What EC2 workers cost per hour, from the prices written in cluster.toml ([aws.prices])."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cluster.providers.aws.settings import InstancePrice

PRICING_URL = "https://aws.amazon.com/ec2/spot/pricing/"


@dataclass(frozen=True)
class CostEstimate:
    """An hourly cost estimate for the workers, for `fab up` to print before creating anything."""

    workers: int  # how many instances
    instance_type: str  # of which type (the first of [aws] instance_types: where they go first)
    market: str  # "spot" or "on-demand"
    per_vm_hour: float | None  # price of one instance per hour; None when the table has no price
    total_hour: float | None  # workers * per_vm_hour

    def describe(self) -> str:
        what = f"{self.workers} x {self.instance_type} ({self.market})"
        if self.per_vm_hour is None or self.total_hour is None:
            return f"{what}: no price for {self.instance_type} in [aws.prices], so no estimate; see {PRICING_URL}"
        return (f"{what} at {self.per_vm_hour:.4f}/h each = about {self.total_hour:.2f} per hour (from "
                f"[aws.prices]; volumes and traffic not included; spot prices change, see {PRICING_URL})")


def estimate_hourly_cost(prices: Mapping[str, InstancePrice], *, instance_type: str, workers: int,
                         market: str) -> CostEstimate:
    """Hourly cost of `workers` instances of `instance_type` from the price table."""
    price = prices.get(instance_type)
    per_vm = None if price is None else (price.spot if market == "spot" else price.on_demand)
    return CostEstimate(workers, instance_type, market, per_vm, None if per_vm is None else per_vm * workers)
