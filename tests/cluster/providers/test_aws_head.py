"""The head instance of [aws.head] against moto behind the EC2 fault proxy: its on-demand body and
user-data, its data volume created once and kept and attached again, idempotent up, `fab down --head`;
and `fab up` end to end with the head instance standing for the lab's head (aws_lab_backend)."""
from __future__ import annotations

import base64
import re

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test,aws]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from aws_lab import FAST, HEAD_PRICE, HEAD_TYPE, REGION, ZONES, aws_lab, moto_env  # noqa: E402,F401
from aws_lab_backend import per_boot_script  # noqa: E402
from ec2_fault_proxy import Ec2FaultProxy  # noqa: E402
from test_aws import KEY, TABLE, moto_url, proxy  # noqa: E402,F401

from cluster.errors import ConfigError  # noqa: E402
from cluster.providers.aws import AwsProviderWithHead  # noqa: E402
from cluster.providers.aws.api import Ec2Api  # noqa: E402
from cluster.providers.aws.settings import from_mapping  # noqa: E402
from cluster.providers.base import Status  # noqa: E402

JAIL_STEPS = "# the jail steps of `fab head-setup`\nid -u spotfan-demo || useradd spotfan-demo\n"
HEAD_PORT = 2222

_clusters = iter(range(1, 10_000))


def head_provider(tmp_path, **head: object) -> AwsProviderWithHead:
    name = f"h{next(_clusters)}"
    s = from_mapping({**TABLE, "head": {"create": True, **head}}, file="cluster.toml", cluster_name=name, spot=True)
    return AwsProviderWithHead(s, keys_dir=tmp_path, cluster_name=name, boot_script="#!/bin/sh\necho boot\n",
                               spot_notice="#!/bin/sh\n", ssh_public_key=KEY, ssh_user="admin", timing=FAST,
                               api=Ec2Api(region=s.region, profile=None, sleep=lambda s: None))


def moto_ec2():
    from moto.ec2.models import ec2_backends

    return ec2_backends["123456789012"][REGION]


def head_runs(proxy: Ec2FaultProxy) -> list:
    return [r for r in proxy.recorded("RunInstances", ok=True) if r.tags().get("spotfan-role") == "head"]


def test_the_head_is_on_demand_with_its_own_data_volume_and_the_jail_at_every_boot(tmp_path, proxy):
    p = head_provider(tmp_path)
    vm = p.create_head(jail_steps=JAIL_STEPS, port=HEAD_PORT)
    name = f"{p.cluster_name}-head"
    assert (vm.name, vm.status, vm.zone) == (name, Status.RUNNING, ZONES[0])

    (run,) = head_runs(proxy)
    q = run.params
    assert not [k for k in q if k.startswith("InstanceMarketOptions")], "the head is never spot"
    assert (q["InstanceType"], q["Placement.AvailabilityZone"], q["InstanceInitiatedShutdownBehavior"]) == \
        ("m6i.large", ZONES[0], "stop")
    assert q["MetadataOptions.HttpTokens"] == "required", "IMDSv2 only"
    assert run.tags() == {"spotfan-cluster": p.cluster_name, "spotfan-role": "head", "Name": name}
    (created,) = proxy.recorded("CreateVolume", ok=True)
    c = created.params
    assert (c["AvailabilityZone"], c["Size"], c["VolumeType"], c["Encrypted"]) == (ZONES[0], "100", "gp3", "true")
    (attach,) = proxy.recorded("AttachVolume", ok=True)
    volume_id = attach.params["VolumeId"]
    assert (attach.params["InstanceId"], attach.params["Device"]) == (run_id(p, name), "/dev/sdf")
    assert [r.action for r in proxy.requests if r.action in ("CreateVolume", "RunInstances", "AttachVolume")] == \
        ["CreateVolume", "RunInstances", "AttachVolume"], "the volume first (its id is in the user-data), " \
                                                         "attached once the head runs"

    # The user-data: at every boot, find the volume by its id, format it only if blank, mount it, jail.
    script = per_boot_script(base64.b64decode(q["UserData"]).decode())
    assert f"nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')}" in script and "/dev/sdf" in script
    assert 'blkid -p "$dev"' in script and '[ "$rc" = 2 ]' in script, "formats only a volume with no signature"
    assert script.index("mkfs.ext4") < script.index("mount /mnt/disks/spotfan-data") < script.index(JAIL_STEPS)
    assert "nofail" in script and "UUID=$uuid" in script and "PRIVATE KEY" not in script

    # What moto holds: the volume tagged and attached (kept on termination); the workers may reach the head.
    ec2 = moto_ec2()
    volume = ec2.get_volume(volume_id)
    assert (volume.zone.name, volume.size, volume.encrypted) == (ZONES[0], 100, True)
    assert {t["key"]: t["value"] for t in volume.get_tags()} == {
        "spotfan-cluster": p.cluster_name, "spotfan-role": "head-data", "Name": f"{name}-data"}
    assert volume.attachment.instance.id == run_id(p, name) and volume.status == "in-use"
    (group,) = [g for g in ec2.describe_security_groups() if g.name == f"spotfan-{p.cluster_name}"]
    rules = {(r.from_port, r.ip_range.get("CidrIp"), r.source_group.get("GroupId")) for r in group.ingress_rules}
    assert rules == {(22, "127.0.0.1/32", None), (HEAD_PORT, None, group.id)}, \
        "SSH from [aws] ssh_cidr, and the head's port from the group's own members"

    # The head is no worker: never listed, counted or deleted as one.
    (worker,) = p.create([f"{p.cluster_name}-w001"])
    assert [i.name for i in p.list()] == [worker.name] and p.head().name == name
    p.delete([worker.name, name])
    assert p.list() == [] and p.head().status is Status.RUNNING
    assert not proxy.recorded("DeleteSecurityGroup"), "the head still uses the cluster's group"
    assert p.host_keys([name]) == {name: []}


def test_up_twice_makes_one_head_and_a_stopped_head_is_started(tmp_path, proxy):
    p = head_provider(tmp_path)
    first = p.create_head(jail_steps=JAIL_STEPS, port=22)
    again = p.create_head(jail_steps=JAIL_STEPS, port=22)
    assert (len(head_runs(proxy)), len(proxy.recorded("CreateVolume")), len(proxy.recorded("AttachVolume"))) == \
        (1, 1, 1), "found by its tags, its volume found attached"
    assert again == first
    p.api.call("stop_instances", "stopping the head by hand", InstanceIds=[run_id(p, first.name)])
    assert p.head().status is Status.TERMINATED
    assert p.create_head(jail_steps=JAIL_STEPS, port=22).status is Status.RUNNING
    assert len(proxy.recorded("StartInstances", ok=True)) == 1 and len(head_runs(proxy)) == 1


def test_down_head_keeps_the_volume_and_the_next_head_gets_it_back(tmp_path, proxy):
    p = head_provider(tmp_path)
    first = p.create_head(jail_steps=JAIL_STEPS, port=22)
    volume_id = moto_ec2().get_instance(run_id(p, first.name)).block_device_mapping["/dev/sdf"].volume_id

    deleted = p.delete_head()
    assert deleted.vm == first.name and p.head() is None
    assert deleted.kept == f"its data volume {first.name}-data ({volume_id})"
    assert deleted.how_to_delete == f"aws ec2 delete-volume --volume-id {volume_id} --region {REGION}"
    assert moto_ec2().get_volume(volume_id).status == "available", "kept, detached"
    assert not proxy.recorded("DeleteVolume") and not proxy.recorded("DetachVolume")
    assert len(proxy.recorded("DeleteSecurityGroup", ok=True)) == len(proxy.recorded("DeleteKeyPair", ok=True)) == 1, \
        "nothing of the cluster is live: what spotfan made goes"
    assert p.delete_head().vm is None, "and again: nothing to do, the volume still kept"

    second = p.create_head(jail_steps=JAIL_STEPS, port=22)
    assert len(head_runs(proxy)) == 2 and len(proxy.recorded("CreateVolume")) == 1, "the kept volume, not a new one"
    assert [r.params["VolumeId"] for r in proxy.recorded("AttachVolume", ok=True)] == [volume_id, volume_id]
    assert moto_ec2().get_volume(volume_id).attachment.instance.id == run_id(p, second.name)
    assert volume_id.replace("-", "") in base64.b64decode(head_runs(proxy)[1].params["UserData"]).decode()
    p.delete_head()


def test_a_kept_volume_in_another_zone_stops_with_the_fix(tmp_path, proxy):
    p = head_provider(tmp_path)
    p.create_head(jail_steps=JAIL_STEPS, port=22)
    p.delete_head()
    moved = AwsProviderWithHead(
        from_mapping({**TABLE, "head": {"create": True, "zone": ZONES[1]}}, file="cluster.toml",
                     cluster_name=p.cluster_name, spot=True),
        keys_dir=tmp_path, cluster_name=p.cluster_name, boot_script="", spot_notice="", ssh_public_key=KEY,
        ssh_user="admin", timing=FAST)
    with pytest.raises(Exception, match=rf'holds the share and is in {ZONES[0]}.*set \[aws.head\] zone = "{ZONES[0]}"'):
        moved.create_head(jail_steps=JAIL_STEPS, port=22)
    assert len(head_runs(proxy)) == 1, "no head launched away from its data"


@pytest.mark.parametrize(("head", "message"), [
    ({"instance_type": "m6i.large"}, r"\[aws\.head\] create is required"),
    ({"create": True, "zone": "us-east-1"}, r"\[aws\.head\] zone = 'us-east-1': must be an availability zone"),
    ({"create": True, "zone": "us-east-1a", "subnet": "subnet-0123456789abcdef0"}, r"subnet and zone are both set"),
    ({"create": True, "data_volume_gb": 0}, r"\[aws\.head\] data_volume_gb = 0: must be a whole number from 1"),
    ({"create": True, "size": 10}, r"\[aws\.head\] size is not a known key"),
])
def test_head_settings_errors_name_the_key(head, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping({**TABLE, "head": head}, file="cluster.toml", cluster_name="demo", spot=True)


def test_head_settings_defaults_and_where_it_goes():
    s = from_mapping({**TABLE, "head": {"create": True}}, file="cluster.toml", cluster_name="demo", spot=True).head
    assert (s.zone, s.subnet, s.instance_type, s.data_volume_gb, s.data_volume_type, s.image, s.boot_disk_gb) == \
        (ZONES[0], None, "m6i.large", 100, "gp3", TABLE["image"], 10)
    subnets = {k: v for k, v in TABLE.items() if k != "zones"} | {"subnets": ["subnet-0123456789abcdef0"]}
    s = from_mapping({**subnets, "head": {"create": True}}, file="cluster.toml", cluster_name="demo", spot=True).head
    assert (s.zone, s.subnet) == (None, "subnet-0123456789abcdef0")
    off = from_mapping({**TABLE, "head": {"create": False}}, file="cluster.toml", cluster_name="demo", spot=True)
    assert off.head is None


# --- end to end: fab up with the head instance, down, down --head, up again ----------------


def test_fab_up_makes_the_head_instance_workers_mount_from_it_and_down_head_keeps_its_volume(aws_lab):
    a = aws_lab(workers=1, head=True)
    (worker,) = a.config.vm_names()
    head = f"{a.config.name}-head"
    address, port = a.lab.config.head.address, a.lab.config.head.port

    up = a.fab_ok("up").stdout
    assert f"==> up: head VM cost: 1 x {HEAD_TYPE} (on-demand) at {HEAD_PRICE:.4f}/h" in up, up
    assert f"==> up: head VM {head} running in {ZONES[0]} at {address}" in up, up
    assert re.search(rf"^{worker}: created in {ZONES[0]}; mount: ok \(mounted\)", up, re.M), up
    (script,) = a.backend.head_scripts
    assert "Match User " + a.config.head.user in script, "the real jail steps, at every boot"
    known = (a.config.ssh.known_hosts.parent / "head_known_hosts").read_text()
    assert a.lab.provider.head_host_keys(address, port)[0].split()[1:3] == known.split()[1:3], \
        "the head's key as its console printed it"

    assert f"1 already there" in a.fab_ok("up").stdout
    assert len([r for r in a.runs() if r.tags()["spotfan-role"] == "head"]) == 1, "one head, found by its tags"

    down = a.fab_ok("down").stdout
    assert f"kept the head VM {head} and its data disk" in down, down
    assert [i.state for i in a.backend._ours() if _tag(i, "spotfan-role") == "head"] == ["running"]

    down = a.fab_ok("down", "--head").stdout
    (volume,) = [v for v in a.backend.ec2().volumes.values() if _tag(v, "Name") == f"{head}-data"]
    assert f"deleted the head VM {head}; its data volume {head}-data ({volume.id}) is kept: " \
           f"`aws ec2 delete-volume --volume-id {volume.id} --region {REGION}`" in down, down
    assert volume.status == "available" and [i.state for i in a.backend._ours()] == ["terminated"] * 2

    a.fab_ok("up")
    assert len(a.proxy.recorded("CreateVolume", ok=True)) == 1, "the kept volume, attached to the new head"
    assert [r.params["VolumeId"] for r in a.proxy.recorded("AttachVolume", ok=True)] == [volume.id, volume.id]
    a.fab_ok("down", "--head")
    assert [i.state for i in a.backend._ours()] == ["terminated"] * 4


def run_id(p: AwsProviderWithHead, name: str) -> str:
    from cluster.providers.aws.bodies import HEAD_ROLE

    return p.ec2.list_raw(role=HEAD_ROLE)[name]["InstanceId"]


def _tag(resource, key: str) -> str | None:
    """A moto record's tag (moto's records are process-wide: other tests' are there too)."""
    return next((t["value"] for t in resource.get_tags() if t["key"] == key), None)

