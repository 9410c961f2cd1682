"""The GCE provider, driven through the real google-cloud-compute client against the emulator."""
from __future__ import annotations

import logging
import re
import shlex
import threading
from pathlib import Path

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="google-cloud-compute is not installed")

from gce_emulator import EmulatedVm, GceEmulator, KeyOnlyBackend  # noqa: E402

from cluster.errors import ConfigError, GroupError, ProvisionError, QuotaError, StockoutError  # noqa: E402
from cluster.providers.gce import (  # noqa: E402
    CLUSTER_LABEL,
    GceProvider,
    GceProviderWithHead,
    GceSettings,
    Timing,
    estimate_hourly_cost,
)
from cluster.providers import PROVIDERS
from cluster.providers.base import Status  # noqa: E402

PROJECT = "spotfan-test"
ZONES = ["us-central1-a", "us-central1-b"]
BOOT_SCRIPT = "#!/bin/sh\necho booting spotfan worker\n"
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOr6xRY2AqAybz2Jq+m7AKXeBtkJZHWAyXDAQlvJ6Mhu laptop"
FAST = Timing(
    api_timeout_s=10, operation_timeout_s=5, boot_timeout_s=5, stopping_timeout_s=5,
    host_key_timeout_s=3, poll_interval_s=0.05, max_polls=500,
)  # fmt: skip


@pytest.fixture
def emulator():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        yield emu


def provider_for(emu: GceEmulator, *, cluster: str = "demo", timing: Timing = FAST, **gce: object) -> GceProvider:
    table = {"project": PROJECT, "zones": list(ZONES), "image": "spotfan-worker", "api_endpoint": emu.endpoint, **gce}
    return GceProvider(
        GceSettings.from_mapping(table), cluster_name=cluster, boot_script=BOOT_SCRIPT, ssh_public_key=SSH_KEY, timing=timing
    )


def inserts(emu: GceEmulator) -> list:
    return emu.recorded("POST", r"/zones/[^/]+/instances$")


# --- what the API receives ---------------------------------------------------------------


def test_create_sends_spot_vms_with_labels_metadata_image_and_max_run(emulator):
    gce = provider_for(emulator, max_run_duration_s=3600, labels={"team": "vision"}, ssh_user="root")
    created = gce.create(["demo-w001", "demo-w002"])

    assert [(i.name, i.status, i.zone) for i in created] == [
        ("demo-w001", Status.RUNNING, "us-central1-a"),
        ("demo-w002", Status.RUNNING, "us-central1-a"),
    ]
    assert all(i.address.startswith("203.0.113.") and i.port == 22 for i in created)
    sent = {r.body["name"]: r.body for r in inserts(emulator)}
    assert sorted(sent) == ["demo-w001", "demo-w002"]
    body = sent["demo-w001"]
    assert body["scheduling"] == {
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "STOP",
        "onHostMaintenance": "TERMINATE",
        "automaticRestart": False,
        "maxRunDuration": {"seconds": "3600"},
    }
    assert body["labels"] == {CLUSTER_LABEL: "demo", "spotfan-role": "worker", "team": "vision"}
    metadata = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert metadata["startup-script"] == BOOT_SCRIPT  # as root, the boot script itself
    assert "$md/preempted" in metadata["shutdown-script"]  # reads instance/preempted
    assert metadata["enable-guest-attributes"] == "TRUE"
    assert metadata["ssh-keys"] == f"root:{SSH_KEY}"
    (disk,) = body["disks"]
    assert disk["boot"] and disk["autoDelete"]
    assert disk["initializeParams"]["sourceImage"] == f"projects/{PROJECT}/global/images/spotfan-worker"
    assert body["machineType"] == "zones/us-central1-a/machineTypes/e2-standard-4"
    assert body["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
    assert "serviceAccounts" not in body  # workers get no Google credentials unless asked


@pytest.mark.parametrize(
    ("options", "scheduling"),
    [
        ({"termination_action": "DELETE", "max_run_duration_s": 0},
         {"provisioningModel": "SPOT", "instanceTerminationAction": "DELETE",
          "onHostMaintenance": "TERMINATE", "automaticRestart": False}),
        ({"provisioning": "preemptible", "max_run_duration_s": 0},
         {"preemptible": True, "onHostMaintenance": "TERMINATE", "automaticRestart": False}),
        ({"provisioning": "standard", "max_run_duration_s": 0},
         {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True}),
    ],
    ids=["spot-delete", "preemptible", "on-demand"],
)  # fmt: skip
def test_other_provisioning_models(emulator, options, scheduling):
    provider_for(emulator, **options).create(["demo-w001"])
    assert inserts(emulator)[0].body["scheduling"] == scheduling


def test_repeated_create_inserts_only_the_missing_vms(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001", "demo-w002"])
    assert len(inserts(emulator)) == 2

    again = gce.create(["demo-w001", "demo-w002", "demo-w003"])
    assert [r.body["name"] for r in inserts(emulator)][2:] == ["demo-w003"]
    assert [i.name for i in again] == ["demo-w001", "demo-w002", "demo-w003"]

    gce.create(["demo-w001", "demo-w002", "demo-w003"])
    assert len(inserts(emulator)) == 3
    # Existing VMs are found by label, across zones, in one call.
    assert emulator.recorded("GET", r"/aggregated/instances$")[0].query["filter"] == f'labels.{CLUSTER_LABEL} = "demo"'


def test_other_clusters_are_neither_listed_nor_deleted(emulator):
    provider_for(emulator, cluster="other").create(["other-w001"])
    gce = provider_for(emulator)
    gce.create(["demo-w001"])
    assert [i.name for i in gce.list()] == ["demo-w001"]
    gce.delete(["demo-w001", "other-w001"])
    assert [vm.name for vm in emulator.vms()] == ["other-w001"]


def test_a_name_taken_by_another_cluster_is_an_error(emulator):
    provider_for(emulator, cluster="other").create(["demo-w001"])
    with pytest.raises(ProvisionError, match="not part of cluster demo"):
        provider_for(emulator).create(["demo-w001"])


# --- zones, stockouts, quotas --------------------------------------------------------------


@pytest.mark.parametrize("style", ["operation", "http503"])
@pytest.mark.parametrize("http_fields", [True, False], ids=["with-http-fields", "errors-only"])
def test_stockout_in_first_zone_lands_vms_in_the_second(emulator, style, http_fields, caplog):
    caplog.set_level(logging.INFO, logger="cluster.providers.gce")
    emulator.stockout("us-central1-a", style=style)
    emulator.http_error_fields = http_fields  # without them result() would not even raise
    created = provider_for(emulator).create(["demo-w001", "demo-w002", "demo-w003"])

    assert {i.name: i.zone for i in created} == dict.fromkeys(["demo-w001", "demo-w002", "demo-w003"], "us-central1-b")
    tried = [r.path.split("/")[6] for r in inserts(emulator)]
    assert tried == ["us-central1-a"] * 3 + ["us-central1-b"] * 3
    assert {vm.zone for vm in emulator.vms()} == {"us-central1-b"}
    assert "us-central1-a has no capacity" in caplog.text
    assert "3 VM(s) landed in us-central1-b" in caplog.text


def test_stockout_everywhere_names_the_zones(emulator):
    for zone in ZONES:
        emulator.stockout(zone)
    with pytest.raises(StockoutError, match="us-central1-a, us-central1-b") as err:
        provider_for(emulator).create(["demo-w001"])
    assert "add zones" in str(err.value)
    assert emulator.vms() == []


def test_quota_error_stops_and_names_the_quota(emulator):
    emulator.quota(max_vms=2, name="CPUS")
    with pytest.raises(QuotaError) as err:
        provider_for(emulator).create(["demo-w001", "demo-w002", "demo-w003"])
    message = str(err.value)
    assert "quota CPUS exceeded" in message and "iam-admin/quotas" in message
    # Inserts run concurrently, so which of the three missed out is up to the race.
    assert re.search(r"not created: demo-w00\d; created: demo-w00\d, demo-w00\d\)", message)
    assert len(emulator.vms()) == 2
    # A quota is per region or project: no other zone was tried.
    assert all("/us-central1-a/" in r.path for r in inserts(emulator))


def test_operations_are_polled_with_our_own_client(emulator):
    emulator.operations_done_on_wait = True  # the real API's shape: RUNNING until waited on
    provider_for(emulator).create(["demo-w001"])
    assert len(emulator.recorded("POST", r"/zones/us-central1-a/operations/[^/]+/wait$")) == 1


# --- preemption and heal -------------------------------------------------------------------


def test_start_restarts_preempted_vms_only(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001", "demo-w002"])
    emulator.preempt("demo-w001")

    listed = {i.name: i for i in gce.list()}
    assert (listed["demo-w001"].status, listed["demo-w001"].preempted) == (Status.TERMINATED, True)
    assert (listed["demo-w002"].status, listed["demo-w002"].preempted) == (Status.RUNNING, False)

    started = gce.start(["demo-w001", "demo-w002"])
    assert [i.status for i in started] == [Status.RUNNING, Status.RUNNING]
    assert [r.path.rsplit("/", 2)[-2] for r in emulator.recorded("POST", r"/start$")] == ["demo-w001"]
    assert not any(i.preempted for i in gce.list())  # restarted since the preemption
    assert len(inserts(emulator)) == 2  # started, not recreated


def test_start_waits_for_a_stopping_vm(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001"])
    emulator.preempt("demo-w001", stopping_s=0.3)
    assert gce.list()[0].status is Status.STOPPING
    assert gce.start(["demo-w001"])[0].status is Status.RUNNING


def test_start_recreates_vms_that_are_gone(emulator):
    gce = provider_for(emulator, termination_action="DELETE")
    gce.create(["demo-w001", "demo-w002"])
    emulator.preempt("demo-w002")  # a DELETE-action spot VM vanishes
    assert [i.name for i in gce.list()] == ["demo-w001"]

    started = gce.start(["demo-w001", "demo-w002"])
    assert [(i.name, i.status) for i in started] == [("demo-w001", Status.RUNNING), ("demo-w002", Status.RUNNING)]
    names = [r.body["name"] for r in inserts(emulator)]
    assert sorted(names[:2]) == ["demo-w001", "demo-w002"] and names[2:] == ["demo-w002"]


def test_start_moves_a_vm_whose_zone_is_full(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001"])
    emulator.preempt("demo-w001")
    emulator.stockout("us-central1-a")
    (started,) = gce.start(["demo-w001"])
    assert (started.status, started.zone) == (Status.RUNNING, "us-central1-b")
    assert len(emulator.recorded("DELETE", r"/us-central1-a/instances/demo-w001$")) == 1


# --- delete ------------------------------------------------------------------------------


def test_delete_across_zones_tolerates_404_and_proves_nothing_is_left(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001"])
    emulator.stockout("us-central1-a")
    gce.create(["demo-w001", "demo-w002"])
    assert {vm.name: vm.zone for vm in emulator.vms()} == {"demo-w001": "us-central1-a", "demo-w002": "us-central1-b"}
    emulator.vanish_before_delete("demo-w002")  # someone else deleted it first: 404

    gce.delete(["demo-w001", "demo-w002", "demo-w009"])

    assert emulator.vms() == []
    deleted = {r.path.split("/")[6] for r in emulator.recorded("DELETE", r"/instances/")}
    assert deleted == {"us-central1-a", "us-central1-b"}
    assert emulator.requests[-1].path.endswith("/aggregated/instances")  # listed again at the end
    assert gce.list() == []
    gce.delete(["demo-w001"])  # and again: nothing to do, no error


# --- host keys ---------------------------------------------------------------------------


def test_host_keys_are_retried_through_a_slow_boot():
    with GceEmulator(project=PROJECT, zones=ZONES, provisioning_s=0.3, staging_s=0.3, host_key_delay_s=0.4) as emu:
        gce = provider_for(emu)
        (instance,) = gce.create(["demo-w001"])
        assert instance.status is Status.RUNNING
        keys = gce.host_keys(["demo-w001"])

        ((key_type, key),) = emu.vm("demo-w001").host_keys.items()
        assert keys == {"demo-w001": [f"{instance.address} {key_type} {key}"]}
        assert key_type == "ssh-ed25519"
        tries = emu.recorded("GET", r"/instances/demo-w001/getGuestAttributes$")
        assert len(tries) > 1 and all(t.query == {"queryPath": "hostkeys/"} for t in tries)
        assert len(emu.recorded("GET", r"/aggregated/instances$")) > 2  # waited through PROVISIONING/STAGING


class SilentBackend(KeyOnlyBackend):
    """VMs whose guest agent never publishes host keys (or publishes garbage)."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        super().__init__()
        self.keys = keys

    def on_insert(self, vm: EmulatedVm) -> None:
        vm.publish(address="203.0.113.50", host_keys=self.keys)


def test_host_keys_that_never_come_name_the_guest_agent():
    with GceEmulator(project=PROJECT, zones=ZONES, backend=SilentBackend()) as emu:
        gce = provider_for(emu, timing=Timing(**{**FAST.__dict__, "host_key_timeout_s": 0.3}))
        gce.create(["demo-w001"])
        with pytest.raises(GroupError, match="google-guest-agent") as err:
            gce.host_keys(["demo-w001"])
        assert set(err.value.failed) == {"demo-w001"}


def test_malformed_host_keys_are_refused():
    evil = {"ssh-ed25519": "AAAA\n* ssh-ed25519 AAAAevil"}
    with GceEmulator(project=PROJECT, zones=ZONES, backend=SilentBackend(evil)) as emu:
        gce = provider_for(emu)
        gce.create(["demo-w001"])
        with pytest.raises(GroupError, match="malformed host key"):
            gce.host_keys(["demo-w001"])


def test_host_keys_of_stopped_or_missing_vms_are_empty_at_once(emulator):
    gce = provider_for(emulator)
    gce.create(["demo-w001", "demo-w002"])
    emulator.preempt("demo-w001")
    keys = gce.host_keys(["demo-w001", "demo-w002", "demo-w003"])
    assert keys["demo-w001"] == [] and keys["demo-w003"] == []
    assert len(keys["demo-w002"]) == 1
    assert not emulator.recorded("GET", r"/demo-w001/getGuestAttributes$")


def test_startup_script_runs_the_boot_script_as_the_ssh_user(emulator):
    provider_for(emulator, ssh_user="data-sci").create(["demo-w001"])
    metadata = {i["key"]: i["value"] for i in inserts(emulator)[0].body["metadata"]["items"]}
    script = metadata["startup-script"]
    assert "exec runuser -u data-sci -- env SPOTFAN_HOME=/var/lib/spotfan sh -c " in script
    assert shlex.quote(BOOT_SCRIPT) in script
    assert metadata["ssh-keys"] == f"data-sci:{SSH_KEY}"


# --- errors that name the fix ------------------------------------------------------------


def test_unknown_image(emulator):
    with pytest.raises(ProvisionError, match=r"boot image does not exist.*gcloud compute images list"):
        provider_for(emulator, image="no-such-image").create(["demo-w001"])


def test_unknown_zone(emulator):
    with pytest.raises(ProvisionError, match=r"Unknown zone.*gcloud compute zones list") as err:
        provider_for(emulator, zones=["us-central1-z"]).create(["demo-w001"])
    assert "us-central1-z" in str(err.value)


def test_api_not_enabled(emulator):
    emulator.api_disabled = True
    with pytest.raises(ProvisionError, match=f"gcloud services enable compute.googleapis.com --project {PROJECT}"):
        provider_for(emulator).list()


def test_missing_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    settings = GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "img"})
    gce = GceProvider(settings, cluster_name="demo", boot_script=BOOT_SCRIPT, ssh_public_key=SSH_KEY)
    with pytest.raises(ProvisionError, match="gcloud auth application-default login.*GOOGLE_APPLICATION_CREDENTIALS"):
        gce.list()


def test_constructor_does_no_io():
    calls = []
    settings = GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "img"})
    gce = GceProvider(
        settings, cluster_name="demo", boot_script=Path("/nonexistent/boot.sh"),
        ssh_public_key=Path("/nonexistent/key.pub"), client_factory=lambda s: calls.append(s),
    )  # fmt: skip
    assert calls == [] and gce.cost_estimate(2).workers == 2


# --- settings and cost ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"zones": ZONES, "image": "i"}, r"\[gce\] project is required"),
        ({"project": "p", "zones": ["us-central1"], "image": "i"}, r"\[gce\] zones = \['us-central1'\]: must be .*us-central1-a"),
        ({"project": "p", "zones": ZONES, "image": "i", "zone": "x"}, r"\[gce\] zone is not a known key; did you mean zones\?"),
        ({"project": "p", "zones": ZONES, "image": "i", "provisioning": "cheap"}, "must be one of 'spot', 'preemptible', 'standard'"),
        ({"project": "p", "zones": ZONES, "image": "i", "termination_action": "KEEP"}, "must be one of 'STOP', 'DELETE'"),
        ({"project": "p", "zones": ZONES, "image": "i", "max_run_duration_s": "1h"}, r"max_run_duration_s = '1h': must be a whole number"),
        ({"project": "p", "zones": ZONES, "image": "i", "provisioning": "preemptible"}, "not available"),
        ({"project": "p", "zones": ZONES, "image": "i", "labels": {"Team": "x"}}, "not a valid GCE label"),
        ({"project": "p", "zones": ZONES, "image": "i", "prices": {"e2-standard-4": 0.1}}, r"\[gce.prices\] e2-standard-4 = 0.1: must be a table"),
        ({"project": "p", "zones": ZONES, "image": "i", "api_endpoint": "localhost:8080"}, "http://"),
    ],
)  # fmt: skip
def test_settings_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        GceSettings.from_mapping(table)


def test_cost_estimate():
    settings = GceSettings.from_mapping({
        "project": "p", "zones": ZONES, "image": "i", "machine_type": "n2-standard-8",
        "prices": {"n2-standard-8": {"standard": 0.3885, "spot": 0.0944}},
    })  # fmt: skip
    spot = settings.cost_estimate(8)
    assert spot.per_vm_hour == pytest.approx(0.0944) and spot.total_hour == pytest.approx(0.7552)
    assert "8 x n2-standard-8 (spot)" in spot.describe() and "0.76 per hour" in spot.describe()
    on_demand = estimate_hourly_cost(
        settings.prices, machine_type="n2-standard-8", workers=2, provisioning="standard"
    )
    assert on_demand.total_hour == pytest.approx(0.777)
    unknown = GceSettings.from_mapping({"project": "p", "zones": ZONES, "image": "i"}).cost_estimate(3)
    assert unknown.total_hour is None and "no price for e2-standard-4" in unknown.describe()


def test_registered_and_built_from_cluster_toml(tmp_path):
    from cluster import config as cluster_config

    key = tmp_path / "keys" / "laptop"
    (tmp_path / "cluster.toml").write_text(
        f"""
[cluster]
name = "demo"
provider = "gce"
zones = ["us-central1-b"]
image = "spotfan-worker"
spot = true
[head]
address = "10.0.0.2"
share = "share"
[ssh]
user = "spotfan"
key = "{key}"
[gce]
project = "{PROJECT}"
max_run_duration_s = 7200
"""
    )
    config = cluster_config.load(tmp_path / "cluster.toml")
    gce = PROVIDERS["gce"].make(config)
    assert isinstance(gce, GceProvider)
    s = gce.settings
    assert (s.project, s.zones, s.image, s.provisioning, s.ssh_user) == (
        PROJECT, ("us-central1-b",), "spotfan-worker", "spot", "spotfan"
    )  # fmt: skip
    assert s.max_run_duration_s == 7200


def test_emulator_threads_stop_on_shutdown():
    before = set(threading.enumerate())
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        provider_for(emu).create(["demo-w001"])
    assert set(threading.enumerate()) - before == set()


# --- the optional head VM ([gce.head]) -----------------------------------------------------

HEAD_IMAGE = "projects/debian-cloud/global/images/family/debian-12"


@pytest.fixture
def head_emulator():
    with GceEmulator(project=PROJECT, zones=ZONES, images=("spotfan-worker", HEAD_IMAGE)) as emu:
        yield emu


def head_config(tmp_path: Path, emu: GceEmulator, *, head: str = "create = true", share: str = "/mnt/disks/spotfan-data/share"):
    """A GCE cluster.toml with a [gce.head] table, its keys made, parsed."""
    from cluster import config as cluster_config
    from cluster import lifecycle
    from cluster.session import Cluster

    (tmp_path / "cluster.toml").write_text(
        f"""
[cluster]
name = "demo"
provider = "gce"
zones = {ZONES!r}
image = "spotfan-worker"
[head]
address = "set-by-fab-up"
share = "{share}"
[ssh]
user = "spotfan"
key = "{tmp_path / 'keys' / 'laptop'}"
[gce]
project = "{PROJECT}"
api_endpoint = "{emu.endpoint}"
[gce.head]
{head}
"""
    )
    config = cluster_config.load(tmp_path / "cluster.toml")
    with Cluster(config) as cluster:
        lifecycle.ensure_keys(cluster)
    return config


def head_provider(config) -> GceProviderWithHead:
    gce = PROVIDERS["gce"].make(config)
    assert isinstance(gce, GceProviderWithHead), "[gce.head] create = true makes the provider of the head VM"
    gce.timing = FAST
    return gce


def test_head_vm_is_standard_with_a_data_disk_that_outlives_it_and_builds_the_jail(tmp_path, head_emulator):
    from cluster import jail, lifecycle
    from cluster.session import Cluster
    from cluster.ssh_keys import public_key, read_known_hosts

    config = head_config(tmp_path, head_emulator)
    gce = head_provider(config)
    with Cluster(config, provider=gce) as cluster:
        lifecycle.up_head(cluster, workers=64)  # what `fab up --count 64` does first
        cfg = cluster.config
    vm = gce.head()
    assert vm is not None
    # every later command finds the head VM without cluster.toml being edited
    with Cluster(config, provider=head_provider(config)) as later:
        assert (later.config.head.address, later.config.head.host_keys) == (vm.address, cfg.head.host_keys)
        assert later.config.head.address != config.head.address

    ((sent,),) = [[r.body for r in inserts(head_emulator)]]
    assert sent["name"] == "demo-head" and vm.name == "demo-head"
    assert sent["scheduling"] == {"provisioningModel": "STANDARD", "onHostMaintenance": "MIGRATE", "automaticRestart": True}
    assert sent["machineType"] == "zones/us-central1-a/machineTypes/e2-standard-2"
    assert sent["labels"] == {CLUSTER_LABEL: "demo", "spotfan-role": "head"}
    boot, data = sent["disks"]
    assert boot["boot"] and boot["autoDelete"] and boot["initializeParams"]["sourceImage"] == HEAD_IMAGE
    assert (data.get("boot", False), data["autoDelete"], data["deviceName"]) == (False, False, "spotfan-data")
    assert data["initializeParams"] == {
        "diskName": "demo-head-data", "diskSizeGb": "100", "diskType": "zones/us-central1-a/diskTypes/pd-balanced",
    }  # fmt: skip
    metadata = {i["key"]: i["value"] for i in sent["metadata"]["items"]}
    assert metadata["enable-guest-attributes"] == "TRUE"
    assert metadata["ssh-keys"] == f"spotfan:{public_key(config.ssh.key)}"
    assert "shutdown-script" not in metadata  # the head is never preempted
    script = metadata["startup-script"]
    block = jail.match_block(user="spotfan-demo", jail="/srv/spotfan/demo", authorized_keys_file=f"{jail.KEYS_DIR}/%u.keys")
    assert block in script and script.count("Match User spotfan-demo") == 2  # the grep guard, and the block once
    assert 'blkid -p "$dev"' in script and '[ "$rc" = 2 ]' in script  # formats only a blank disk
    assert script.index("mkfs.ext4") < script.index("mount /mnt/disks/spotfan-data") < script.index("useradd")
    assert "nofail" in script and "UUID=$uuid" in script
    for line in jail.authorized_keys(config):
        assert line in script
    assert "PRIVATE KEY" not in script and config.ssh.worker_key.read_text() not in script
    assert "sshd -t && systemctl reload ssh" in script
    # sized at its creation for the fleet of that `fab up`, before the reload, checked after it
    assert "MaxStartups 138:30:276\nPerSourceMaxStartups none\n" in script
    assert script.index("00-spotfan-fleet.conf") < script.index("sshd -t && systemctl reload ssh") < script.rindex(
        '[ "${have:-10}" -ge 138 ]')

    # fab up points the workers at the head's internal address, verified by its published key.
    emu_vm = head_emulator.vm("demo-head")
    assert vm.address == cfg.head.address == emu_vm.internal_address
    ((key_type, key),) = emu_vm.host_keys.items()
    assert read_known_hosts(cfg.head.host_keys) == {cfg.head.address: [f"{cfg.head.address} {key_type} {key}"]}


def test_head_vm_is_created_once_and_never_counted_as_a_worker(tmp_path, head_emulator):
    config = head_config(tmp_path, head_emulator)
    gce = head_provider(config)
    assert gce.head() is None and gce.saved_head() is None
    first = gce.create_head(jail_steps="true\n")
    gce.create(["demo-w001", "demo-w002"])
    again = gce.up_head(jail_steps="true\n", port=config.head.port)
    assert [r.body["name"] for r in inserts(head_emulator)].count("demo-head") == 1
    assert again.address == first.address and gce.saved_head() == again

    assert [i.name for i in gce.list()] == ["demo-w001", "demo-w002"]
    assert gce.head().name == "demo-head"
    gce.delete(["demo-w001", "demo-w002", "demo-head"])  # a worker path never touches the head
    assert [vm.name for vm in head_emulator.vms()] == ["demo-head"]
    assert gce.list() == [] and gce.host_keys(["demo-head"]) == {"demo-head": []}

    head_emulator.preempt("demo-head")  # stopped (e.g. by hand): create_head starts it again
    assert gce.create_head(jail_steps="true\n").status is Status.RUNNING
    assert len(head_emulator.recorded("POST", r"/instances/demo-head/start$")) == 1


def test_fab_down_keeps_the_head_and_down_head_keeps_its_data_disk(tmp_path, head_emulator):
    import os
    import subprocess

    from labs import FAB, REPO

    config = head_config(tmp_path, head_emulator)
    gce = head_provider(config)
    gce.create_head(jail_steps="true\n")
    gce.create(["demo-w001"])
    env = {**os.environ, "SPOTFAN_CONFIG": str(config.path)}

    def fab(*args: str) -> str:
        r = subprocess.run([str(FAB), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    out = fab("down")
    assert "deleted 1 VMs (demo-w001)" in out and "kept the head VM demo-head and its data disk" in out
    assert [vm.name for vm in head_emulator.vms()] == ["demo-head"]

    out = fab("down", "--head")
    assert "deleted the head VM demo-head; its data disk demo-head-data is kept" in out
    assert f"gcloud compute disks delete demo-head-data --zone us-central1-a --project {PROJECT}" in out
    assert head_emulator.vms() == [] and head_emulator.disks() == ["demo-head-data"]
    assert not [r for r in head_emulator.requests if r.method == "DELETE" and "/disks" in r.path]
    assert gce.delete_head().vm is None  # and again: nothing to do, the disk still kept
    assert gce.delete_head().kept == "its data disk demo-head-data"

    # The next head VM gets the kept data disk back, attached, not created anew.
    gce.create_head(jail_steps="true\n")
    *_, data = [r.body for r in inserts(head_emulator) if r.body["name"] == "demo-head"][-1]["disks"]
    assert data == {"source": "zones/us-central1-a/disks/demo-head-data", "autoDelete": False, "boot": False,
                    "deviceName": "spotfan-data", "type": "PERSISTENT"}
    assert head_emulator.disks() == ["demo-head-data"]


def test_without_a_head_table_the_head_is_an_existing_host():
    settings = GceSettings.from_mapping({"project": "p", "zones": ZONES, "image": "i"})
    assert settings.head is None and settings.head_cost_estimate() is None
    off = GceSettings.from_mapping({"project": "p", "zones": ZONES, "image": "i", "head": {"create": False}})
    assert off.head is None


def test_head_settings_defaults_and_cost():
    settings = GceSettings.from_mapping({
        "project": "p", "zones": ZONES, "image": "i", "head": {"create": True},
        "prices": {"e2-standard-2": {"standard": 0.067, "spot": 0.02}},
    })  # fmt: skip
    h = settings.head
    assert (h.zone, h.machine_type, h.data_disk_gb, h.data_disk_type, h.image) == (
        "us-central1-a", "e2-standard-2", 100, "pd-balanced", HEAD_IMAGE
    )  # fmt: skip
    assert "1 x e2-standard-2 (standard) at 0.0670/h" in settings.head_cost_estimate().describe()


@pytest.mark.parametrize(
    ("head", "message"),
    [
        ({"machine_type": "e2-small"}, r"\[gce\.head\] create is required"),
        ({"create": "yes"}, r"\[gce\.head\] create = 'yes': must be true or false"),
        ({"create": True, "size": 10}, r"\[gce\.head\] size is not a known key"),
        ({"create": True, "zone": "us-central1"}, r"\[gce\.head\] zone = 'us-central1': must be a zone name"),
        ({"create": True, "data_disk_gb": 5}, r"\[gce\.head\] data_disk_gb = 5: must be a whole number from 10"),
        ({"create": True, "data_disk_gb": "100"}, r"\[gce\.head\] data_disk_gb = '100': must be a whole number"),
    ],
)  # fmt: skip
def test_head_settings_errors_name_the_key(head, message):
    with pytest.raises(ConfigError, match=message):
        GceSettings.from_mapping({"project": "p", "zones": ZONES, "image": "i", "head": head})


def test_head_vm_share_must_be_on_its_data_disk(tmp_path, head_emulator):
    with pytest.raises(ConfigError, match=r'\[head\] share = .*set head\.share = "/mnt/disks/spotfan-data/share"'):
        head_provider(head_config(tmp_path, head_emulator, share="/srv/data/demo"))
