"""End to end through the GCE code path: `fab` drives the real google-cloud-compute client
against the local Compute API emulator, whose instances are lab VMs (gce_lab_backend).

The head is a lab head (GCE has no head of its own to start), and the GCE cluster.toml is
the lab test cluster's own with `provider = "gce"`, so a crashed run's VMs and head are
still found and killed by the lab fixture.
"""
from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("google.cloud.compute_v1", reason="google-cloud-compute is not installed")

from labs import FAB, FAB_TIMEOUT_S, FIXTURES, REPO, Lab, lab_processes  # noqa: E402
from gce_emulator import GceEmulator  # noqa: E402
from gce_lab_backend import LabBackend  # noqa: E402

from cluster import lifecycle  # noqa: E402
from cluster.boot import head_known_hosts  # noqa: E402
from cluster.config import ClusterConfig, load  # noqa: E402
from cluster.providers.gce import CLUSTER_LABEL, GceProvider, GceSettings, Timing  # noqa: E402
from cluster.ssh_keys import public_key, write_known_hosts  # noqa: E402
from cluster.providers import PROVIDERS  # noqa: E402
from cluster.providers.base import Status  # noqa: E402
from cluster.records import CLUSTER_DIR  # noqa: E402

HERE = Path(__file__).resolve().parent
PROJECT = "spotfan-e2e"
ZONES = ["us-central1-a", "us-central1-b"]
FULL, SPARE = ZONES
MAX_RUN_S = 3600
SPOT_PRICE = 0.04  # e2-standard-4, per hour, as written in [gce.prices]
DISK_PRICE = 0.10  # pd-balanced, per GB and month, as written in [gce.disk_prices]
IDLE_S = 20  # idle_timeout of the clusters whose workers must stop or delete themselves
SLACK_S = 15  # see test_fail_closed.SLACK_S
WORKERS = 8
WORKERS_PER_VM = 2
KEYS = 160
PREEMPTED = 3
RUN_TIMEOUT_S = 120
RESUME_TIMEOUT_S = 20
FAST = Timing(api_timeout_s=10, operation_timeout_s=10, boot_timeout_s=10, stopping_timeout_s=10,
              host_key_timeout_s=10, poll_interval_s=0.05, max_polls=500)


@dataclass
class GceLab:
    """A lab test cluster seen through GCE: `fab` with gce.toml, against `emu`."""

    lab: Lab  # the same cluster as a lab: its head, VM disks and pids
    emu: GceEmulator
    toml: Path  # gce.toml, next to the lab's cluster.toml
    config: ClusterConfig  # gce.toml, parsed

    def fab(self, *args: str, timeout: float = FAB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SPOTFAN_CONFIG": str(self.toml)}
        return subprocess.run([str(FAB), *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def fab_ok(self, *args: str, timeout: float = FAB_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        r = self.fab(*args, timeout=timeout)
        assert r.returncode == 0, f"fab {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r

    def provider(self) -> GceProvider:
        """The GCE provider of this cluster, as `fab` builds it, with short waits."""
        p = PROVIDERS["gce"].make(self.config)
        p.timing = FAST
        return p

    def inserts(self, zone: str = "[^/]+") -> list[Any]:
        return self.emu.recorded("POST", rf"/zones/{zone}/instances$")


@pytest.fixture
def gce_lab(make_lab: Callable[..., Lab]) -> Iterator[Callable[..., GceLab]]:
    """Factory: a lab head, an emulator whose VMs are lab VMs, and gce.toml pointing at both."""
    emulators: list[GceEmulator] = []

    def make(*, workers: int, workers_per_vm: int = 1, idle_timeout: float = 120, idle_action: str = "stop",
             service_account: str = "", boot_timeout: float = 30) -> GceLab:
        # The lab's own VM addresses and head port (the session's, see conftest) serve as GCE's.
        lab = make_lab(workers=workers, workers_per_vm=workers_per_vm, idle_timeout=idle_timeout,
                       boot_timeout=boot_timeout)
        # GceProvider has no head to start: the lab starts it, and gce.toml names its host key.
        head_keys = lab.folder / "keys" / "head_known_hosts"
        with lab.cluster() as cluster:
            lifecycle.prepare(cluster)
            write_known_hosts(head_keys, {"head": head_known_hosts(cluster)})
        emu = GceEmulator(project=PROJECT, zones=ZONES, backend=LabBackend(lab.provider)).start()
        emulators.append(emu)
        raw = tomllib.loads((lab.folder / "cluster.toml").read_text())
        raw["cluster"].update(provider="gce", mount_point=str(lab.folder / "mnt"), idle_action=idle_action)
        raw["head"]["host_keys"] = str(head_keys)
        raw["ssh"]["user"] = "root"  # so the startup-script is boot.sh itself
        raw["gce"] = {
            "project": PROJECT, "zones": ZONES, "image": "spotfan-worker", "api_endpoint": emu.endpoint,
            "max_run_duration_s": MAX_RUN_S, "labels": {"purpose": "e2e"},
            "prices": {"e2-standard-4": {"standard": 0.134, "spot": SPOT_PRICE}},
            "disk_prices": {"pd-balanced": DISK_PRICE},
            **({"service_account": service_account} if service_account else {}),
        }
        toml = lab.folder / "gce.toml"
        toml.write_text(_toml(raw))
        return GceLab(lab=lab, emu=emu, toml=toml, config=load(toml))

    yield make
    for emu in emulators:
        emu.shutdown()  # deletes what is left through the backend: kills those lab VMs


def test_lab_backend_runs_the_startup_script_at_every_boot_and_keeps_disk_and_host_key(gce_lab):
    g = gce_lab(workers=1)
    boot_script = '#!/bin/sh\necho "boot $(hostname)" >> "$SPOTFAN_HOME/boots"\n'
    table = {**tomllib.loads(g.toml.read_text())["gce"], "ssh_user": "root"}
    gce = GceProvider(GceSettings.from_mapping(table),
                      cluster_name=g.config.name, boot_script=boot_script,
                      ssh_public_key=public_key(g.config.ssh.key), timing=FAST)
    name = g.config.vm_names(1)[0]
    boots = g.lab.provider.vm_home(name) / "boots"

    (vm,) = gce.create([name])
    assert (vm.status, vm.address, vm.zone) == (Status.RUNNING, f"{g.lab.settings.address_prefix}1", FULL)
    keys = gce.host_keys([name])
    assert keys == g.lab.provider.host_keys([name])  # the VM's real sshd host key
    g.lab.wait_for("the startup-script", lambda: boots.exists(), timeout=10)
    g.lab.wait_for("the VM's sshd", lambda: _listening(vm.address, 22), timeout=10)  # PID 1 starts both at once
    # The metadata's ssh-keys let the laptop in; the published host key is the one sshd shows.
    write_known_hosts(g.config.ssh.known_hosts, keys)
    ssh = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
           "-o", f"UserKnownHostsFile={g.config.ssh.known_hosts}", "-o", "ConnectTimeout=5",
           "-i", str(g.config.ssh.key), f"root@{vm.address}", 'cat "$SPOTFAN_HOME/boots"']
    out = subprocess.run(ssh, capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout) == (0, f"boot {name}\n"), out.stderr

    g.emu.preempt(name)
    assert g.lab.provider.processes(name) == [], "a preemption kills every process of the VM"
    (listed,) = gce.list()
    assert (listed.status, listed.preempted) == (Status.TERMINATED, True)

    (vm,) = gce.start([name])
    assert vm.status is Status.RUNNING
    g.lab.wait_for("the startup-script at the second boot", lambda: boots.read_text().count("boot") == 2,
                   timeout=10)  # same disk: the first boot's line is still there
    assert gce.host_keys([name]) == keys
    assert len(g.inserts()) == 1 and len(g.emu.recorded("POST", r"/start$")) == 1

    gce.delete([name])
    assert g.emu.vms() == [] and g.lab.statuses() == {}
    assert not boots.exists(), "delete removes the disk"


def test_fab_up_run_preempt_heal_down_through_gce(gce_lab):
    g = gce_lab(workers=WORKERS, workers_per_vm=WORKERS_PER_VM)
    names = g.config.vm_names()
    share = g.lab.share
    (share / "in").mkdir(parents=True)
    for i in range(KEYS):
        (share / "in" / f"{i:04d}.txt").write_text(payload(i))

    # --- up: the first zone is out of capacity, so all 8 land in the second -------------
    g.emu.stockout(FULL)
    t = time.monotonic()
    up = g.fab_ok("up")
    up_s = time.monotonic() - t
    lines = up.stdout.splitlines()
    plan = lines.index(f"==> up: will create {WORKERS} ({', '.join(names)}), start 0, delete 0; 0 already there")
    cost = lines.index(f"==> up: cost: {WORKERS} x e2-standard-4 (spot) at {SPOT_PRICE:.4f}/h each = about "
                       f"{WORKERS * SPOT_PRICE:.2f} per hour (from [gce.prices]; boot disks and traffic not "
                       f"included; spot prices change, see https://cloud.google.com/spot-vms/pricing)")
    first_created = min(i for i, ln in enumerate(lines) if ": created" in ln)
    assert plan < cost < first_created, "the plan and the estimate come before anything is created"
    for n in names:
        assert re.search(rf"^{n}: created in {SPARE}; mount: ok \(mounted\); agent: ok \(started", up.stdout, re.M), up.stdout
    assert f"zone {FULL} has no capacity for {WORKERS} VM(s); trying the next zone" in up.stderr
    # What the emulator received: 8 refused in the full zone, then 8 created in the spare one.
    assert sorted(r.body["name"] for r in g.inserts(FULL)) == names
    assert sorted(r.body["name"] for r in g.inserts(SPARE)) == names
    assert {vm.name: vm.zone for vm in g.emu.vms()} == dict.fromkeys(names, SPARE)
    assert_insert_body(g, g.inserts(SPARE)[0].body)

    # --- run a real task over the shared SSHFS directory ------------------------------
    out = g.fab_ok("run", "sh lab_work.sh {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
                   "--lease", "10", "--ship", str(FIXTURES / "lab_work.sh")).stdout
    run_id = re.search(r"run (r[\w-]+) requested", out).group(1)
    outputs = share / "out"
    g.lab.wait_for("a quarter of the outputs",
                   lambda: outputs.exists() and len(list(outputs.iterdir())) >= KEYS // 4, timeout=60)

    # --- preemptions, injected through the emulator ------------------------------------
    victims = names[1:1 + PREEMPTED]
    for v in victims:
        g.emu.preempt(v)
        assert g.lab.provider.processes(v) == [], f"preempting {v} kills every process of its VM"
    st = json.loads(g.fab_ok("status", "--json").stdout)
    by_name = {v["name"]: v for v in st["vms"]}
    assert {v: (by_name[v]["status"], by_name[v]["preempted"]) for v in victims} == \
        dict.fromkeys(victims, ("TERMINATED", True))
    assert all(by_name[n]["status"] == "RUNNING" for n in names if n not in victims)

    # --- heal: started again (same disk, same zone), and the startup-script resumes them
    t = time.monotonic()
    healed = g.fab_ok("heal").stdout
    heal_s = time.monotonic() - t
    for v in victims:
        assert f"{v}: started in {SPARE};" in healed, healed
    assert f"{PREEMPTED} VMs needed help" in healed
    started = sorted(r.path.rsplit("/", 2)[-2] for r in g.emu.recorded("POST", r"/instances/[^/]+/start$"))
    assert started == victims and len(g.inserts()) == 2 * WORKERS, "started again, not recreated"
    for v in victims:
        console = g.lab.provider.vm_home(v).parent / "console.log"
        g.lab.wait_for(f"{v}'s startup-script to run boot.sh again",
                       lambda: re.search(r"^agent: (starting|running) \(pid", console.read_text(), re.M),
                       timeout=RESUME_TIMEOUT_S)  # (boot.sh never says ok: `fab up` does, on a heartbeat)
        assert "boot: not provisioned yet" in console.read_text()  # its first boot, before fab up

    # --- completion: the exact output set, every output whole ---------------------------
    done_file = share / CLUSTER_DIR / "runs" / f"{run_id}.done.json"
    t = time.monotonic()
    g.lab.wait_for("the run to finish", done_file.exists, timeout=RUN_TIMEOUT_S)
    record = json.loads(done_file.read_text())
    log = share / CLUSTER_DIR / "logs" / str(record.get("vm")) / f"{run_id}.log"
    assert record["result"] == "done", (record, log.read_text()[-3000:] if log.exists() else "no log")
    assert sorted(p.name for p in outputs.iterdir()) == [f"{i:04d}.txt" for i in range(KEYS)]
    for i in range(KEYS):
        assert (outputs / f"{i:04d}.txt").read_text() == payload(i) * 5, f"output {i} is torn"
    # Only what was in flight on the preempted VMs can have run twice: count every start
    # (the task leaves a marker first) and every logged success (a preempted VM may lose
    # its last log lines, never an output).
    in_flight_bound = PREEMPTED * WORKERS_PER_VM
    starts = collections.Counter(p.name.split(".txt.")[0] for p in (share / "starts").iterdir())
    assert set(starts) == {f"{i:04d}" for i in range(KEYS)}
    assert sum(starts.values()) - KEYS <= in_flight_bound, starts.most_common(8)
    rows = [json.loads(line) for log in share.glob(".spotfan/tasks/*/log/*.jsonl")
            for line in log.read_text().splitlines() if line.strip()]
    per_key = collections.Counter(r["key"] for r in rows if r["ok"])
    assert sum(per_key.values()) - len(per_key) <= in_flight_bound, per_key.most_common(8)
    status = g.fab_ok("status").stdout
    assert re.search(rf"run {run_id}: done: {KEYS}/{KEYS} done, 0 failed", status), status

    # --- down: nothing left in the emulator, no lab VM process left ---------------------
    vm_processes = [p for n in names for p in g.lab.provider.processes(n)]
    assert vm_processes
    down = g.fab_ok("down").stdout
    assert f"deleted {WORKERS} VMs ({', '.join(names)}); none left" in down
    assert g.emu.vms() == []
    deleted = sorted(r.path.rsplit("/", 1)[-1] for r in g.emu.recorded("DELETE", rf"/zones/{SPARE}/instances/"))
    assert deleted == names
    assert g.emu.requests[-1].path.endswith("/aggregated/instances"), "listed again to prove it"
    assert not [p for p in vm_processes if _alive(p)], "fab down leaves no lab VM process"
    assert g.lab.statuses() == {}
    with g.lab.cluster() as cluster:
        lifecycle.down(cluster)  # the lab's view: no VM to delete, and it stops the head
    assert lab_processes(g.lab.folder) == []
    print(f"fab up {up_s:.1f}s, fab heal {heal_s:.1f}s, run finished {time.monotonic() - t:.1f}s after heal")


def test_repeated_fab_up_creates_one_vm_per_missing_vm(gce_lab):
    g = gce_lab(workers=3)
    w1, w2, w3 = g.config.vm_names()
    g.fab_ok("up")
    assert len(g.inserts()) == 3

    again = g.fab_ok("up").stdout
    assert "==> up: will create 0, start 0, delete 0; 3 already there" in again
    assert again.count(": running in us-central1-a; mount: ok (already mounted); agent: ok (already running") == 3
    assert len(g.inserts()) == 3, "nothing is created twice"

    g.provider().delete([w2])  # gone behind spotfan's back
    g.emu.preempt(w3)
    t = time.monotonic()
    third = g.fab_ok("up").stdout
    assert f"==> up: will create 1 ({w2}), start 1 ({w3}), delete 0; 1 already there" in third
    assert "==> up: cost: 3 x e2-standard-4 (spot) at 0.0400/h each = about 0.12 per hour" in third
    assert f"{w2}: created in us-central1-a; mount: ok (mounted); agent: ok (started" in third
    assert re.search(rf"^{w3}: started in us-central1-a; mount: ok", third, re.M), third
    assert [r.body["name"] for r in g.inserts()][3:] == [w2], "one create per missing VM"
    assert [r.path.rsplit("/", 2)[-2] for r in g.emu.recorded("POST", r"/start$")] == [w3]
    print(f"repeated fab up: {time.monotonic() - t:.1f}s")
    assert "deleted 3 VMs" in g.fab_ok("down").stdout
    assert g.emu.vms() == [] and g.lab.statuses() == {}


# --- an idle worker stops (or deletes) itself -------------------------------------------


def test_an_idle_gce_worker_stops_itself_with_a_guest_shutdown(gce_lab):
    g = gce_lab(workers=1, idle_timeout=IDLE_S)
    (name,) = g.config.vm_names()
    g.fab_ok("up")
    t0 = time.monotonic()
    g.lab.wait_for("the idle worker to stop itself", lambda: g.emu.status(name) == "TERMINATED",
                   timeout=IDLE_S + SLACK_S + 30)
    took = time.monotonic() - t0
    assert took <= IDLE_S + SLACK_S, took
    guard = (g.lab.provider.vm_home(name) / "watchdog.log").read_text()
    assert "running `/sbin/shutdown -h now`" in guard, guard
    assert g.emu.recorded("DELETE", "/instances/") == [] and g.emu.tokens == [], "a stop, not a delete"
    assert g.lab.provider.processes(name) == []
    st = g.fab_ok("status").stdout
    assert f"billing now: 1 stopped worker(s)' boot disks (20 GB pd-balanced): {20 * DISK_PRICE / 730:.4f}/h" in st, st
    print(f"the idle GCE worker stopped itself {took:.0f}s after fab up (idle_timeout {IDLE_S}s)")


def test_an_idle_gce_worker_deletes_itself_with_its_own_token(gce_lab):
    # Its idle clock runs from boot: long enough for `fab up` and `fab status` on a busy machine
    idle = 2 * IDLE_S
    g = gce_lab(workers=1, idle_timeout=idle, idle_action="delete",
                service_account=f"worker@{PROJECT}.iam.gserviceaccount.com")
    (name,) = g.config.vm_names()
    up = g.fab_ok("up").stdout
    assert re.search(rf"^{name}: created in {FULL}; mount: ok", up, re.M), up
    st = g.fab_ok("status").stdout
    assert f"billing now: 1 running worker(s) (e2-standard-4, spot): {SPOT_PRICE:.4f}/h" in st, st
    t0 = time.monotonic()
    g.lab.wait_for("the idle worker to delete itself", lambda: g.emu.vms() == [], timeout=idle + SLACK_S + 30)
    took = time.monotonic() - t0
    assert took <= idle + SLACK_S, took
    (delete,) = g.emu.recorded("DELETE", rf"/zones/{FULL}/instances/{name}$")
    assert delete.token is not None and delete.token in g.emu.tokens, "deleted with the token its metadata server gave"
    assert g.emu.recorded("GET", "/computeMetadata/v1/instance/service-accounts/default/token")
    # the emulator forgets the instance, then its backend deletes the lab VM: wait for that
    g.lab.wait_for("the instance's machine to be gone with it", lambda: g.lab.statuses() == {}, timeout=30)
    st = g.fab_ok("status").stdout
    assert "no VM is left" in st and "billing now: nothing" in st, st
    print(f"the idle GCE worker deleted itself {took:.0f}s after fab up (idle_timeout {IDLE_S}s)")


def test_a_refused_self_delete_falls_back_to_a_stop(gce_lab):
    g = gce_lab(workers=1, idle_timeout=IDLE_S, idle_action="delete",
                service_account=f"worker@{PROJECT}.iam.gserviceaccount.com")
    (name,) = g.config.vm_names()
    g.emu.reject_tokens = True  # its service account may not delete instances
    g.fab_ok("up")
    g.lab.wait_for("the worker to stop itself instead", lambda: g.emu.status(name) == "TERMINATED",
                   timeout=IDLE_S + SLACK_S + 30)
    guard = (g.lab.provider.vm_home(name) / "watchdog.log").read_text()
    assert "the Compute API refused the delete (HTTP 401)" in guard and "/sbin/shutdown -h now" in guard, guard


def test_a_gce_worker_never_provisioned_by_fab_up_stops_itself(gce_lab):
    # `fab up` created it, then the laptop went away before it provisioned the VM.
    g = gce_lab(workers=1, idle_timeout=5, boot_timeout=5)
    (name,) = g.config.vm_names()
    t0 = time.monotonic()
    (vm,) = g.provider().create([name])
    assert vm.status is Status.RUNNING
    g.lab.wait_for("the unprovisioned worker to stop itself", lambda: g.emu.status(name) == "TERMINATED",
                   timeout=10 + SLACK_S + 30)
    took = time.monotonic() - t0
    assert took <= 10 + SLACK_S, took
    said = (g.lab.provider.vm_home(name) / "unprovisioned.log").read_text()
    assert "boot: not provisioned within 10 s: stopping this VM with `/sbin/shutdown -h now`" in said, said
    print(f"an unprovisioned worker stopped itself {took:.0f}s after its creation")


def test_a_gce_worker_that_cannot_work_is_stopped_by_fab_up(gce_lab):
    g = gce_lab(workers=2)
    raw = g.toml.read_text().replace(f'python = "{sys.executable}"', 'python = "/opt/nowhere/bin/python"')
    g.toml.write_text(raw)
    r = g.fab("up")
    assert r.returncode == 1, r.stdout + r.stderr
    for name in g.config.vm_names():
        assert f"{name}: FAILED: agent did not report: cluster.python = /opt/nowhere/bin/python does not exist" in r.stdout
        assert g.emu.status(name) == "TERMINATED", "stopped through the Compute API, not left billing"
    assert len(g.emu.recorded("POST", r"/instances/[^/]+/stop$")) == 2


# --- helpers ---------------------------------------------------------------------------


def payload(i: int) -> str:
    return f"input {i}\n" + "spotfan " * 64 + "\n"


def assert_insert_body(g: GceLab, body: dict[str, Any]) -> None:
    """What `fab up` sent for one worker, from cluster.toml (the provider's own test covers
    the options; this checks that fab passes the real boot script, key and settings)."""
    assert body["scheduling"] == {
        "provisioningModel": "SPOT", "instanceTerminationAction": "STOP", "onHostMaintenance": "TERMINATE",
        "automaticRestart": False, "maxRunDuration": {"seconds": str(MAX_RUN_S)},
    }
    assert body["labels"] == {CLUSTER_LABEL: g.config.name, "spotfan-role": "worker", "purpose": "e2e"}
    metadata = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    boot = (REPO / "cluster" / "vm" / "boot.sh").read_text()
    guard_s = int(g.config.idle_timeout + g.config.ssh.boot_timeout)
    assert metadata["startup-script"] == boot.replace("#!/bin/sh\n", (
        "#!/bin/sh\n# spotfan: stop unless `fab up` provisions this VM in time (see boot.sh)\n"
        f"SPOTFAN_UNPROVISIONED_S={guard_s}\nSPOTFAN_UNPROVISIONED_STOP='/sbin/shutdown -h now'\n"
        "export SPOTFAN_UNPROVISIONED_S SPOTFAN_UNPROVISIONED_STOP\n"), 1), "the real boot.sh, run as root"
    assert metadata["ssh-keys"] == f"root:{public_key(g.config.ssh.key)}"
    assert metadata["enable-guest-attributes"] == "TRUE"
    assert "shutdown-script" in metadata
    assert body["disks"][0]["initializeParams"]["sourceImage"] == f"projects/{PROJECT}/global/images/spotfan-worker"
    assert body["machineType"] == f"zones/{SPARE}/machineTypes/e2-standard-4"


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((address, port)) == 0


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    """A TOML document of top-level tables (enough for a cluster.toml; no writer in the stdlib)."""
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_value(v)}\n" for k, v in t.items()) + "\n"
                   for name, t in tables.items())


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(v)  # str, int, float, bool: JSON and TOML spell them alike
