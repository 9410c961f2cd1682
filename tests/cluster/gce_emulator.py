"""A local HTTP emulator of the Compute Engine API subset spotfan uses, for tests.

It serves `compute/v1` on 127.0.0.1 (an ephemeral port) to the real google-cloud-compute
client: instances insert/get/list/aggregatedList/delete/start/stop/getGuestAttributes,
disks get, and zoneOperations get/wait/list, in the API's JSON shapes. It also plays the
VMs' metadata server for one thing, an access token (`/computeMetadata/v1/instance/
service-accounts/default/token`, with `Metadata-Flavor: Google`), and checks the
`Authorization: Bearer` of any request that carries one against the tokens it issued (the
laptop's client sends none: anonymous credentials), so a VM that deletes itself with its
own token is proven to have done so. A backend that can say whether a machine still runs
(`alive`) makes a guest shutdown turn its instance TERMINATED, as on Compute Engine. A non-boot disk
inserted with `autoDelete` false outlives its VM, and can be attached again by `source`. Every request is recorded
(`requests`) and faults can be injected: stockout in a zone, quota errors, preemption,
slow boots, a disabled API.

What an instance *is* comes from a backend with five hooks (see `Backend`). The default,
`KeyOnlyBackend`, makes each instance a record with a freshly generated ed25519 host
key. A lab backend makes each one a lab VM that runs the `startup-script` metadata and
publishes its real host key with `vm.publish(...)`.

    with GceEmulator(project="p", zones=["us-central1-a", "us-central1-b"]) as emu:
        settings = {..., "api_endpoint": emu.endpoint}
"""
from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

API_ROOT = "https://www.googleapis.com/compute/v1"
SERVE_POLL_S = 0.05  # how often serve_forever looks for a shutdown request
IMAGE_URL_PREFIX = API_ROOT + "/"


class Backend(Protocol):
    """What stands behind an emulated instance. Hooks run in a request thread, outside
    the emulator's lock, and must return quickly: start slow work on your own thread,
    then call `vm.publish(address=..., host_keys=...)` when the machine is up.
    A hook that raises makes the request fail with HTTP 500."""

    def on_insert(self, vm: "EmulatedVm") -> None:
        """A VM was created: boot a machine running `vm.metadata["startup-script"]`."""

    def on_start(self, vm: "EmulatedVm") -> None:
        """A TERMINATED VM was started again (same boot disk, same host keys)."""

    def on_stop(self, vm: "EmulatedVm") -> None:
        """The VM was stopped by a client."""

    def on_delete(self, vm: "EmulatedVm") -> None:
        """The VM was deleted (also called for every VM left when the emulator shuts down)."""

    def on_preempt(self, vm: "EmulatedVm") -> None:
        """The VM was preempted: kill the machine now (its status is already TERMINATED)."""

    def alive(self, vm: "EmulatedVm") -> bool:
        """Whether the machine of a RUNNING VM still runs (False: the guest shut itself down)."""


class KeyOnlyBackend:
    """The default backend: no machine at all, one real ed25519 host key per VM."""

    def __init__(self) -> None:
        self._counter = itertools.count(2)

    def on_insert(self, vm: "EmulatedVm") -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        key_type, key = public.decode().split()[:2]
        n = next(self._counter)
        # 203.0.113.0/24 is TEST-NET-3: nothing answers there, which is the point.
        vm.publish(address=f"203.0.113.{n}", internal_address=f"10.128.0.{n}", host_keys={key_type: key})

    def on_start(self, vm: "EmulatedVm") -> None:
        pass

    def on_stop(self, vm: "EmulatedVm") -> None:
        pass

    def on_delete(self, vm: "EmulatedVm") -> None:
        pass

    def on_preempt(self, vm: "EmulatedVm") -> None:
        pass

    def alive(self, vm: "EmulatedVm") -> bool:
        return True


@dataclass
class Recorded:
    """One request the emulator received."""

    method: str  # "GET", "POST", "DELETE"
    path: str  # e.g. "/compute/v1/projects/p/zones/z/instances"
    query: dict[str, str]  # decoded query parameters, e.g. {"filter": 'labels.x = "y"'}
    body: Any  # the decoded JSON body, or None
    token: str | None = None  # the Bearer token it carried (None: anonymous, as the laptop's client)


@dataclass
class EmulatedVm:
    """One instance. Backends read `name`, `zone`, `metadata`, `labels` and call `publish`."""

    name: str
    zone: str
    resource: dict[str, Any]  # the Instance JSON as the client sent it
    id: int
    lock: threading.RLock = field(repr=False)
    state: str = "BOOTING"  # BOOTING (PROVISIONING/STAGING by the clock), RUNNING, STOPPING, TERMINATED
    booted_at: float = 0.0  # monotonic time of the last insert/start
    machine_up: bool = False  # the backend's insert/start hook has returned: `alive` may be asked
    stopping_until: float = 0.0  # monotonic time a STOPPING VM becomes TERMINATED
    address: str = ""  # external IP (natIP)
    internal_address: str = ""  # internal IP (networkIP)
    host_keys: dict[str, str] = field(default_factory=dict)  # key type -> base64, once published
    created: str = ""  # RFC 3339
    last_start: str = ""
    last_stop: str = ""

    @property
    def metadata(self) -> dict[str, str]:
        items = self.resource.get("metadata", {}).get("items", [])
        return {i["key"]: i.get("value", "") for i in items}

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.resource.get("labels", {}))

    @property
    def termination_action(self) -> str:
        return self.resource.get("scheduling", {}).get("instanceTerminationAction", "STOP")

    def publish(
        self, *, address: str | None = None, internal_address: str | None = None, host_keys: dict[str, str] | None = None
    ) -> None:
        """Make the VM reachable at `address` and its host keys readable as guest attributes."""
        with self.lock:
            if address is not None:
                self.address = address
                self.internal_address = internal_address or address
            if host_keys is not None:
                self.host_keys = dict(host_keys)


class GceEmulator:
    """The HTTP server plus its state. Use as a context manager, or start()/shutdown()."""

    def __init__(
        self,
        *,
        project: str,
        zones: Sequence[str],
        images: Iterable[str] = ("spotfan-worker",),
        backend: Backend | None = None,
        provisioning_s: float = 0.0,
        staging_s: float = 0.0,
        host_key_delay_s: float = 0.0,
        operations_done_on_wait: bool = False,
    ) -> None:
        """`images`: image names (or family/NAME) that exist in `project`.
        `provisioning_s`, `staging_s`: how long a VM stays in each state after insert/start.
        `host_key_delay_s`: how long after RUNNING its guest attributes stay 404.
        `operations_done_on_wait`: answer mutations with a RUNNING operation that only a
        zoneOperations get/wait turns DONE (the real API's shape; the SDK's own poller would
        then call Google, so the client must poll itself)."""
        self.project = project
        self.zones = list(zones)
        self.images = {f"projects/{project}/global/images/{i}" if "/" not in i or i.startswith("family/") else i for i in images}
        self.backend: Backend = backend or KeyOnlyBackend()
        self.provisioning_s = provisioning_s
        self.staging_s = staging_s
        self.host_key_delay_s = host_key_delay_s
        self.operations_done_on_wait = operations_done_on_wait
        self.api_disabled = False  # every request gets 403 SERVICE_DISABLED
        # Failed operations carry httpErrorStatusCode/httpErrorMessage, as the real API's
        # do; without them `ExtendedOperation.result()` does not raise at all.
        self.http_error_fields = True
        self.requests: list[Recorded] = []
        self.tokens: list[str] = []  # access tokens the metadata server handed out
        self.reject_tokens = False  # every Bearer token gets 401 (a service account without the role)
        self._lock = threading.RLock()
        self._vms: dict[tuple[str, str], EmulatedVm] = {}  # (zone, name) -> vm
        self._disks: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> Disk, kept (autoDelete false) ones
        self._operations: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, op name) -> Operation
        self._stockout: dict[str, str] = {}  # zone -> "operation" or "http503"
        self._quota: tuple[int, str] | None = None  # (VMs allowed, quota name)
        self._vanish_before_delete: set[str] = set()  # names deleted by "someone else" first
        self._ids = itertools.count(1000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the emulator first"
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> "GceEmulator":
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = False  # server_close() joins every handler thread
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": SERVE_POLL_S}, name="gce-emulator"
        )
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop serving, join every thread, and delete what is left through the backend."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = None
        with self._lock:
            left = list(self._vms.values())
            self._vms.clear()
        for vm in left:
            self.backend.on_delete(vm)

    def __enter__(self) -> "GceEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- fault injection and inspection ------------------------------------------------

    def stockout(self, zone: str, *, style: str = "operation") -> None:
        """Make `zone` full: inserts and starts there fail. `style`: "operation" (a DONE
        operation with ZONE_RESOURCE_POOL_EXHAUSTED) or "http503" (the call itself fails)."""
        assert style in ("operation", "http503")
        self._stockout[zone] = style

    def clear_stockout(self, zone: str) -> None:
        self._stockout.pop(zone, None)

    def quota(self, *, max_vms: int, name: str = "CPUS") -> None:
        """Let at most `max_vms` VMs exist; further inserts fail with QUOTA_EXCEEDED on `name`."""
        self._quota = (max_vms, name)

    def vanish_before_delete(self, name: str) -> None:
        """Let `name` disappear just before our DELETE arrives (another `fab down` was faster)."""
        self._vanish_before_delete.add(name)

    def preempt(self, name: str, *, stopping_s: float = 0.0) -> None:
        """Preempt a VM as Compute Engine does: STOPPING, then TERMINATED (or gone with
        termination action DELETE), and a `compute.instances.preempted` operation."""
        with self._lock:
            vm = self._find(name)
            vm.state = "STOPPING"
            vm.stopping_until = time.monotonic() + stopping_s
            vm.last_stop = _now()
            self._record_operation(vm.zone, vm, "compute.instances.preempted", user="system")
            if vm.termination_action == "DELETE":
                del self._vms[(vm.zone, vm.name)]
        self.backend.on_preempt(vm)

    def vm(self, name: str) -> EmulatedVm:
        with self._lock:
            return self._find(name)

    def vms(self) -> list[EmulatedVm]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda v: v.name)

    def disks(self) -> list[str]:
        """Names of the kept disks (non-boot, autoDelete false) that exist, whatever their VM."""
        with self._lock:
            return sorted(name for _, name in self._disks)

    def status(self, name: str) -> str:
        with self._lock:
            return self._status(self._find(name))

    def recorded(self, method: str, path_pattern: str) -> list[Recorded]:
        """The recorded requests with this method whose path matches the regex (searched)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.search(path_pattern, r.path)]

    # --- state (called under the lock) -------------------------------------------------

    def _find(self, name: str) -> EmulatedVm:
        found = [vm for (zone, n), vm in self._vms.items() if n == name]
        if not found:
            raise KeyError(f"no emulated VM named {name}")
        return found[0]

    def _status(self, vm: EmulatedVm) -> str:
        now = time.monotonic()
        if vm.state == "BOOTING":
            elapsed = now - vm.booted_at
            if elapsed < self.provisioning_s:
                return "PROVISIONING"
            if elapsed < self.provisioning_s + self.staging_s:
                return "STAGING"
            if vm.machine_up and not self.backend.alive(vm):  # the guest shut itself down: a stop
                vm.state, vm.last_stop = "TERMINATED", _now()
                return "TERMINATED"
            return "RUNNING"
        if vm.state == "STOPPING" and now >= vm.stopping_until:
            vm.state = "TERMINATED"
        return vm.state

    def _instance_json(self, vm: EmulatedVm) -> dict[str, Any]:
        status = self._status(vm)
        out = json.loads(json.dumps(vm.resource))
        zone_url = f"{API_ROOT}/projects/{self.project}/zones/{vm.zone}"
        running = status in ("RUNNING", "STAGING")
        for nic in out.get("networkInterfaces", []):
            nic["networkIP"] = vm.internal_address
            for access in nic.get("accessConfigs", []):
                access["natIP"] = vm.address if running else ""  # ephemeral IPs go with a stop
        out.update(
            kind="compute#instance",
            id=str(vm.id),
            zone=zone_url,
            selfLink=f"{zone_url}/instances/{vm.name}",
            status=status,
            creationTimestamp=vm.created,
            lastStartTimestamp=vm.last_start,
        )
        if vm.last_stop:
            out["lastStopTimestamp"] = vm.last_stop
        if "machineType" in out and not out["machineType"].startswith("https://"):
            out["machineType"] = f"{API_ROOT}/projects/{self.project}/{out['machineType']}"
        return out

    def _record_operation(
        self, zone: str, vm: EmulatedVm | None, op_type: str, *, target: str = "", error: dict | None = None, user: str = "tests"
    ) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{next(self._ids):x}"
        zone_url = f"{API_ROOT}/projects/{self.project}/zones/{zone}"
        now = _now()
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(next(self._ids)),
            "name": name,
            "zone": zone_url,
            "operationType": op_type,
            "targetLink": f"{zone_url}/instances/{vm.name if vm else target}",
            "targetId": str(vm.id if vm else 0),
            "status": "RUNNING" if self.operations_done_on_wait else "DONE",
            "user": user,
            "progress": 0 if self.operations_done_on_wait else 100,
            "insertTime": now,
            "startTime": now,
            "selfLink": f"{zone_url}/operations/{name}",
        }
        if not self.operations_done_on_wait:
            op["endTime"] = now
        if error is not None:
            op.update(error)
            if not self.http_error_fields:
                op.pop("httpErrorStatusCode", None)
                op.pop("httpErrorMessage", None)
        self._operations[(zone, name)] = op
        return op

    # --- the API -----------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, str], body: Any, *,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """Answer one request: (HTTP status, JSON body)."""
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        auth = headers.get("authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        with self._lock:
            self.requests.append(Recorded(method, path, query, body, token))
        if path.startswith("/computeMetadata/v1/"):
            return self._metadata(method, path, headers)
        if auth and (token is None or token not in self.tokens or self.reject_tokens):
            return _error(401, "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                          "authError")
        if self.api_disabled:
            return _api_disabled(self.project)
        m = re.fullmatch(r"/compute/v1/projects/([^/]+)/(.*)", path)
        if not m:
            return _error(404, f"no such API path {path}", "notFound")
        project, rest = m.groups()
        if project != self.project:
            return _error(404, f"The resource 'projects/{project}' was not found", "notFound")
        if rest == "aggregated/instances" and method == "GET":
            return self._aggregated_list(query)
        m = re.fullmatch(r"zones/([^/]+)/(instances|operations|disks)(?:/([^/]+))?(?:/([^/]+))?", rest)
        if not m:
            return _error(404, f"no such API path {path}", "notFound")
        zone, collection, name, verb = m.groups()
        if zone not in self.zones:
            return _error(400, f"Invalid value for field 'zone': '{zone}'. Unknown zone.", "invalid")
        route = (method, collection, name is not None, verb)
        if route == ("GET", "instances", False, None):
            return self._list(zone, query)
        if route == ("POST", "instances", False, None):
            return self._insert(zone, body or {})
        if route == ("GET", "operations", False, None):
            return self._list_operations(zone, query)
        if collection == "operations" and name and verb in (None, "wait"):
            return self._get_operation(zone, name)
        if collection == "instances" and name:
            return self._instance_call(method, zone, name, verb, query)
        if route == ("GET", "disks", True, None):
            with self._lock:
                disk = self._disks.get((zone, name))
            if disk is None:
                return _error(404, f"The resource 'projects/{self.project}/zones/{zone}/disks/{name}' was not found", "notFound")
            return 200, dict(disk)
        return _error(404, f"no such API path {path}", "notFound")

    def _metadata(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """The metadata server's token endpoint (the only part of it a worker uses)."""
        if headers.get("metadata-flavor") != "Google":
            return 403, {"error": "Missing required header: Metadata-Flavor: Google"}
        if (method, path) != ("GET", "/computeMetadata/v1/instance/service-accounts/default/token"):
            return 404, {"error": f"no such metadata path {path}"}
        with self._lock:
            token = f"emu-token-{next(self._ids):x}"
            self.tokens.append(token)
        return 200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"}

    def _list(self, zone: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        match = _parse_filter(query.get("filter", ""))
        if match is None:
            return _error(400, f"Invalid value for field 'filter': '{query.get('filter')}'. Invalid list filter expression.", "invalid")
        with self._lock:
            items = [self._instance_json(vm) for (z, _), vm in sorted(self._vms.items()) if z == zone]
        out: dict[str, Any] = {"kind": "compute#instanceList", "id": f"projects/{self.project}/zones/{zone}/instances"}
        items = [i for i in items if match(i)]
        if items:
            out["items"] = items
        return 200, out

    def _aggregated_list(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        match = _parse_filter(query.get("filter", ""))
        if match is None:
            return _error(400, f"Invalid value for field 'filter': '{query.get('filter')}'. Invalid list filter expression.", "invalid")
        scopes: dict[str, Any] = {}
        with self._lock:
            for zone in self.zones:
                items = [self._instance_json(vm) for (z, _), vm in sorted(self._vms.items()) if z == zone]
                items = [i for i in items if match(i)]
                scopes[f"zones/{zone}"] = (
                    {"instances": items}
                    if items
                    else {"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope 'zones/" + zone + "' on this page."}}
                )
        return 200, {"kind": "compute#instanceAggregatedList", "id": f"projects/{self.project}/aggregated/instances", "items": scopes}

    def _insert(self, zone: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("name", "")
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
            return _error(400, f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex '(?:[a-z](?:[-a-z0-9]{{0,61}}[a-z0-9])?)'", "invalid")
        image = _boot_image(body)
        if image not in self.images:
            return _error(404, f"The resource '{image}' was not found", "notFound")
        if self._stockout.get(zone) == "http503":
            return _error(503, "Internal error. Please try again or contact Google Support.", "backendError")
        with self._lock:
            if (zone, name) in self._vms:
                return _error(409, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' already exists", "alreadyExists")
            kept, refusal = self._kept_disks(zone, body)
            if refusal is not None:
                return refusal
            vm = EmulatedVm(name=name, zone=zone, resource=body, id=next(self._ids), lock=self._lock)
            if self._stockout.get(zone) == "operation":
                return 200, self._record_operation(zone, vm, "insert", error=_stockout_error(self.project, zone))
            if self._quota is not None and len(self._vms) >= self._quota[0]:
                return 200, self._record_operation(zone, vm, "insert", error=_quota_error(self._quota, zone))
            vm.created = vm.last_start = _now()
            vm.booted_at = time.monotonic()
            self._vms[(zone, name)] = vm
            self._disks.update(kept)
            op = self._record_operation(zone, vm, "insert")
        self.backend.on_insert(vm)
        vm.machine_up = True
        return 200, op

    def _kept_disks(self, zone: str, body: dict[str, Any]) -> tuple[dict[tuple[str, str], dict[str, Any]], Any]:
        """The autoDelete-false disks an insert creates, or the error it gets (missing source, name taken)."""
        kept: dict[tuple[str, str], dict[str, Any]] = {}
        for disk in body.get("disks", []):
            if disk.get("boot"):
                continue
            if "source" in disk:
                name = disk["source"].rsplit("/", 1)[-1]
                if (zone, name) not in self._disks:
                    return {}, _error(404, f"The resource 'projects/{self.project}/zones/{zone}/disks/{name}' was not found", "notFound")
                continue
            name = disk.get("initializeParams", {}).get("diskName", "")
            if (zone, name) in self._disks:
                return {}, _error(409, f"The resource 'projects/{self.project}/zones/{zone}/disks/{name}' already exists", "alreadyExists")
            if name and not disk.get("autoDelete", False):
                size = disk.get("initializeParams", {}).get("diskSizeGb", "10")
                kept[(zone, name)] = {"kind": "compute#disk", "name": name, "sizeGb": str(size), "zone": f"{API_ROOT}/projects/{self.project}/zones/{zone}"}
        return kept, None

    def _instance_call(self, method: str, zone: str, name: str, verb: str | None, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if method == "DELETE" and name in self._vanish_before_delete:
            with self._lock:
                self._vanish_before_delete.discard(name)
                gone = self._vms.pop((zone, name), None)
            if gone is not None:
                self.backend.on_delete(gone)
        with self._lock:
            vm = self._vms.get((zone, name))
            if vm is None:
                return _error(404, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' was not found", "notFound")
            if (method, verb) == ("GET", None):
                return 200, self._instance_json(vm)
            if (method, verb) == ("GET", "getGuestAttributes"):
                return self._guest_attributes(vm, query.get("queryPath", ""))
            if (method, verb) == ("DELETE", None):
                del self._vms[(zone, name)]
                op = self._record_operation(zone, vm, "delete")
                hook = self.backend.on_delete
            elif (method, verb) == ("POST", "stop"):
                vm.state, vm.last_stop = "TERMINATED", _now()
                op = self._record_operation(zone, vm, "stop")
                hook = self.backend.on_stop
            elif (method, verb) == ("POST", "start"):
                status = self._status(vm)
                if status == "STOPPING":
                    return _error(400, f"The resource 'projects/{self.project}/zones/{zone}/instances/{name}' is not ready", "resourceNotReady")
                if status != "TERMINATED":
                    return 200, self._record_operation(zone, vm, "start")  # starting a running VM is a no-op
                if zone in self._stockout:
                    return 200, self._record_operation(zone, vm, "start", error=_stockout_error(self.project, zone))
                vm.state, vm.booted_at, vm.last_start = "BOOTING", time.monotonic(), _now()
                vm.machine_up = False
                op = self._record_operation(zone, vm, "start")
                hook = self.backend.on_start
            else:
                return _error(404, f"no such instance method {method} {verb}", "notFound")
        hook(vm)
        if hook == self.backend.on_start:
            vm.machine_up = True
        return 200, op

    def _guest_attributes(self, vm: EmulatedVm, query_path: str) -> tuple[int, dict[str, Any]]:
        published = (
            self._status(vm) == "RUNNING"
            and time.monotonic() >= vm.booted_at + self.provisioning_s + self.staging_s + self.host_key_delay_s
            and vm.metadata.get("enable-guest-attributes", "").upper() == "TRUE"
            and vm.host_keys
        )
        if query_path != "hostkeys/" or not published:
            return _error(404, f"The resource 'projects/{self.project}/zones/{vm.zone}/instances/{vm.name}/guestAttributes/{query_path}' was not found", "notFound")
        items = [{"namespace": "hostkeys", "key": k, "value": v} for k, v in sorted(vm.host_keys.items())]
        return 200, {"kind": "compute#guestAttributes", "queryPath": query_path, "queryValue": {"items": items}}

    def _get_operation(self, zone: str, name: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            op = self._operations.get((zone, name))
            if op is None:
                return _error(404, f"The resource 'projects/{self.project}/zones/{zone}/operations/{name}' was not found", "notFound")
            if op["status"] != "DONE":
                op.update(status="DONE", progress=100, endTime=_now())
            return 200, dict(op)

    def _list_operations(self, zone: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        match = _parse_filter(query.get("filter", ""))
        if match is None:
            return _error(400, "Invalid list filter expression.", "invalid")
        with self._lock:
            items = [dict(op) for (z, _), op in self._operations.items() if z == zone and match(op)]
        out: dict[str, Any] = {"kind": "compute#operationList", "id": f"projects/{self.project}/zones/{zone}/operations"}
        if items:
            out["items"] = items
        return 200, out


# --- helpers -------------------------------------------------------------------------

_TERM = re.compile(r'\(?\s*([A-Za-z][\w.-]*)\s*(=|!=|eq|ne)\s*"?([^"()\s]*)"?\s*\)?')


def _parse_filter(text: str) -> Any:
    """A predicate for a list filter such as `labels.k = "v"` (terms ANDed), or None if invalid."""
    terms = []
    rest = re.sub(r"\bAND\b", " ", text).strip()
    while rest:
        m = _TERM.match(rest)
        if not m:
            return None
        terms.append(m.groups())
        rest = rest[m.end():].strip()

    def field_of(resource: dict[str, Any], path: str) -> str:
        value: Any = resource
        for part in path.split("."):
            value = value.get(part, "") if isinstance(value, dict) else ""
        return str(value)

    def match(resource: dict[str, Any]) -> bool:
        for path, op, value in terms:
            equal = field_of(resource, path) == value
            if equal != (op in ("=", "eq")):
                return False
        return True

    return match


def _boot_image(body: dict[str, Any]) -> str:
    for disk in body.get("disks", []):
        if disk.get("boot"):
            image = disk.get("initializeParams", {}).get("sourceImage", "")
            return image.removeprefix(IMAGE_URL_PREFIX)
    return ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _error(code: int, message: str, reason: str) -> tuple[int, dict[str, Any]]:
    return code, {"error": {"code": code, "message": message, "errors": [{"message": message, "domain": "global", "reason": reason}]}}


def _api_disabled(project: str) -> tuple[int, dict[str, Any]]:
    message = (
        f"Compute Engine API has not been used in project {project} before or it is disabled. "
        f"Enable it by visiting https://console.developers.google.com/apis/api/compute.googleapis.com/overview?project={project} "
        f"then retry. If you enabled this API recently, wait a few minutes for the action to propagate to our systems and retry."
    )
    return 403, {
        "error": {
            "code": 403,
            "message": message,
            "errors": [{"message": message, "domain": "usageLimits", "reason": "accessNotConfigured"}],
            "status": "PERMISSION_DENIED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "SERVICE_DISABLED",
                    "domain": "googleapis.com",
                    "metadata": {"service": "compute.googleapis.com", "consumer": f"projects/{project}"},
                }
            ],
        }
    }


def _stockout_error(project: str, zone: str) -> dict[str, Any]:
    message = (
        f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to "
        f"fulfill the request.  Try a different zone, or try again later."
    )
    return {
        "error": {"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": message}]},
        "httpErrorStatusCode": 503,
        "httpErrorMessage": "SERVICE UNAVAILABLE",
    }


def _quota_error(quota: tuple[int, str], zone: str) -> dict[str, Any]:
    region = zone.rsplit("-", 1)[0]
    limit, name = quota
    message = f"Quota '{name}' exceeded.  Limit: {float(limit)} in region {region}."
    details = [{"quotaInfo": {"metricName": f"compute.googleapis.com/{name.lower()}", "limitName": f"{name}-per-project-region", "dimensions": {"region": region}, "limit": limit}}]
    return {
        "error": {"errors": [{"code": "QUOTA_EXCEEDED", "message": message, "errorDetails": details}]},
        "httpErrorStatusCode": 403,
        "httpErrorMessage": "FORBIDDEN",
    }


def _handler_for(emulator: GceEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no handler thread outlives its request.
        protocol_version = "HTTP/1.0"

        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
                status, payload = emulator.handle(self.command, url.path, query, body, headers=dict(self.headers))
            except Exception as e:  # a backend hook failed: the client sees a 500, tests see why
                status, payload = _error(500, f"emulator: {type(e).__name__}: {e}", "backendError")
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the record in `emulator.requests` is the log

    return Handler
