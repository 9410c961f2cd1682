"""The Compute Engine provider's workers: spot VMs created, healed and deleted by label, with zone failover.

Every VM carries the label `spotfan-cluster=<cluster name>`; that label, not local state,
is what `create`, `list`, `start` and `delete` work from, so each is safe to run twice
and from any laptop. A zone without capacity moves the VMs to the next zone of
`[gce].zones`; a quota error stops the search (another zone would not help). With
`[gce.accelerator]` a zone that does not offer the GPU type is skipped up front, and an
insert refused for want of that accelerator counts as a stockout of its zone.
"""
from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError, GroupError, ProvisionError, StockoutError
from cluster.fanout import failed, fan_out, first_failure
from cluster.providers.base import Charge, Instance, Status
from cluster.providers.gce.api import GceClients
from cluster.providers.gce.bodies import (
    CLUSTER_LABEL,
    KEY_BASE64,
    KEY_TYPE,
    address_of,
    check_public_key,
    instance_body,
    status_of,
    zone_of,
)
from cluster.providers.gce.calls import Compute, Timing
from cluster.providers.gce.cost import CostEstimate, disk_charge
from cluster.providers.failover import place, raise_unplaced
from cluster.providers.gce.settings import GceSettings
from cluster.ssh_keys import host_pattern

logger = logging.getLogger(__name__)

MAX_PARALLEL_CALLS = 8  # concurrent API calls in one fan-out (below requests' pool of 10)
_VM_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


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
        boot_script: str | Traversable,
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
        self.idle_action = idle_action  # what an idle worker does to itself: "stop" or "delete"
        # A worker that `fab up` does not provision within this many seconds stops itself
        # (its startup-script says so to boot.sh); None: no such guard (tests of the provider).
        self.unprovisioned_stop_s = unprovisioned_stop_s
        self.compute = Compute(settings, cluster_name=cluster_name, timing=timing, client_factory=client_factory)
        self._boot_script = boot_script
        self._ssh_public_key = ssh_public_key

    @property
    def timing(self) -> Timing:
        return self.compute.timing

    @timing.setter
    def timing(self, value: Timing) -> None:
        self.compute.timing = value

    def cost_estimate(self, workers: int) -> CostEstimate:
        """What `workers` workers cost per hour, from `[gce.prices]`; no API call."""
        return self.settings.cost_estimate(workers)

    def __enter__(self) -> GceProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.compute.close()

    # --- the Provider protocol ---------------------------------------------------------

    def create(self, names: Sequence[str]) -> list[Instance]:
        """Create the missing VMs (zone failover on stockout), start stopped ones, wait for boot.

        Each returned Instance's `zone` says where that VM landed.
        """
        _check_names(names)
        existing = self.compute.list_raw()
        reused = [n for n in names if n in existing]
        if reused:
            logger.info("reusing %d existing VM(s): %s", len(reused), ", ".join(reused))
        self._insert_with_failover([n for n in names if n not in existing], self.settings.zones)
        stopped = [n for n in reused if status_of(existing[n]) is Status.TERMINATED]
        if stopped:
            self.start(stopped)
        return self._booted(names)

    def list(self) -> list[Instance]:
        raw = self.compute.list_raw()
        preempted = self.compute.preempted(raw)
        return [self._to_instance(raw[n], preempted=n in preempted) for n in sorted(raw)]

    def start(self, names: Sequence[str]) -> list[Instance]:
        """Start TERMINATED VMs; recreate gone ones, and in another zone ones whose zone is full."""
        _check_names(names)
        existing = self.compute.wait_not_stopping(names)
        gone = [n for n in names if n not in existing]
        stopped = [n for n in names if n in existing and status_of(existing[n]) is Status.TERMINATED]
        if gone:
            logger.info("recreating %d VM(s) that are gone: %s", len(gone), ", ".join(gone))
            self._insert_with_failover(gone, self.settings.zones)
        results = self._fan_out(stopped, lambda n: self.compute.start(n, zone_of(existing[n])))
        full = [n for n, r in results.items() if isinstance(r, StockoutError)]
        bad = {n: r for n, r in failed(results).items() if n not in full}
        if bad:
            raise GroupError(f"could not start {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        for name in full:
            # Its zone has no capacity now: a worker holds no state, so move it.
            zone = zone_of(existing[name])
            logger.info("%s cannot start in %s (no capacity); recreating it elsewhere", name, zone)
            self.compute.delete(name, zone)
            others = [z for z in self.settings.zones if z != zone] or [zone]
            self._insert_with_failover([name], others)
        again = set(gone) | set(full)
        return [replace(i, recreated=True) if i.name in again else i for i in self._booted(names)]

    def stop(self, names: Sequence[str]) -> None:
        """Stop the named VMs of this cluster (their boot disks stay); missing or stopped ones are fine."""
        existing = self.compute.list_raw()
        targets = [n for n in names if n in existing and status_of(existing[n]) is not Status.TERMINATED]
        results = self._fan_out(targets, lambda n: self.compute.stop(n, zone_of(existing[n])))
        bad = failed(results)
        if bad:
            raise GroupError(f"could not stop {', '.join(sorted(bad))}: {first_failure(bad)}", results)

    def delete(self, names: Sequence[str]) -> None:
        """Delete the named VMs of this cluster in whatever zone they are, then prove they are gone."""
        existing = self.compute.list_raw()
        targets = [n for n in names if n in existing]
        results = self._fan_out(targets, lambda n: self.compute.delete(n, zone_of(existing[n])))
        bad = failed(results)
        if bad:
            raise GroupError(f"could not delete {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        left = sorted(set(names) & set(self.compute.list_raw()))
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
        existing = self.compute.list_raw()
        stopped = (Status.TERMINATED, Status.STOPPING)
        live = [n for n in names if n in existing and status_of(existing[n]) not in stopped]
        results = self._fan_out(live, lambda n: self._known_hosts_lines(n, existing[n]))
        bad = failed(results)
        if bad:
            raise GroupError(f"no host keys for {', '.join(sorted(bad))}: {first_failure(bad)}", results)
        return {n: results.get(n, []) for n in names}  # type: ignore[misc]

    # --- capabilities: SelfStopping, Priced, Accelerated --------------------------------

    def gpus_per_vm(self) -> int:
        """How many GPUs each worker VM has ([gce.accelerator] count; 0 without)."""
        return self.settings.accelerator.count if self.settings.accelerator else 0

    @property
    def self_stop_command(self) -> str:
        """What a worker's idle guard runs to stop its own VM: a guest shutdown makes it TERMINATED."""
        return "/sbin/shutdown -h now" if self.settings.ssh_user == "root" else "sudo -n /sbin/shutdown -h now"

    def self_stop_env(self, instance: Instance) -> dict[str, str]:
        """The guard's stop command; with idle_action = "delete" also the URLs of its self-delete.

        A plain-http api_endpoint is a local emulator (api.make_clients), which serves the
        metadata server's token endpoint too.
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

    def describe_cost(self, workers: int) -> str:
        return self.cost_estimate(workers).describe()

    def billing(self, instances: Sequence[Instance]) -> list[Charge]:
        """Running workers (machine price) and stopped workers' boot disks.

        Prices come from [gce.prices] (machines, per hour) and [gce.disk_prices] (per GB and
        month); where one is missing the charge is listed without a price.
        """
        s = self.settings
        running = [i for i in instances if i.status is not Status.TERMINATED]
        stopped = [i for i in instances if i.status is Status.TERMINATED]
        out = []
        if running:
            cost = s.cost_estimate(len(running))
            gpus = f" + {cost.accelerator}" if cost.accelerator else ""
            out.append(Charge(f"{len(running)} running worker(s) ({s.machine_type}{gpus}, {s.provisioning})",
                              cost.total_hour))
        if stopped:
            out.append(disk_charge(f"{len(stopped)} stopped worker(s)' boot disks", len(stopped) * s.disk_size_gb,
                                   s.disk_type, s.disk_prices))
        return out

    # --- inside ------------------------------------------------------------------------

    def _insert_with_failover(self, names: Sequence[str], zones: Sequence[str]) -> dict[str, str]:
        """Insert `names`, trying `zones` in order on stockout; return name -> zone landed in."""
        if names and self.settings.accelerator is not None:
            zones = self._zones_with_accelerator(zones)
        out = place(names, zones, lambda n, zone, _: self.compute.insert(n, zone, self._body(n, zone)),
                    fan_out=self._fan_out, landed=lambda zone: f"in {zone}", log=logger,
                    on_full=lambda zone, full: logger.warning(
                        "zone %s has no capacity for %d VM(s); trying the next zone", zone, len(full)))
        gpu = self.settings.accelerator
        raise_unplaced(out, verb="create", made="created", no_room=lambda done: (
            f"no capacity for {self.settings.machine_type}"
            f"{f' with {gpu.count} x {gpu.type}' if gpu else ''} in any configured zone "
            f"({', '.join(out.full)}) for {', '.join(sorted(out.pending))}{done}; add zones to "
            f"[gce].zones, pick another machine_type, or retry later"))
        return out.placed

    def _zones_with_accelerator(self, zones: Sequence[str]) -> list[str]:
        """The zones of `zones` that offer [gce.accelerator]'s type; ProvisionError if none does."""
        gpu = self.settings.accelerator
        assert gpu is not None
        offers = self._fan_out(list(zones), self.compute.accelerator_types)
        usable = [z for z in zones if isinstance(offers[z], Exception) or gpu.type in offers[z]]
        for z, r in offers.items():  # unknown (the list failed): the insert will tell
            if isinstance(r, Exception):
                logger.warning("could not list the accelerator types of %s (%s); trying it anyway", z, r)
        skipped = [z for z in zones if z not in usable]
        if skipped:
            logger.warning("%s offer(s) no %s; skipping", ", ".join(skipped), gpu.type)
        if not usable:
            raise ProvisionError(
                f"no zone of [gce].zones ({', '.join(zones)}) offers accelerator {gpu.type!r}: "
                f"`gcloud compute accelerator-types list --filter=name={gpu.type}` lists the zones "
                f"that do; add one to [gce].zones or change [gce.accelerator] type")
        return usable

    def _body(self, name: str, zone: str) -> Any:
        return instance_body(self.settings, name=name, zone=zone, cluster_name=self.cluster_name,
                             boot_script=self._startup_boot_script(), ssh_public_key=self.public_key())

    def _booted(self, names: Sequence[str]) -> list[Instance]:
        raw = self.compute.wait_booted(names)
        return [self._to_instance(raw[n]) for n in names]

    def _known_hosts_lines(self, name: str, raw: Any, *, external: bool | None = None,
                           port: int | None = None) -> list[str]:
        zone = zone_of(raw)
        keys = self.compute.guest_host_keys(name, zone)
        external = self.settings.external_ip if external is None else external
        address = address_of(raw, external=external)
        if not address:  # listed before its IP was assigned
            address = address_of(self.compute.get(name, zone), external=external)
        host = host_pattern(address, self.settings.ssh_port if port is None else port)
        lines = []
        for key_type, value in keys:
            # Whatever a VM publishes ends up in known_hosts: accept nothing but a key.
            if not KEY_TYPE.match(key_type) or not KEY_BASE64.match(value):
                raise ProvisionError(f"{name} published a malformed host key {key_type!r}: refusing it")
            lines.append(f"{host} {key_type} {value}")
        return lines

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
        script = _text(self._boot_script, what="boot script")
        if self.unprovisioned_stop_s is None:
            return script
        first, _, rest = script.partition("\n")
        shebang = first if first.startswith("#!") else "#!/bin/sh"
        body = rest if first.startswith("#!") else script
        return (f"{shebang}\n# spotfan: stop unless `fab up` provisions this VM in time (see boot.sh)\n"
                f"SPOTFAN_UNPROVISIONED_S={int(self.unprovisioned_stop_s)}\n"
                f"SPOTFAN_UNPROVISIONED_STOP={shlex.quote(self.self_stop_command)}\n"
                f"export SPOTFAN_UNPROVISIONED_S SPOTFAN_UNPROVISIONED_STOP\n{body}")

    def public_key(self) -> str:
        """The laptop's public key, checked, as the `ssh-keys` metadata gets it."""
        if isinstance(self._ssh_public_key, str):
            return self._ssh_public_key.strip()
        return check_public_key(_text(self._ssh_public_key, what="ssh public key"), source=str(self._ssh_public_key))

    def _fan_out(self, items: Sequence[str], fn: Callable[[str], Any]) -> dict[str, Any]:
        return fan_out(items, fn, key=str, max_parallel=MAX_PARALLEL_CALLS)


def _text(value: str | Traversable, *, what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} from {value}: {e}") from e


def _check_names(names: Sequence[str]) -> None:
    bad = [n for n in names if not _VM_NAME.match(n)]
    if bad:
        raise ConfigError(
            f"invalid GCE VM name(s) {', '.join(map(repr, bad))}: lowercase letters, digits and '-', "
            f"starting with a letter, at most 63 characters"
        )
