"""The optional head VM of `[gce.head] create = true`: created, found, started and deleted beside the workers.

It is told apart from the workers by its role label, so no worker path ever counts or
touches it; its data disk outlives it (`fab down --head` keeps the disk, and the next
head gets it attached again). `up_head` records the head's address and its host keys
(from its guest attributes, never from a first connection) next to the cluster's
known_hosts, for every later command.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path

from cluster.errors import ConfigError, ProvisionError
from cluster.providers.base import Charge, HeadDeleted, HeadLocation, Instance, Status
from cluster.providers.gce.api import GceClients
from cluster.providers.gce.bodies import HEAD_ROLE, address_of, data_disk_name, head_body, head_name, status_of, zone_of
from cluster.providers.gce.calls import Timing
from cluster.providers.gce.cost import disk_charge
from cluster.providers.gce.settings import GceSettings
from cluster.providers.gce.workers import GceProvider
from cluster.providers.head_vm import record_head, saved_head

logger = logging.getLogger(__name__)


class GceProviderWithHead(GceProvider):
    """Workers on Compute Engine and the head VM of `[gce.head]`; `keys_dir` holds what `up_head` records."""

    def __init__(self, settings: GceSettings, *, keys_dir: Path, cluster_name: str, boot_script: str | Traversable,
                 ssh_public_key: str | Path, client_factory: Callable[[GceSettings], GceClients] | None = None,
                 timing: Timing = Timing(), idle_action: str = "stop",
                 unprovisioned_stop_s: float | None = None) -> None:
        super().__init__(settings, cluster_name=cluster_name, boot_script=boot_script, ssh_public_key=ssh_public_key,
                         client_factory=client_factory, timing=timing, idle_action=idle_action,
                         unprovisioned_stop_s=unprovisioned_stop_s)
        if self.settings.head is None:
            raise ConfigError("no [gce.head] table with create = true: the head is an existing host")
        self.head_settings = self.settings.head
        self.keys_dir = keys_dir

    # -- capability: HeadVM ---------------------------------------------------------------

    def describe_head_cost(self) -> str:
        estimate = self.settings.head_cost_estimate()
        assert estimate is not None  # a head table is there
        return estimate.describe()

    def head(self) -> Instance | None:
        """The cluster's head VM (found by label `spotfan-role=head`), its internal address; or None."""
        raw = self.compute.list_raw(role=HEAD_ROLE)
        if not raw:
            return None
        return self._to_instance(next(iter(raw.values())), external=False)

    def create_head(self, *, jail_steps: str) -> Instance:
        """Create the head VM unless it exists (start it if stopped); wait until it runs.

        `jail_steps` is `cluster.jail.setup_steps(config)`, run by the head's startup-script
        at every boot after its data disk is mounted.
        """
        h = self.head_settings
        name = head_name(self.cluster_name)
        existing = self.compute.list_raw(role=HEAD_ROLE)
        if name in existing:
            logger.info("reusing head VM %s in %s", name, zone_of(existing[name]))
            if status_of(existing[name]) in (Status.TERMINATED, Status.STOPPING):
                self.compute.start(name, zone_of(existing[name]))
        else:
            # A data disk kept by `fab down --head` is attached again, never created anew.
            reuse = self.compute.disk_exists(data_disk_name(self.cluster_name), h.zone)
            body = head_body(self.settings, h, cluster_name=self.cluster_name, jail_steps=jail_steps,
                             ssh_public_key=self.public_key(), reuse_data_disk=reuse)
            self.compute.insert(name, h.zone, body)
            logger.info("created head VM %s in %s with %s data disk %s", name, h.zone,
                        "its kept" if reuse else "a new", data_disk_name(self.cluster_name))
        timing = self.timing
        deadline = time.monotonic() + timing.boot_timeout_s
        for _ in range(timing.max_polls):
            raw = self.compute.list_raw(role=HEAD_ROLE).get(name)
            if raw is not None and status_of(raw) is Status.RUNNING and address_of(raw, external=False):
                return self._to_instance(raw, external=False)
            if time.monotonic() >= deadline:
                break
            time.sleep(timing.poll_interval_s)
        raise ProvisionError(f"head VM {name} not RUNNING after {timing.boot_timeout_s:.0f} s; run `fab up` again")

    def head_host_key_lines(self, *, port: int) -> list[str]:
        """The head VM's `known_hosts` lines (for its internal address) from its guest attributes."""
        raw = self.compute.list_raw(role=HEAD_ROLE).get(head_name(self.cluster_name))
        if raw is None:
            raise ProvisionError(f"cluster {self.cluster_name} has no head VM: `fab up` creates it")
        return self._known_hosts_lines(raw.name, raw, external=False, port=port)

    def up_head(self, *, jail_steps: str, port: int) -> HeadLocation:
        """Create (or find) the head VM; record its address and host keys for every later command.

        The head's host keys come from its guest attributes (never from a first connection),
        and its internal address is the one workers use.
        """
        vm = self.create_head(jail_steps=jail_steps)
        return record_head(self.keys_dir, vm, self.head_host_key_lines(port=port))

    def saved_head(self) -> HeadLocation | None:
        """The head VM the last `fab up` recorded; None before the first one."""
        return saved_head(self.keys_dir)

    def delete_head(self) -> HeadDeleted:
        """Delete the head VM (a missing one is fine); its data disk is kept."""
        raw = self.compute.list_raw(role=HEAD_ROLE)
        vm = next(iter(raw), None)
        zone = zone_of(raw[vm]) if vm else self.head_settings.zone
        for name, inst in raw.items():
            self.compute.delete(name, zone_of(inst))
        left = sorted(self.compute.list_raw(role=HEAD_ROLE))
        if left:
            raise ProvisionError(f"head VM still listed after delete: {', '.join(left)}; run `fab down --head` again")
        disk = data_disk_name(self.cluster_name)
        return HeadDeleted(vm=vm, kept=f"its data disk {disk}", how_to_delete=(
            f"gcloud compute disks delete {disk} --zone {zone} --project {self.settings.project}"))

    # -- capability: Priced, with the head's charges -----------------------------------------

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """The workers' charges, and the head VM's and its disks'."""
        out = super().billing(instances)
        s, h = self.settings, self.head_settings
        head = self.head()
        if head is not None:
            if head.status is not Status.TERMINATED:
                vm = s.head_cost_estimate()
                out.append(Charge(f"head VM {head.name} ({h.machine_type}, standard)",
                                  vm.total_hour if vm is not None else None))
            out.append(disk_charge(f"head VM {head.name}'s boot disk", h.boot_disk_gb, "pd-balanced", s.disk_prices))
        disk = data_disk_name(self.cluster_name)
        if head is not None or self.compute.disk_exists(disk, h.zone):
            out.append(disk_charge(f"head data disk {disk}", h.data_disk_gb, h.data_disk_type, s.disk_prices))
        return out
