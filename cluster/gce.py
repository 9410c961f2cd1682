"""The Google Compute Engine provider: spot workers created, healed and deleted by cluster label.

Every VM carries the label `spotfan-cluster=<cluster name>`; that label, not local state,
is what `create`, `list`, `start` and `delete` work from, so each is safe to run twice
and from any laptop. Operations are checked here (`operation.error`), never trusted to
raise, and polled with our own operations client (the SDK's poller ignores the endpoint).
"""
from __future__ import annotations

import logging
import re
import shlex
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cluster import gce_client
from cluster.errors import ConfigError, GroupError, ProvisionError, QuotaError, StockoutError
from cluster.gce_client import GceClients, compute
from cluster.gce_head import HEAD_ROLE, check_head_vm_config, data_disk_name, head_body, head_name
from cluster.gce_instance import (
    CLUSTER_LABEL,
    KEY_BASE64,
    KEY_TYPE,
    ROLE_LABEL,
    address_of,
    check_public_key,
    instance_body,
    status_of,
    zone_of,
)
from cluster.gce_settings import CostEstimate, GceSettings, MachinePrice, estimate_hourly_cost
from cluster.keys import host_pattern
from cluster.provider import HOURS_PER_MONTH, Charge, Instance, Status

if TYPE_CHECKING:
    from cluster.config import ClusterConfig

__all__ = [
    "CLUSTER_LABEL", "CostEstimate", "GceProvider", "GceSettings", "MachinePrice", "Timing",
    "estimate_hourly_cost",
]  # fmt: skip

logger = logging.getLogger(__name__)

MAX_PARALLEL_CALLS = 8  # concurrent API calls in one fan-out (below requests' pool of 10)
BOOT_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "boot.sh"
_VM_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Timing:
    """Every wait and retry bound of the provider; tests shorten them, nothing else should."""

    api_timeout_s: float = 60.0  # one HTTP call
    operation_timeout_s: float = 600.0  # one insert/start/delete operation to reach DONE
    boot_timeout_s: float = 600.0  # a VM to go from PROVISIONING/STAGING to RUNNING
    stopping_timeout_s: float = 300.0  # a STOPPING VM to become TERMINATED before `start`
    host_key_timeout_s: float = 600.0  # the guest agent to publish `hostkeys/` after boot
    poll_interval_s: float = 3.0  # between two looks at a VM or its guest attributes
    max_polls: int = 1000  # hard bound on any polling loop, whatever the clock says


T = TypeVar("T")
R = TypeVar("R")


class GceProvider:
    """Worker VMs on Compute Engine, found by label. Constructing it does no I/O.

    `boot_script` (the startup-script) and `ssh_public_key` (the laptop's key, put in the
    `ssh-keys` metadata) are given as text, or as a Path read when the first VM is created.
    """

    METADATA_ROOT = "http://metadata.google.internal/computeMetadata/v1"  # seen from inside a VM
    GOOGLE_API_ROOT = "https://compute.googleapis.com"

    def __init__(
        self,
        settings: GceSettings,
        *,
        cluster_name: str,
        boot_script: str | Path,
        ssh_public_key: str | Path,
        client_factory: Callable[[GceSettings], GceClients] | None = None,
        timing: Timing = Timing(),
        idle_action: str = "stop",
        unprovisioned_stop_s: float | None = None,
    ) -> None:
        if not re.match(r"^[a-z][a-z0-9-]{0,40}$", cluster_name):
            raise ConfigError(
                f"cluster name {cluster_name!r} cannot be used on GCE: use lowercase letters, "
                f"digits and '-', starting with a letter, at most 41 characters"
            )
        if isinstance(ssh_public_key, str):
            check_public_key(ssh_public_key, source="ssh_public_key")
        self.settings = settings
        self.cluster_name = cluster_name
        self.timing = timing
        self.idle_action = idle_action  # what an idle worker does to itself: "stop" or "delete"
        # A worker that `fab up` does not provision within this many seconds stops itself
        # (its startup-script says so to boot.sh); None: no such guard (tests of the provider).
        self.unprovisioned_stop_s = unprovisioned_stop_s
        self._boot_script = boot_script
        self._ssh_public_key = ssh_public_key
        self._client_factory = client_factory or _default_clients
        self._clients: GceClients | None = None
        self._clients_lock = threading.Lock()

    @classmethod
    def from_mapping(
        cls, table: Mapping[str, Any], *, cluster_name: str, boot_script: str, ssh_public_key: str
    ) -> "GceProvider":
        """Build from the `[gce]` table of cluster.toml (validated, with clear errors)."""
        return cls(
            GceSettings.from_mapping(table),
            cluster_name=cluster_name,
            boot_script=boot_script,
            ssh_public_key=ssh_public_key,
        )

    @classmethod
    def from_config(cls, config: "ClusterConfig") -> "GceProvider":
        """Build from a ClusterConfig: its `[gce]` table, read with [cluster] values as defaults
        ([cluster] zones, image, machine_type and spot; [ssh] user for the `ssh-keys` entry)."""
        settings = config.gce
        if settings is None:
            raise ConfigError(f"{config.path}: provider = \"gce\" needs a [gce] table with at least project = \"...\"")
        if settings.head is not None:
            check_head_vm_config(config)
        return cls(
            settings,
            cluster_name=config.name,
            boot_script=BOOT_SCRIPT,
            ssh_public_key=config.ssh.key.with_name(config.ssh.key.name + ".pub"),
            idle_action=config.idle_action,
            unprovisioned_stop_s=config.idle_timeout + config.ssh.boot_timeout,
        )

    def head_cost_estimate(self) -> CostEstimate | None:
        """What the head VM of `[gce.head]` costs per hour; None when the head is an existing host."""
        return self.settings.head_cost_estimate()

    def cost_estimate(self, workers: int) -> CostEstimate:
        """What `workers` workers cost per hour, from `[gce.prices]`; no API call."""
        return self.settings.cost_estimate(workers)

    def __enter__(self) -> "GceProvider":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._clients_lock:
            if self._clients is not None:
                self._clients.instances.transport.close()
                self._clients.zone_operations.transport.close()
                self._clients.disks.transport.close()
                self._clients = None

    # --- the Provider protocol ---------------------------------------------------------

    def create(self, names: Sequence[str]) -> list[Instance]:
        """Create the missing VMs (zone failover on stockout), start stopped ones, wait for boot.

        Each returned Instance's `zone` says where that VM landed.
        """
        _check_names(names)
        existing = self._list_raw()
        reused = [n for n in names if n in existing]
        if reused:
            logger.info("reusing %d existing VM(s): %s", len(reused), ", ".join(reused))
        self._insert_with_failover([n for n in names if n not in existing], self.settings.zones)
        stopped = [n for n in reused if status_of(existing[n]) is Status.TERMINATED]
        if stopped:
            self.start(stopped)
        return self._wait_booted(names)

    def list(self) -> list[Instance]:
        raw = self._list_raw()
        preempted = self._preempted(raw)
        return [self._to_instance(raw[n], preempted=n in preempted) for n in sorted(raw)]

    def start(self, names: Sequence[str]) -> list[Instance]:
        """Start TERMINATED VMs; recreate gone ones, and in another zone ones whose zone is full."""
        _check_names(names)
        existing = self._wait_not_stopping(names)
        gone = [n for n in names if n not in existing]
        stopped = [n for n in names if n in existing and status_of(existing[n]) is Status.TERMINATED]
        if gone:
            logger.info("recreating %d VM(s) that are gone: %s", len(gone), ", ".join(gone))
            self._insert_with_failover(gone, self.settings.zones)
        results = self._fan_out(stopped, lambda n: self._start_one(n, zone_of(existing[n])))
        full = [n for n, r in results.items() if isinstance(r, StockoutError)]
        failed = {n: r for n, r in results.items() if isinstance(r, Exception) and n not in full}
        if failed:
            raise GroupError(f"could not start {', '.join(sorted(failed))}: {_first(failed)}", results)
        for name in full:
            # Its zone has no capacity now: a worker holds no state, so move it.
            zone = zone_of(existing[name])
            logger.info("%s cannot start in %s (no capacity); recreating it elsewhere", name, zone)
            self._delete_one(name, zone)
            others = [z for z in self.settings.zones if z != zone] or [zone]
            self._insert_with_failover([name], others)
        return self._wait_booted(names)

    @property
    def self_stop_command(self) -> str:
        """What a worker's idle guard runs to stop its own VM: a guest shutdown makes it TERMINATED."""
        return "/sbin/shutdown -h now" if self.settings.ssh_user == "root" else "sudo -n /sbin/shutdown -h now"

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        """The guard's stop command; with idle_action = "delete" also the URLs of its self-delete.

        A plain-http api_endpoint is a local emulator (gce_client.make_clients), which serves
        the metadata server's token endpoint too.
        """
        env = {"SPOTFAN_STOP_COMMAND": self.self_stop_command}
        if self.idle_action != "delete":
            return env
        endpoint = (self.settings.api_endpoint or self.GOOGLE_API_ROOT).rstrip("/")
        metadata = f"{endpoint}/computeMetadata/v1" if endpoint.startswith("http://") else self.METADATA_ROOT
        env["SPOTFAN_SELF_DELETE_URL"] = (f"{endpoint}/compute/v1/projects/{self.settings.project}/zones/"
                                          f"{instance.zone}/instances/{instance.name}")
        env["SPOTFAN_TOKEN_URL"] = f"{metadata}/instance/service-accounts/default/token"
        return env

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """Running workers (machine price), stopped workers' boot disks, and a head VM and its disks.

        Prices come from [gce.prices] (machines, per hour) and [gce.disk_prices] (per GB and
        month); where one is missing the charge is listed without a price.
        """
        s = self.settings
        running = [i for i in instances if i.status is not Status.TERMINATED]
        stopped = [i for i in instances if i.status is Status.TERMINATED]
        out = []
        if running:
            cost = s.cost_estimate(len(running))
            out.append(Charge(f"{len(running)} running worker(s) ({s.machine_type}, {s.provisioning})", cost.total_hour))
        if stopped:
            out.append(self._disk_charge(f"{len(stopped)} stopped worker(s)' boot disks", len(stopped) * s.disk_size_gb,
                                         s.disk_type))
        head = self.head() if s.head is not None else None
        if head is not None and s.head is not None:
            if head.status is not Status.TERMINATED:
                vm = s.head_cost_estimate()
                out.append(Charge(f"head VM {head.name} ({s.head.machine_type}, standard)",
                                  vm.total_hour if vm is not None else None))
            out.append(self._disk_charge(f"head VM {head.name}'s boot disk", s.head.boot_disk_gb, "pd-balanced"))
        if s.head is not None and (head is not None or self._disk_exists(data_disk_name(self.cluster_name), s.head.zone)):
            out.append(self._disk_charge(f"head data disk {data_disk_name(self.cluster_name)}", s.head.data_disk_gb,
                                         s.head.data_disk_type))
        return out

    def _disk_charge(self, what: str, gb: int, disk_type: str) -> Charge:
        price = self.settings.disk_prices.get(disk_type)
        return Charge(f"{what} ({gb} GB {disk_type})", None if price is None else gb * price / HOURS_PER_MONTH)

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named VMs of this cluster (their boot disks stay); missing or stopped ones are fine."""
        existing = self._list_raw()
        targets = [n for n in names if n in existing and status_of(existing[n]) is not Status.TERMINATED]
        results = self._fan_out(targets, lambda n: self._stop_one(n, zone_of(existing[n])))
        failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise GroupError(f"could not stop {', '.join(sorted(failed))}: {_first(failed)}", results)

    def delete(self, names: Sequence[str]) -> None:
        """Delete the named VMs of this cluster in whatever zone they are, then prove they are gone."""
        existing = self._list_raw()
        targets = [n for n in names if n in existing]
        results = self._fan_out(targets, lambda n: self._delete_one(n, zone_of(existing[n])))
        failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise GroupError(f"could not delete {', '.join(sorted(failed))}: {_first(failed)}", results)
        left = sorted(set(names) & set(self._list_raw()))
        if left:
            raise ProvisionError(
                f"still listed after delete: {', '.join(left)}; run `fab down` again, or "
                f"`gcloud compute instances list --filter=labels.{CLUSTER_LABEL}={self.cluster_name}`"
            )
        logger.info("deleted %d VM(s); none of %d named is left", len(targets), len(names))

    def host_keys(self, names: Sequence[str]) -> dict[str, list[str]]:
        """`known_hosts` lines per VM from its guest attributes.

        A running or booting VM is waited for until its guest agent has published them;
        a stopped or missing one gets no lines (nothing to trust until it runs again).
        """
        existing = self._list_raw()
        stopped = (Status.TERMINATED, Status.STOPPING)
        live = [n for n in names if n in existing and status_of(existing[n]) not in stopped]
        results = self._fan_out(live, lambda n: self._host_keys_one(n, existing[n]))
        failed = {n: r for n, r in results.items() if isinstance(r, Exception)}
        if failed:
            raise GroupError(f"no host keys for {', '.join(sorted(failed))}: {_first(failed)}", results)
        return {n: results.get(n, []) for n in names}

    # --- the optional head VM ([gce.head]) ----------------------------------------------

    def head(self) -> Instance | None:
        """The cluster's head VM (found by label `spotfan-role=head`), its internal address; or None."""
        raw = self._list_raw(role=HEAD_ROLE)
        if not raw:
            return None
        return self._to_instance(next(iter(raw.values())), external=False)

    def create_head(self, *, jail_steps: str) -> Instance:
        """Create the head VM of `[gce.head]` unless it exists (start it if stopped); wait until it runs.

        `jail_steps` is `cluster.jail.setup_steps(config)`, run by the head's startup-script
        at every boot after its data disk is mounted.
        """
        h = self.settings.head
        if h is None:
            raise ConfigError("no [gce.head] table with create = true: the head is an existing host")
        name = head_name(self.cluster_name)
        existing = self._list_raw(role=HEAD_ROLE)
        if name in existing:
            logger.info("reusing head VM %s in %s", name, zone_of(existing[name]))
            if status_of(existing[name]) in (Status.TERMINATED, Status.STOPPING):
                self._start_one(name, zone_of(existing[name]))
        else:
            # A data disk kept by `fab down --head` is attached again, never created anew.
            reuse = self._disk_exists(data_disk_name(self.cluster_name), h.zone)
            body = head_body(self.settings, h, cluster_name=self.cluster_name, jail_steps=jail_steps,
                             ssh_public_key=self._text("ssh_public_key"), reuse_data_disk=reuse)
            self._insert_one(name, h.zone, body=body)
            logger.info("created head VM %s in %s with %s data disk %s", name, h.zone,
                        "its kept" if reuse else "a new", data_disk_name(self.cluster_name))
        deadline = time.monotonic() + self.timing.boot_timeout_s
        for _ in range(self.timing.max_polls):
            raw = self._list_raw(role=HEAD_ROLE).get(name)
            if raw is not None and status_of(raw) is Status.RUNNING and address_of(raw, external=False):
                return self._to_instance(raw, external=False)
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        raise ProvisionError(f"head VM {name} not RUNNING after {self.timing.boot_timeout_s:.0f} s; run `fab up` again")

    def head_host_key_lines(self, *, port: int) -> list[str]:
        """The head VM's `known_hosts` lines (for its internal address) from its guest attributes."""
        raw = self._list_raw(role=HEAD_ROLE).get(head_name(self.cluster_name))
        if raw is None:
            raise ProvisionError(f"cluster {self.cluster_name} has no head VM: `fab up` creates it")
        return self._host_keys_one(raw.name, raw, external=False, port=port)

    def delete_head(self) -> str:
        """Delete the head VM (a missing one is fine); return the name of its data disk, which is kept."""
        raw = self._list_raw(role=HEAD_ROLE)
        for name, inst in raw.items():
            self._delete_one(name, zone_of(inst))
        left = sorted(self._list_raw(role=HEAD_ROLE))
        if left:
            raise ProvisionError(f"head VM still listed after delete: {', '.join(left)}; run `fab down --head` again")
        return data_disk_name(self.cluster_name)

    # --- one VM at a time --------------------------------------------------------------

    def _insert_with_failover(self, names: Sequence[str], zones: Sequence[str]) -> dict[str, str]:
        """Insert `names`, trying `zones` in order on stockout; return name -> zone landed in."""
        placed: dict[str, str] = {}
        failed: dict[str, Exception] = {}
        pending = list(names)
        full_zones: list[str] = []
        for zone in zones:
            if not pending:
                break
            results = self._fan_out(pending, lambda n, zone=zone: self._insert_one(n, zone))
            pending = [n for n, r in results.items() if isinstance(r, StockoutError)]
            failed.update({n: r for n, r in results.items() if isinstance(r, Exception) and n not in pending})
            placed.update({n: zone for n, r in results.items() if not isinstance(r, Exception)})
            if pending:
                full_zones.append(zone)
                logger.warning("zone %s has no capacity for %d VM(s); trying the next zone", zone, len(pending))
            if any(isinstance(r, QuotaError) for r in failed.values()):
                break  # a quota is per project or region: other zones will not help
        for zone in sorted(set(placed.values())):
            landed = sorted(n for n, z in placed.items() if z == zone)
            logger.info("%d VM(s) landed in %s: %s", len(landed), zone, ", ".join(landed))
        quota = [r for r in failed.values() if isinstance(r, QuotaError)]
        not_created = sorted(set(pending) | set(failed))
        done = f"; created: {', '.join(sorted(placed)) or 'none'}"
        if quota:
            raise QuotaError(f"{quota[0]} (not created: {', '.join(not_created)}{done})") from quota[0]
        if failed and not placed and all(isinstance(r, ProvisionError) for r in failed.values()):
            # Nothing was created: almost always one cause (image, zone, API) worth one clear message.
            first = failed[sorted(failed)[0]]
            raise ProvisionError(f"{first} (not created: {', '.join(not_created)})") from first
        if failed:
            results: dict[str, Any] = {**placed, **failed}
            raise GroupError(f"could not create {', '.join(sorted(failed))}: {_first(failed)}{done}", results)
        if pending:
            raise StockoutError(
                f"no capacity for {self.settings.machine_type} in any configured zone "
                f"({', '.join(full_zones)}) for {', '.join(sorted(pending))}{done}; add zones to "
                f"[gce].zones, pick another machine_type, or retry later"
            )
        return placed

    def _insert_one(self, name: str, zone: str, *, body: Any = None) -> None:
        """Insert worker `name` in `zone` (or `body`, an Instance such as the head's)."""
        doing = f"creating {name} in {zone}"
        try:
            op = self._api().instances.insert(
                project=self.settings.project,
                zone=zone,
                instance_resource=body if body is not None else instance_body(
                    self.settings,
                    name=name,
                    zone=zone,
                    cluster_name=self.cluster_name,
                    boot_script=self._startup_boot_script(),
                    ssh_public_key=self._text("ssh_public_key"),
                ),
                timeout=self.timing.api_timeout_s,
            )
        except Exception as e:
            if gce_client.is_conflict(e) and self._is_ours(name, zone):
                return  # created by a concurrent or interrupted earlier run
            raise self._translate(e, doing) from e
        self._finish(op, zone, doing)

    def _start_one(self, name: str, zone: str) -> None:
        doing = f"starting {name} in {zone}"
        try:
            op = self._api().instances.start(
                project=self.settings.project, zone=zone, instance=name, timeout=self.timing.api_timeout_s
            )
        except Exception as e:
            raise self._translate(e, doing) from e
        self._finish(op, zone, doing)

    def _stop_one(self, name: str, zone: str) -> None:
        doing = f"stopping {name} in {zone}"
        try:
            op = self._api().instances.stop(
                project=self.settings.project, zone=zone, instance=name, timeout=self.timing.api_timeout_s
            )
        except Exception as e:
            if gce_client.is_not_found(e):
                return
            raise self._translate(e, doing) from e
        self._finish(op, zone, doing, gone_is_fine=True)

    def _delete_one(self, name: str, zone: str) -> None:
        doing = f"deleting {name} in {zone}"
        try:
            op = self._api().instances.delete(
                project=self.settings.project, zone=zone, instance=name, timeout=self.timing.api_timeout_s
            )
        except Exception as e:
            if gce_client.is_not_found(e):
                return  # already gone: that is what we wanted
            raise self._translate(e, doing) from e
        self._finish(op, zone, doing, gone_is_fine=True)

    def _host_keys_one(self, name: str, raw: Any, *, external: bool | None = None, port: int | None = None) -> list[str]:
        zone = zone_of(raw)
        deadline = time.monotonic() + self.timing.host_key_timeout_s
        for _ in range(self.timing.max_polls):
            try:
                request = compute().GetGuestAttributesInstanceRequest(
                    project=self.settings.project, zone=zone, instance=name, query_path="hostkeys/"
                )
                attrs = self._api().instances.get_guest_attributes(
                    request=request, timeout=self.timing.api_timeout_s
                )
                keys = [(e.key, e.value) for e in attrs.query_value.items]
            except Exception as e:
                if not gce_client.is_not_found(e):
                    raise self._translate(e, f"reading the host keys of {name}") from e
                keys = []  # 404 until the guest agent has published them
            if keys:
                return self._known_hosts_lines(name, zone, raw, keys, external=external, port=port)
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        raise ProvisionError(
            f"{name} published no host keys under guest attributes `hostkeys/` within "
            f"{self.timing.host_key_timeout_s:.0f} s: the image needs the Google guest agent "
            f"(google-guest-agent) and the VM needs metadata enable-guest-attributes=TRUE"
        )

    def _known_hosts_lines(
        self, name: str, zone: str, raw: Any, keys: list[tuple[str, str]], *, external: bool | None, port: int | None
    ) -> list[str]:
        external = self.settings.external_ip if external is None else external
        address = address_of(raw, external=external)
        if not address:  # listed before its IP was assigned
            address = address_of(self._get(name, zone), external=external)
        host = host_pattern(address, self.settings.ssh_port if port is None else port)
        lines = []
        for key_type, value in keys:
            # Whatever a VM publishes ends up in known_hosts: accept nothing but a key.
            if not KEY_TYPE.match(key_type) or not KEY_BASE64.match(value):
                raise ProvisionError(f"{name} published a malformed host key {key_type!r}: refusing it")
            lines.append(f"{host} {key_type} {value}")
        return lines

    # --- API plumbing ------------------------------------------------------------------

    def _api(self) -> GceClients:
        with self._clients_lock:
            if self._clients is None:
                self._clients = self._client_factory(self.settings)
            return self._clients

    def _translate(self, e: Exception, doing: str) -> ProvisionError:
        if isinstance(e, ProvisionError):
            return e
        if gce_client.is_unavailable(e):
            return StockoutError(f"{doing}: 503 service unavailable ({e})")
        return gce_client.translate(e, project=self.settings.project, doing=doing)

    def _finish(self, op: Any, zone: str, doing: str, *, gone_is_fine: bool = False) -> None:
        """Wait (with our own operations client) until `op` is DONE, then check its error.

        `gone_is_fine`: an operation that failed because the VM no longer exists succeeded.
        """
        done = compute().Operation.Status.DONE
        deadline = time.monotonic() + self.timing.operation_timeout_s
        for _ in range(self.timing.max_polls):
            if op.status == done:
                break
            if time.monotonic() >= deadline:
                raise ProvisionError(f"{doing}: operation {op.name} not done after {self.timing.operation_timeout_s:.0f} s")
            try:
                op = self._api().zone_operations.wait(
                    project=self.settings.project, zone=zone, operation=op.name, timeout=self.timing.api_timeout_s
                )
            except Exception as e:
                raise self._translate(e, f"{doing} (waiting for {op.name})") from e
        failure = gce_client.operation_failure(op)
        if failure is None:
            return
        if failure.is_stockout:
            raise StockoutError(f"{doing}: {failure.message}")
        if failure.is_quota:
            raise gce_client.quota_error(failure, project=self.settings.project)
        if gone_is_fine and "RESOURCE_NOT_FOUND" in failure.codes:
            return
        raise ProvisionError(f"{doing}: {', '.join(failure.codes)}: {failure.message}")

    def _list_raw(self, *, role: str = "worker") -> dict[str, Any]:
        """The cluster's workers (or with role "head", its head VM), in any zone, by name.

        One label filter finds the cluster; the head is told apart here, so that no
        worker path (create, list, heal, delete, down) ever counts or touches it.
        """
        request = compute().AggregatedListInstancesRequest(
            project=self.settings.project, filter=f'labels.{CLUSTER_LABEL} = "{self.cluster_name}"'
        )
        try:
            pages = self._api().instances.aggregated_list(request=request, timeout=self.timing.api_timeout_s)
            found = {inst.name: inst for _, scoped in pages for inst in scoped.instances}
        except Exception as e:
            raise self._translate(e, f"listing the VMs of cluster {self.cluster_name}") from e
        return {n: i for n, i in found.items() if (dict(i.labels).get(ROLE_LABEL) == HEAD_ROLE) == (role == HEAD_ROLE)}

    def _get(self, name: str, zone: str) -> Any:
        try:
            return self._api().instances.get(
                project=self.settings.project, zone=zone, instance=name, timeout=self.timing.api_timeout_s
            )
        except Exception as e:
            raise self._translate(e, f"reading {name} in {zone}") from e

    def _disk_exists(self, disk: str, zone: str) -> bool:
        try:
            self._api().disks.get(project=self.settings.project, zone=zone, disk=disk, timeout=self.timing.api_timeout_s)
        except Exception as e:
            if gce_client.is_not_found(e):
                return False
            raise self._translate(e, f"looking for disk {disk} in {zone}") from e
        return True

    def _is_ours(self, name: str, zone: str) -> bool:
        labels = dict(self._get(name, zone).labels)
        if labels.get(CLUSTER_LABEL) == self.cluster_name:
            return True
        raise ProvisionError(
            f"a VM named {name} already exists in {zone} but is not part of cluster "
            f"{self.cluster_name} (labels {labels}): choose another cluster name"
        )

    def _preempted(self, raw: Mapping[str, Any]) -> set[str]:
        """Names of stopped VMs whose last stop was a preemption (an operation says so)."""
        stopped = {n: i for n, i in raw.items() if status_of(i) in (Status.STOPPING, Status.TERMINATED)}
        found: set[str] = set()
        for zone in sorted({zone_of(i) for i in stopped.values()}):
            request = compute().ListZoneOperationsRequest(
                project=self.settings.project, zone=zone, filter='operationType = "compute.instances.preempted"'
            )
            try:
                ops = list(self._api().zone_operations.list(request=request, timeout=self.timing.api_timeout_s))
            except Exception as e:
                raise self._translate(e, f"listing preemptions in {zone}") from e
            for op in ops:
                name = op.target_link.rsplit("/", 1)[-1]
                inst = stopped.get(name)
                if inst is not None and zone_of(inst) == zone and _after(op.insert_time, inst.last_start_timestamp):
                    found.add(name)
        return found

    def _wait_not_stopping(self, names: Sequence[str]) -> dict[str, Any]:
        """The cluster's VMs once none of `names` is still STOPPING (it cannot be started yet)."""
        deadline = time.monotonic() + self.timing.stopping_timeout_s
        for _ in range(self.timing.max_polls):
            raw = self._list_raw()
            stopping = [n for n in names if n in raw and status_of(raw[n]) is Status.STOPPING]
            if not stopping or time.monotonic() >= deadline:
                return raw
            time.sleep(self.timing.poll_interval_s)
        return raw

    def _wait_booted(self, names: Sequence[str]) -> list[Instance]:
        """Poll (one aggregated list per round) until every VM is RUNNING, or stopped again."""
        deadline = time.monotonic() + self.timing.boot_timeout_s
        settled = (Status.RUNNING, Status.TERMINATED)
        for _ in range(self.timing.max_polls):
            raw = self._list_raw()
            waiting = [n for n in names if n not in raw or status_of(raw[n]) not in settled]
            if not waiting:
                return [self._to_instance(raw[n]) for n in names]
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        states = ", ".join(f"{n}: {status_of(raw[n]).value if n in raw else 'gone'}" for n in waiting)
        raise ProvisionError(
            f"not RUNNING after {self.timing.boot_timeout_s:.0f} s ({states}); `fab heal` starts "
            f"or recreates them"
        )

    def _to_instance(self, raw: Any, *, preempted: bool = False, external: bool | None = None) -> Instance:
        return Instance(
            name=raw.name,
            address=address_of(raw, external=self.settings.external_ip if external is None else external),
            port=self.settings.ssh_port,
            status=status_of(raw),
            zone=zone_of(raw),
            preempted=preempted,
        )

    def _startup_boot_script(self) -> str:
        """The boot script as a new worker's startup-script runs it: with the time it has to be
        provisioned by `fab up` before it stops itself (boot.sh's unprovisioned guard)."""
        script = self._text("boot_script")
        if self.unprovisioned_stop_s is None:
            return script
        first, _, rest = script.partition("\n")
        shebang = first if first.startswith("#!") else "#!/bin/sh"
        body = rest if first.startswith("#!") else script
        return (f"{shebang}\n# spotfan: stop unless `fab up` provisions this VM in time (see boot.sh)\n"
                f"SPOTFAN_UNPROVISIONED_S={int(self.unprovisioned_stop_s)}\n"
                f"SPOTFAN_UNPROVISIONED_STOP={shlex.quote(self.self_stop_command)}\n"
                f"export SPOTFAN_UNPROVISIONED_S SPOTFAN_UNPROVISIONED_STOP\n{body}")

    def _text(self, what: str) -> str:
        value = getattr(self, f"_{what}")
        if isinstance(value, str):
            return value.strip() if what == "ssh_public_key" else value
        try:
            text = value.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read the {what.replace('_', ' ')} from {value}: {e}") from e
        if what == "ssh_public_key":
            text = check_public_key(text, source=str(value))
        return text

    def _fan_out(self, items: Iterable[T], fn: Callable[[T], R]) -> dict[T, R | Exception]:
        """Run `fn` on every item concurrently; collect each result or exception, never stop early."""
        items = list(items)
        if not items:
            return {}
        with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CALLS, len(items))) as pool:
            futures = {item: pool.submit(fn, item) for item in items}
        results: dict[T, R | Exception] = {}
        for item, future in futures.items():
            error = future.exception()
            results[item] = error if isinstance(error, Exception) else future.result()
        return results


def _default_clients(settings: GceSettings) -> GceClients:
    return gce_client.make_clients(project=settings.project, api_endpoint=settings.api_endpoint)


def _check_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not _VM_NAME.match(n)]
    if bad:
        raise ConfigError(
            f"invalid GCE VM name(s) {', '.join(map(repr, bad))}: lowercase letters, digits and '-', "
            f"starting with a letter, at most 63 characters"
        )


def _after(op_time: str, last_start: str) -> bool:
    """Whether an operation happened after the VM's last start (RFC 3339 timestamps)."""
    if not last_start:
        return True
    try:
        return datetime.fromisoformat(op_time) >= datetime.fromisoformat(last_start)
    except ValueError:
        return True


def _first(failed: Mapping[str, Exception]) -> str:
    name = sorted(failed)[0]
    return f"{name}: {failed[name]}"
