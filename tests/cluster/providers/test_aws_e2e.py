"""End to end through the AWS code path: `fab` drives the real boto3 client against moto behind
the EC2 fault proxy, whose instances are lab VMs (aws_lab_backend).

The head is a lab head, and aws.toml is the lab test cluster's own with `provider = "aws"`,
so a crashed run's VMs and head are still found and killed by the lab fixture.
"""
from __future__ import annotations

import base64
import collections
import json
import re
import time

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test,aws]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from aws_lab import IMAGE, SPOT_PRICE, TYPES, ZONES, aws_lab  # noqa: E402,F401
from aws_lab_backend import per_boot_script  # noqa: E402
from labs import FIXTURES, REPO, lab_processes  # noqa: E402

from cluster import lifecycle  # noqa: E402
from cluster.records import CLUSTER_DIR  # noqa: E402
from cluster.ssh_keys import public_key  # noqa: E402

FULL, SPARE = ZONES
WORKERS = 6
WORKERS_PER_VM = 2
KEYS = 120
INTERRUPTED = 2
RUN_TIMEOUT_S = 150
RESUME_TIMEOUT_S = 30


def payload(i: int) -> str:
    return f"input {i}\n" + "spotfan " * 64 + "\n"


def test_fab_up_run_interrupt_heal_down_through_ec2(aws_lab):
    a = aws_lab(workers=WORKERS, workers_per_vm=WORKERS_PER_VM)
    names = a.config.vm_names()
    share = a.lab.share
    (share / "in").mkdir(parents=True)
    for i in range(KEYS):
        (share / "in" / f"{i:04d}.txt").write_text(payload(i))

    # --- up: the first zone has no capacity, so all 6 land in the second -------------------
    a.proxy.fail("RunInstances", "InsufficientInstanceCapacity", count=100,
                 where=lambda p: p.get("Placement.AvailabilityZone") == FULL)
    a.proxy.fail("RunInstances", "RequestLimitExceeded", count=2, status=503,
                 where=lambda p: p.get("Placement.AvailabilityZone") == SPARE)
    up = a.fab_ok("up")
    lines = up.stdout.splitlines()
    plan = lines.index(f"==> up: will create {WORKERS} ({', '.join(names)}), start 0, delete 0; 0 already there")
    cost = lines.index(f"==> up: cost: {WORKERS} x c5.large (spot) at {SPOT_PRICE:.4f}/h each = about "
                       f"{WORKERS * SPOT_PRICE:.2f} per hour (from [aws.prices]; volumes and traffic not included; "
                       f"spot prices change, see https://aws.amazon.com/ec2/spot/pricing/)")
    assert plan < cost < min(i for i, ln in enumerate(lines) if ": created" in ln)
    for n in names:
        assert re.search(rf"^{n}: created in {SPARE}; mount: ok \(mounted\); agent: ok \(started", up.stdout, re.M), up.stdout
    assert f"c5.large in {FULL} has no capacity for {WORKERS} VM(s)" in up.stderr, up.stderr
    refused = a.runs(ok=False)
    assert sorted(r.fault for r in refused) == ["InsufficientInstanceCapacity"] * WORKERS + ["RequestLimitExceeded"] * 2
    assert sorted(r.tags()["Name"] for r in refused if r.fault == "InsufficientInstanceCapacity") == names
    made = a.runs()
    assert sorted(r.tags()["Name"] for r in made) == names, "one instance per VM, throttled ones retried"
    assert {r.params["Placement.AvailabilityZone"] for r in made} == {SPARE}
    assert len({r.params["ClientToken"] for r in a.proxy.recorded("RunInstances")}) == 2 * WORKERS, \
        "a retried call keeps its token; each zone's try has its own"
    assert_run_request(a, made[0])
    assert_moto_records(a)

    # --- a second up creates nothing ------------------------------------------------------
    again = a.fab_ok("up").stdout
    assert f"==> up: will create 0, start 0, delete 0; {WORKERS} already there" in again
    assert len(a.runs()) == WORKERS

    # --- run a real task over the shared SSHFS directory ----------------------------------
    out = a.fab_ok("run", "sh lab_work.sh {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
                   "--lease", "10", "--ship", str(FIXTURES / "lab_work.sh")).stdout
    run_id = re.search(r"run (r[\w-]+) requested", out).group(1)
    outputs = share / "out"
    a.lab.wait_for("a quarter of the outputs",
                   lambda: outputs.exists() and len(list(outputs.iterdir())) >= KEYS // 4, timeout=60)

    # --- two spot interruptions (stop: a persistent request), through the backend ---------
    victims = names[1:1 + INTERRUPTED]
    for v in victims:
        assert a.backend.interrupt(v) == "stop"
        assert a.lab.provider.processes(v) == [], f"interrupting {v} kills every process of its VM"
    st = json.loads(a.fab_ok("status", "--json").stdout)
    by_name = {v["name"]: v for v in st["vms"]}
    assert {v: (by_name[v]["status"], by_name[v]["preempted"]) for v in victims} == \
        dict.fromkeys(victims, ("TERMINATED", True))
    assert all(by_name[n]["status"] == "RUNNING" for n in names if n not in victims)

    # --- heal: started again (same volume, same zone); the user-data resumes them ---------
    healed = a.fab_ok("heal").stdout
    for v in victims:
        assert f"{v}: started in {SPARE};" in healed, healed
    started = sorted(_name_of(a, r.params["InstanceId.1"]) for r in a.proxy.recorded("StartInstances", ok=True))
    assert started == victims and len(a.runs()) == WORKERS, "started again, not launched again"
    for v in victims:
        console = a.lab.provider.vm_home(v).parent / "console.log"
        a.lab.wait_for(f"{v}'s user-data to run boot.sh again",
                       lambda: re.search(r"^agent: (starting|running) \(pid", console.read_text(), re.M),
                       timeout=RESUME_TIMEOUT_S)

    # --- completion: the exact output set, every output whole -----------------------------
    done_file = share / CLUSTER_DIR / "runs" / f"{run_id}.done.json"
    a.lab.wait_for("the run to finish", done_file.exists, timeout=RUN_TIMEOUT_S)
    record = json.loads(done_file.read_text())
    assert record["result"] == "done", record
    assert sorted(p.name for p in outputs.iterdir()) == [f"{i:04d}.txt" for i in range(KEYS)]
    for i in range(KEYS):
        assert (outputs / f"{i:04d}.txt").read_text() == payload(i) * 5, f"output {i} is torn"
    starts = collections.Counter(p.name.split(".txt.")[0] for p in (share / "starts").iterdir())
    assert set(starts) == {f"{i:04d}" for i in range(KEYS)}
    assert sum(starts.values()) - KEYS <= INTERRUPTED * WORKERS_PER_VM, starts.most_common(8)
    status = a.fab_ok("status").stdout
    assert re.search(rf"run {run_id}: done: {KEYS}/{KEYS} done, 0 failed", status), status

    # --- down: no live instance, nothing spotfan made is left -----------------------------
    vm_processes = [p for n in names for p in a.lab.provider.processes(n)]
    assert vm_processes
    down = a.fab_ok("down").stdout
    assert f"deleted {WORKERS} VMs ({', '.join(names)}); none left" in down, down
    ec2 = a.backend.ec2()
    assert [i.state for i in a.backend._ours()] == ["terminated"] * WORKERS
    assert sorted(_name_of(a, r.params["InstanceId.1"]) for r in a.proxy.recorded("TerminateInstances", ok=True)) == names
    assert len(a.proxy.recorded("DeleteSecurityGroup", ok=True)) == len(a.proxy.recorded("DeleteKeyPair", ok=True)) == 1
    assert a.proxy.requests[-1].action == "DescribeInstances", "listed again to prove none is live"
    assert not [g for g in ec2.describe_security_groups() if g.name == f"spotfan-{a.config.name}"]
    assert f"spotfan-{a.config.name}" not in ec2.key_pairs
    assert not [p for p in vm_processes if p.is_running() and p.status() != "zombie"]
    assert a.lab.statuses() == {}
    with a.lab.cluster() as cluster:
        lifecycle.down(cluster)  # the lab's view: no VM to delete, and it stops the head
    assert lab_processes(a.lab.folder) == []


def _name_of(a, instance_id: str) -> str:
    return next(t["value"] for t in a.backend.instance(instance_id).get_tags() if t["key"] == "Name")


def assert_run_request(a, run) -> None:
    """What `fab up` sent for one worker, as the proxy received it."""
    p = run.params
    assert (p["ImageId"], p["InstanceType"], p["MinCount"], p["MaxCount"]) == (IMAGE, TYPES[0], "1", "1")
    assert p["InstanceMarketOptions.MarketType"] == "spot"
    assert p["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "stop"
    assert p["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "persistent"
    assert p["MetadataOptions.HttpTokens"] == "required", "IMDSv2 only"
    assert p["InstanceInitiatedShutdownBehavior"] == "stop"
    assert p["KeyName"] == f"spotfan-{a.config.name}"
    assert "IamInstanceProfile.Name" not in p and "IamInstanceProfile.Arn" not in p, "no instance profile unless asked"
    assert run.tags() == {"purpose": "e2e", "spotfan-cluster": a.config.name, "spotfan-role": "worker",
                          "Name": run.tags()["Name"]}
    assert p["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
    assert "SPOTFAN_IMDS_URL=http://127.0.0.1:9 " in base64.b64decode(p["UserData"]).decode(), "loopback only"
    shell = per_boot_script(base64.b64decode(p["UserData"]).decode())
    boot = (REPO / "cluster" / "vm" / "boot.sh").read_text()
    assert boot.split("\n", 1)[1] in _unquoted(shell), "the real boot.sh, at every boot"
    assert (REPO / "cluster" / "vm" / "spot_notice.sh").read_text().split("\n", 1)[1].strip()[:60] in \
        _unquoted(shell)


def _unquoted(shell: str) -> str:
    return shell.replace("'\"'\"'", "'")  # shlex.quote's spelling of a quote inside quotes


def assert_moto_records(a) -> None:
    """What EC2 (moto) holds: spot instances from the AMI, IMDSv2, the key, SSH only from the CIDR."""
    ec2 = a.backend.ec2()
    instances = [i for i in a.backend._ours() if i.state == "running"]
    assert len(instances) == WORKERS
    for inst in instances:
        assert (inst.lifecycle, inst.image_id, inst.instance_type) == ("spot", IMAGE, TYPES[0])
        assert inst.metadata_options.http_tokens == "required"
        assert inst.key_name == f"spotfan-{a.config.name}"
        assert inst.nics[0].public_ip.startswith("127."), "the lab VM's address, never moto's"
    (group,) = [g for g in ec2.describe_security_groups() if g.name == f"spotfan-{a.config.name}"]
    ingress = [(r.ip_protocol, r.from_port, r.to_port, r.ip_range.get("CidrIp")) for r in group.ingress_rules]
    assert ingress == [("tcp", 22, 22, "127.0.0.1/32")], "SSH only from [aws] ssh_cidr"
    assert {g.id for inst in instances for g in inst.nics[0].group_set} == {group.id}
    key = ec2.key_pairs[f"spotfan-{a.config.name}"].material_public
    assert (key.decode() if isinstance(key, bytes) else key).split()[:2] == \
        public_key(a.config.ssh.key).split()[:2], "the laptop key, imported"
