"""The Compute API calls of one cluster, one VM at a time: each operation waited on and checked.

Operations are checked here (`operation.error`), never trusted to raise, and polled with
our own operations client (the SDK's poller ignores the endpoint). Every call runs inside
`api.errors`, the one translation of the SDK's exceptions. The cluster's VMs are found by
the label `spotfan-cluster=<cluster name>`, never by local state.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cluster.errors import ProvisionError, StockoutError
from cluster.providers.base import Status
from cluster.providers.gce import api
from cluster.providers.gce.api import GceClients, compute
from cluster.providers.gce.bodies import CLUSTER_LABEL, HEAD_ROLE, ROLE_LABEL, status_of, zone_of
from cluster.providers.gce.settings import GceSettings

logger = logging.getLogger(__name__)


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


class Compute:
    """The API as one cluster's provider uses it. Constructing it does no I/O: clients are made on first use."""

    def __init__(self, settings: GceSettings, *, cluster_name: str, timing: Timing,
                 client_factory: Callable[[GceSettings], GceClients] | None = None) -> None:
        self.settings = settings
        self.cluster_name = cluster_name
        self.timing = timing
        self._client_factory = client_factory or _default_clients
        self._clients: GceClients | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._clients is not None:
                for client in (self._clients.instances, self._clients.zone_operations, self._clients.disks,
                               self._clients.accelerator_types):
                    client.transport.close()
                self._clients = None

    def api(self) -> GceClients:
        with self._lock:
            if self._clients is None:
                self._clients = self._client_factory(self.settings)
            return self._clients

    def _errors(self, doing: str) -> Any:
        return api.errors(doing, project=self.settings.project)

    # -- one VM ----------------------------------------------------------------------------

    def insert(self, name: str, zone: str, body: Any) -> None:
        """Insert the Instance `body` in `zone`; one that exists already and is ours is fine."""
        doing = f"creating {name} in {zone}"
        try:
            with self._errors(doing):
                op = self.api().instances.insert(project=self.settings.project, zone=zone,
                                                 instance_resource=body, timeout=self.timing.api_timeout_s)
        except api.Exists:
            if self.is_ours(name, zone):
                return  # created by a concurrent or interrupted earlier run
            raise
        self.finish(op, zone, doing)

    def start(self, name: str, zone: str) -> None:
        doing = f"starting {name} in {zone}"
        with self._errors(doing):
            op = self.api().instances.start(project=self.settings.project, zone=zone, instance=name,
                                            timeout=self.timing.api_timeout_s)
        self.finish(op, zone, doing)

    def stop(self, name: str, zone: str) -> None:
        """Stop a VM; one that is gone counts as stopped."""
        doing = f"stopping {name} in {zone}"
        try:
            with self._errors(doing):
                op = self.api().instances.stop(project=self.settings.project, zone=zone, instance=name,
                                               timeout=self.timing.api_timeout_s)
        except api.Gone:
            return
        self.finish(op, zone, doing, gone_is_fine=True)

    def delete(self, name: str, zone: str) -> None:
        """Delete a VM; one that is gone already is what we wanted."""
        doing = f"deleting {name} in {zone}"
        try:
            with self._errors(doing):
                op = self.api().instances.delete(project=self.settings.project, zone=zone, instance=name,
                                                 timeout=self.timing.api_timeout_s)
        except api.Gone:
            return
        self.finish(op, zone, doing, gone_is_fine=True)

    def get(self, name: str, zone: str) -> Any:
        with self._errors(f"reading {name} in {zone}"):
            return self.api().instances.get(project=self.settings.project, zone=zone, instance=name,
                                            timeout=self.timing.api_timeout_s)

    def is_ours(self, name: str, zone: str) -> bool:
        labels = dict(self.get(name, zone).labels)
        if labels.get(CLUSTER_LABEL) == self.cluster_name:
            return True
        raise ProvisionError(
            f"a VM named {name} already exists in {zone} but is not part of cluster "
            f"{self.cluster_name} (labels {labels}): choose another cluster name"
        )

    def disk_exists(self, disk: str, zone: str) -> bool:
        try:
            with self._errors(f"looking for disk {disk} in {zone}"):
                self.api().disks.get(project=self.settings.project, zone=zone, disk=disk,
                                     timeout=self.timing.api_timeout_s)
        except api.Gone:
            return False
        return True

    def accelerator_types(self, zone: str) -> set[str]:
        """The accelerator type names `zone` offers (`acceleratorTypes.list`)."""
        with self._errors(f"listing the accelerator types of {zone}"):
            pages = self.api().accelerator_types.list(project=self.settings.project, zone=zone,
                                                      timeout=self.timing.api_timeout_s)
            return {t.name for t in pages}

    def guest_host_keys(self, name: str, zone: str) -> list[tuple[str, str]]:
        """The (key type, base64) pairs a VM's guest agent published under `hostkeys/`, waited for."""
        deadline = time.monotonic() + self.timing.host_key_timeout_s
        for _ in range(self.timing.max_polls):
            request = compute().GetGuestAttributesInstanceRequest(
                project=self.settings.project, zone=zone, instance=name, query_path="hostkeys/")
            try:
                with self._errors(f"reading the host keys of {name}"):
                    attrs = self.api().instances.get_guest_attributes(request=request,
                                                                      timeout=self.timing.api_timeout_s)
                keys = [(e.key, e.value) for e in attrs.query_value.items]
            except api.Gone:
                keys = []  # 404 until the guest agent has published them
            if keys:
                return keys
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        raise ProvisionError(
            f"{name} published no host keys under guest attributes `hostkeys/` within "
            f"{self.timing.host_key_timeout_s:.0f} s: the image needs the Google guest agent "
            f"(google-guest-agent) and the VM needs metadata enable-guest-attributes=TRUE"
        )

    def finish(self, op: Any, zone: str, doing: str, *, gone_is_fine: bool = False) -> None:
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
            with self._errors(f"{doing} (waiting for {op.name})"):
                op = self.api().zone_operations.wait(project=self.settings.project, zone=zone, operation=op.name,
                                                     timeout=self.timing.api_timeout_s)
        failure = api.operation_failure(op)
        if failure is None:
            return
        if failure.is_stockout:
            raise StockoutError(f"{doing}: {failure.message}")
        if failure.is_quota:
            raise api.quota_error(failure, project=self.settings.project)
        if gone_is_fine and "RESOURCE_NOT_FOUND" in failure.codes:
            return
        raise ProvisionError(f"{doing}: {', '.join(failure.codes)}: {failure.message}")

    # -- the cluster -----------------------------------------------------------------------

    def list_raw(self, *, role: str = "worker") -> dict[str, Any]:
        """The cluster's workers (or with role "head", its head VM), in any zone, by name.

        One label filter finds the cluster; the head is told apart here, so that no
        worker path (create, list, heal, delete, down) ever counts or touches it.
        """
        request = compute().AggregatedListInstancesRequest(
            project=self.settings.project, filter=f'labels.{CLUSTER_LABEL} = "{self.cluster_name}"')
        with self._errors(f"listing the VMs of cluster {self.cluster_name}"):
            pages = self.api().instances.aggregated_list(request=request, timeout=self.timing.api_timeout_s)
            found = {inst.name: inst for _, scoped in pages for inst in scoped.instances}
        return {n: i for n, i in found.items() if (dict(i.labels).get(ROLE_LABEL) == HEAD_ROLE) == (role == HEAD_ROLE)}

    def preempted(self, raw: Mapping[str, Any]) -> set[str]:
        """Names of stopped VMs whose last stop was a preemption (an operation says so)."""
        stopped = {n: i for n, i in raw.items() if status_of(i) in (Status.STOPPING, Status.TERMINATED)}
        found: set[str] = set()
        for zone in sorted({zone_of(i) for i in stopped.values()}):
            request = compute().ListZoneOperationsRequest(
                project=self.settings.project, zone=zone, filter='operationType = "compute.instances.preempted"')
            with self._errors(f"listing preemptions in {zone}"):
                ops = list(self.api().zone_operations.list(request=request, timeout=self.timing.api_timeout_s))
            for op in ops:
                name = op.target_link.rsplit("/", 1)[-1]
                inst = stopped.get(name)
                if inst is not None and zone_of(inst) == zone and _after(op.insert_time, inst.last_start_timestamp):
                    found.add(name)
        return found

    def wait_not_stopping(self, names: Sequence[str]) -> dict[str, Any]:
        """The cluster's VMs once none of `names` is still STOPPING (it cannot be started yet)."""
        deadline = time.monotonic() + self.timing.stopping_timeout_s
        raw: dict[str, Any] = {}
        for _ in range(self.timing.max_polls):
            raw = self.list_raw()
            stopping = [n for n in names if n in raw and status_of(raw[n]) is Status.STOPPING]
            if not stopping or time.monotonic() >= deadline:
                return raw
            time.sleep(self.timing.poll_interval_s)
        return raw

    def wait_booted(self, names: Sequence[str]) -> dict[str, Any]:
        """Poll (one aggregated list per round) until every VM is RUNNING, or stopped again."""
        deadline = time.monotonic() + self.timing.boot_timeout_s
        settled = (Status.RUNNING, Status.TERMINATED)
        raw: dict[str, Any] = {}
        waiting = list(names)
        for _ in range(self.timing.max_polls):
            raw = self.list_raw()
            waiting = [n for n in names if n not in raw or status_of(raw[n]) not in settled]
            if not waiting:
                return raw
            if time.monotonic() >= deadline:
                break
            time.sleep(self.timing.poll_interval_s)
        states = ", ".join(f"{n}: {status_of(raw[n]).value if n in raw else 'gone'}" for n in waiting)
        raise ProvisionError(
            f"not RUNNING after {self.timing.boot_timeout_s:.0f} s ({states}); `fab heal` starts "
            f"or recreates them"
        )


def _default_clients(settings: GceSettings) -> GceClients:
    return api.make_clients(project=settings.project, api_endpoint=settings.api_endpoint)


def _after(op_time: str, last_start: str) -> bool:
    """Whether an operation happened after the VM's last start (RFC 3339 timestamps)."""
    if not last_start:
        return True
    try:
        return datetime.fromisoformat(op_time) >= datetime.fromisoformat(last_start)
    except ValueError:
        return True
