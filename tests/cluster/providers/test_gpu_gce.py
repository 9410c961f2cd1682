"""GPU workers on GCE: [gce.accelerator] becomes guestAccelerators with onHostMaintenance TERMINATE,
checked against the zone's accelerator types, with zone failover when a zone has no GPU, and priced."""
from __future__ import annotations

import pytest

pytest.importorskip("google.cloud.compute_v1", reason="google-cloud-compute is not installed")

from gce_emulator import GceEmulator  # noqa: E402

from cluster.errors import ConfigError, ProvisionError, StockoutError  # noqa: E402
from cluster.providers.base import Accelerated  # noqa: E402
from cluster.providers.gce import GceSettings  # noqa: E402
from cluster.providers.gce.bodies import instance_body  # noqa: E402

from test_gce import PROJECT, ZONES, inserts, provider_for  # noqa: E402

T4 = {"type": "nvidia-tesla-t4", "count": 1}


def test_accelerator_becomes_guest_accelerators_with_terminate_on_maintenance():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        gce = provider_for(emu, machine_type="n1-standard-8", accelerator={"type": "nvidia-tesla-t4", "count": 2})
        (vm,) = gce.create(["demo-w001"])
        body = inserts(emu)[0].body
    assert vm.zone == ZONES[0]
    assert body["guestAccelerators"] == [
        {"acceleratorType": f"zones/{ZONES[0]}/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 2}]
    assert body["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert isinstance(gce, Accelerated) and gce.gpus_per_vm() == 2


def test_on_demand_gpu_worker_terminates_on_maintenance_instead_of_migrating():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        gce = provider_for(emu, provisioning="standard", max_run_duration_s=0, accelerator=T4)
        gce.create(["demo-w001"])
        sched = inserts(emu)[0].body["scheduling"]
    assert sched["onHostMaintenance"] == "TERMINATE" and sched["automaticRestart"] is True


def test_cpu_worker_has_no_accelerators():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        gce = provider_for(emu)
        gce.create(["demo-w001"])
        assert "guestAccelerators" not in inserts(emu)[0].body
        assert gce.gpus_per_vm() == 0
        assert emu.recorded("GET", r"/acceleratorTypes$") == []  # no GPU asked: nothing to check


def test_emulator_refuses_gpus_that_would_live_migrate():
    """The emulator checks what Compute Engine checks, so the tests above can fail."""
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        s = GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "spotfan-worker",
                                      "api_endpoint": emu.endpoint, "accelerator": T4})
        sent = instance_body(s, name="demo-w001", zone=ZONES[0], cluster_name="demo", boot_script="",
                             ssh_public_key="k")
        body = type(sent).to_dict(sent, preserving_proto_field_name=False)  # the JSON the client sends
        body["scheduling"]["onHostMaintenance"] = "MIGRATE"
        status, answer = emu.handle("POST", f"/compute/v1/projects/{PROJECT}/zones/{ZONES[0]}/instances", {}, body)
        assert status == 400 and "live migration" in answer["error"]["message"]
        body["scheduling"]["onHostMaintenance"] = "TERMINATE"
        body["guestAccelerators"][0]["acceleratorType"] = f"zones/{ZONES[0]}/acceleratorTypes/nvidia-h9000"
        status, answer = emu.handle("POST", f"/compute/v1/projects/{PROJECT}/zones/{ZONES[0]}/instances", {}, body)
        assert status == 400 and "does not exist in zone" in answer["error"]["message"]


def test_zone_out_of_gpus_fails_over_to_the_next_zone():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        emu.accelerator_stockout(ZONES[0])
        gce = provider_for(emu, accelerator=T4)
        created = gce.create(["demo-w001", "demo-w002"])
        tried = sorted({r.path.split("/zones/")[1].split("/")[0] for r in inserts(emu)})
    assert {i.zone for i in created} == {ZONES[1]}
    assert tried == ZONES  # it tried the first zone, and moved on


def test_every_zone_out_of_gpus_names_the_accelerator():
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        for z in ZONES:
            emu.accelerator_stockout(z)
        gce = provider_for(emu, accelerator=T4)
        with pytest.raises(StockoutError, match=r"with 1 x nvidia-tesla-t4 in any configured zone"):
            gce.create(["demo-w001"])
        assert emu.vms() == []


def test_zone_without_the_accelerator_type_is_skipped_before_any_insert():
    with GceEmulator(project=PROJECT, zones=ZONES, accelerators={ZONES[0]: ["nvidia-l4"],
                                                                 ZONES[1]: ["nvidia-tesla-t4"]}) as emu:
        gce = provider_for(emu, accelerator=T4)
        (vm,) = gce.create(["demo-w001"])
        tried = {r.path.split("/zones/")[1].split("/")[0] for r in inserts(emu)}
    assert vm.zone == ZONES[1] and tried == {ZONES[1]}


def test_no_zone_offers_the_accelerator_type():
    with GceEmulator(project=PROJECT, zones=ZONES, accelerators={ZONES[0]: ["nvidia-l4"]}) as emu:
        gce = provider_for(emu, accelerator=T4)
        with pytest.raises(ProvisionError, match=r"offers accelerator 'nvidia-tesla-t4'.*accelerator-types list"):
            gce.create(["demo-w001"])
        assert inserts(emu) == []


def test_insert_refused_for_want_of_the_accelerator_counts_as_a_stockout():
    """The zone's list can be out of date: the insert's own refusal moves on as a stockout does."""
    with GceEmulator(project=PROJECT, zones=ZONES, accelerators={ZONES[1]: ["nvidia-tesla-t4"]}) as emu:
        gce = provider_for(emu, accelerator=T4)
        with pytest.raises(StockoutError, match="accelerator not available in this zone"):
            gce.compute.insert("demo-w001", ZONES[0], gce._body("demo-w001", ZONES[0]))


@pytest.mark.parametrize("table, message", [
    ({"type": "nvidia-tesla-t4", "count": 3}, r"\[gce.accelerator\] count = 3: must be one of 1, 2, 4, 8, 16"),
    ({"count": 1}, r"\[gce.accelerator\] type is required"),
    ({"type": "nvidia-tesla-t4", "cout": 1}, r"\[gce.accelerator\] cout is not a known key; did you mean count"),
    ({"type": "NVIDIA T4"}, r"accelerator type name like \"nvidia-tesla-t4\""),
])
def test_bad_accelerator_table_is_refused_with_the_fix(table, message):
    with pytest.raises(ConfigError, match=message):
        GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "i", "accelerator": table})


def test_cost_includes_the_gpus():
    prices = {"n1-standard-8": {"standard": 0.38, "spot": 0.08}, "nvidia-tesla-t4": {"standard": 0.35, "spot": 0.14}}
    s = GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "i", "machine_type": "n1-standard-8",
                                  "accelerator": {"type": "nvidia-tesla-t4", "count": 2}, "prices": prices})
    spot = s.cost_estimate(3)
    assert spot.per_vm_hour == pytest.approx(0.08 + 2 * 0.14)
    assert spot.total_hour == pytest.approx(3 * (0.08 + 2 * 0.14))
    assert "3 x n1-standard-8 + 2 x nvidia-tesla-t4 (spot)" in spot.describe()
    del prices["nvidia-tesla-t4"]
    bare = GceSettings.from_mapping({"project": PROJECT, "zones": ZONES, "image": "i", "machine_type": "n1-standard-8",
                                     "accelerator": T4, "prices": prices}).cost_estimate(1)
    assert bare.total_hour is None
    assert "no price for nvidia-tesla-t4 in [gce.prices]" in bare.describe()
    assert "gpus-pricing" in bare.describe()


def test_billing_names_the_gpus():
    prices = {"e2-standard-4": {"standard": 0.13, "spot": 0.04}, "nvidia-tesla-t4": {"standard": 0.35, "spot": 0.14}}
    with GceEmulator(project=PROJECT, zones=ZONES) as emu:
        gce = provider_for(emu, accelerator=T4, prices=prices)
        gce.create(["demo-w001"])
        (charge,) = gce.billing(gce.list())
    assert charge.what == "1 running worker(s) (e2-standard-4 + 1 x nvidia-tesla-t4, spot)"
    assert charge.per_hour == pytest.approx(0.04 + 0.14)
