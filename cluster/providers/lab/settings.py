"""The `[lab]` table of cluster.toml: where the lab keeps its VMs, and their loopback addresses."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import schema
from cluster.providers.base import TableContext


@dataclass(frozen=True)
class LabSettings:
    """The lab provider: VMs that are namespaces on this machine."""

    state_dir: Path  # where the lab keeps its VMs' disks, pids and the head's files
    address_prefix: str  # VM N listens on f"{address_prefix}{N}:22", e.g. "127.0.1."
    max_run_hours: float  # a lab VM powers itself off after this long, like max_run_duration
    gpus: int = 0  # GPUs each lab VM claims to have: its boot checks the driver as a GPU VM's does


FIELDS: dict[str, schema.Field] = {
    "state_dir": schema.text(None),  # default .lab/NAME
    "address_prefix": schema.text("127.0.1."),
    "max_run_hours": schema.number(24.0, 0.01),
    "gpus": schema.whole(0, 0, 16),  # tests: with cluster.nvidia_smi pointing at a stand-in
}


def parse(table: Mapping[str, Any], ctx: TableContext) -> tuple[LabSettings, list[schema.Problem]]:
    """The [lab] table, checked: loopback addresses only, no VM disk inside the share, a jailed head
    (a headless lab, on a bucket, has neither: its VMs get the local store's endpoint instead)."""
    v = schema.values(table, FIELDS)
    problems = []
    prefix = v["address_prefix"]
    if not prefix.startswith("127.") or not prefix.endswith(".") or prefix.count(".") != 3:
        problems.append(schema.Problem(
            "lab", "address_prefix", f"= {prefix!r}: lab VMs live on loopback only; use three octets "
            'of 127.0.0.0/8 and a trailing dot, e.g. "127.0.1."'))
    head = ctx.head
    if head is not None and (not head.jail or head.user == "root"):
        field, value = ("jail", head.jail) if not head.jail else ("user", head.user)
        problems.append(schema.Problem("head", field, (
            f"= {value!r}: the lab always jails the head's SFTP user: set jail to a folder such as "
            '"/srv/spotfan/NAME" and user to a user that is not root (default: spotfan-NAME)')))
    state_dir = ctx.resolve(v["state_dir"] or f".lab/{ctx.cluster['name']}")
    if head is not None and (state_dir == head.share or head.share in state_dir.parents):
        # The VMs' disks hold their copies of the worker key.
        problems.append(schema.Problem(
            "lab", "state_dir", f"= {str(state_dir)!r} is inside [head] share ({head.share}): private keys "
            "must never be in the shared directory, which every VM can read; move it out"))
    return LabSettings(state_dir=state_dir, address_prefix=prefix,
                       max_run_hours=float(v["max_run_hours"]), gpus=v["gpus"]), problems
