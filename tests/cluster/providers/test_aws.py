"""The AWS provider against moto behind the EC2 fault proxy: [aws] validation, failover across zones
then types, throttling, the errors that stop, host keys only from the console, and the spot notice watch."""
from __future__ import annotations

import http.server
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test,aws]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from aws_lab import FAST, IMAGE, REGION, TYPES, ZONES, aws_lab, moto_env  # noqa: E402,F401
from ec2_fault_proxy import Ec2FaultProxy  # noqa: E402

from cluster.config import parse  # noqa: E402
from cluster.errors import ConfigError, GroupError, ProvisionError, QuotaError, StockoutError  # noqa: E402
from cluster.providers.aws import AwsProvider  # noqa: E402
from cluster.providers.aws.api import THROTTLE_ATTEMPTS, Ec2Api  # noqa: E402
from cluster.providers.aws.settings import from_mapping  # noqa: E402
from cluster.providers.base import Status  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb8tZbJq1vRJ3m0nq2mXl0pQ2n8b9Yk0xkJ8f7rGq3T laptop"
TABLE = {"region": REGION, "image": IMAGE, "instance_types": TYPES, "zones": ZONES, "ssh_cidr": "127.0.0.1/32"}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def proxy(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ec2FaultProxy]:
    with Ec2FaultProxy(upstream=moto_url) as p:
        for k, v in moto_env(p.endpoint).items():
            monkeypatch.setenv(k, v)
        yield p


_clusters = iter(range(1, 10_000))


def provider(**table: object) -> AwsProvider:
    name = f"c{next(_clusters)}"
    s = from_mapping({**TABLE, **table}, file="cluster.toml", cluster_name=name, spot=True)
    return AwsProvider(s, cluster_name=name, boot_script="#!/bin/sh\necho boot\n", spot_notice="#!/bin/sh\n",
                       ssh_public_key=KEY, ssh_user="admin", timing=FAST,
                       api=Ec2Api(region=s.region, profile=None, sleep=lambda s: None))


# --- [aws] in cluster.toml ---------------------------------------------------------------


def load_text(tmp_path: Path, aws: str, cluster: str = "") -> object:
    text = (f'[cluster]\nname = "demo"\nprovider = "aws"\n{cluster}\n[head]\naddress = "203.0.113.5"\n'
            f'share = "/srv/share"\n\n[aws]\n{aws}\n')
    import tomllib

    return parse(tomllib.loads(text), path=tmp_path / "cluster.toml")


def test_aws_table_is_checked_with_every_problem_and_its_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, 'image = "ubuntu"\ninstance_types = []\nssh_cidr = "203.0.113.7/24"\nzonez = ["x"]')
    text = str(e.value)
    assert "[aws] image = 'ubuntu': must be an AMI id" in text
    assert "[aws] instance_types = []: must be a non-empty list of instance types" in text
    assert "[aws] ssh_cidr = '203.0.113.7/24': must be a network like \"203.0.113.7/32\"" in text
    assert "[aws] zonez is not a known key; did you mean zones?" in text
    with pytest.raises(ConfigError, match=r"\[aws\] ssh_cidr is required"):
        load_text(tmp_path, f'image = "{IMAGE}"\ninstance_types = ["c5.large"]')
    with pytest.raises(ConfigError, match=r'a persistent spot request launches a new instance'):
        load_text(tmp_path, f'image = "{IMAGE}"\ninstance_types = ["c5.large"]\nssh_cidr = "203.0.113.7/32"',
                  cluster='idle_action = "delete"')
    with pytest.raises(ConfigError, match=r'"aws" needs an \[aws\] table'):
        import tomllib

        parse(tomllib.loads('[cluster]\nname = "demo"\nprovider = "aws"\n[head]\naddress = "h"\nshare = "/s"\n'),
              path=tmp_path / "cluster.toml")


def test_aws_settings_take_cluster_defaults_and_name_what_spotfan_makes(tmp_path):
    c = load_text(tmp_path, 'instance_types = ["c5.large"]\nssh_cidr = "203.0.113.7/32"\ninterruption = "terminate"',
                  cluster=f'image = "{IMAGE}"\nzones = ["us-east-1a"]\nidle_action = "delete"')
    s = c.settings
    assert (s.image, s.zones, s.security_group, s.key_pair) == (IMAGE, ("us-east-1a",), "spotfan-demo", "spotfan-demo")
    assert (s.interruption, s.spot, s.imds_url) == ("terminate", True, "http://169.254.169.254")


# --- launching: failover, throttling, the errors that stop --------------------------------


def test_a_vm_tries_every_zone_of_a_type_before_the_next_type(proxy):
    p = provider()
    proxy.fail("RunInstances", "InsufficientInstanceCapacity", count=100,
               where=lambda q: q["InstanceType"] == TYPES[0])
    (vm,) = p.create([f"{p.cluster_name}-w001"])
    tried = [(r.params["InstanceType"], r.params["Placement.AvailabilityZone"], r.fault)
             for r in proxy.recorded("RunInstances")]
    assert tried == [(TYPES[0], ZONES[0], "InsufficientInstanceCapacity"),
                     (TYPES[0], ZONES[1], "InsufficientInstanceCapacity"), (TYPES[1], ZONES[0], None)]
    assert (vm.status, vm.zone) == (Status.RUNNING, ZONES[0])
    p.create([vm.name])
    assert len(proxy.recorded("RunInstances", ok=True)) == 1, "found by its tags: nothing launched twice"
    p.delete([vm.name])
    assert p.list() == []


def test_throttling_is_retried_a_bounded_number_of_times(proxy):
    p = provider()
    proxy.fail("DescribeInstances", "RequestLimitExceeded", count=THROTTLE_ATTEMPTS - 1, status=503)
    assert p.list() == []
    proxy.fail("DescribeInstances", "RequestLimitExceeded", count=THROTTLE_ATTEMPTS, status=503)
    with pytest.raises(ProvisionError, match=rf"still throttled after {THROTTLE_ATTEMPTS} tries"):
        p.list()
    assert len(proxy.recorded("DescribeInstances")) == 2 * THROTTLE_ATTEMPTS, "5 throttled + 1, then 6 throttled: no more"


def test_quota_and_permission_errors_stop_with_the_fix(proxy):
    p = provider()
    proxy.fail("RunInstances", "VcpuLimitExceeded", count=1, status=400)
    with pytest.raises(QuotaError, match=r"VcpuLimitExceeded.*servicequotas.*not launched: c\d+-w001"):
        p.create([f"{p.cluster_name}-w001"])
    assert len(proxy.recorded("RunInstances")) == 1, "another zone or type would not help"
    proxy.fail("RunInstances", "UnauthorizedOperation", count=5, status=403)
    with pytest.raises(ProvisionError, match=r"UnauthorizedOperation.*IAM policy of docs/aws.md"):
        p.create([f"{p.cluster_name}-w001"])


def test_missing_credentials_and_region_are_clear_errors(proxy, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ProvisionError, match=r"no AWS credentials found: run `aws configure`"):
        provider().list()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    table = {k: v for k, v in TABLE.items() if k != "region"}
    s = from_mapping(table, file="cluster.toml", cluster_name="noregion", spot=True)
    p = AwsProvider(s, cluster_name="noregion", boot_script="", spot_notice="", ssh_public_key=KEY, ssh_user="root")
    with pytest.raises(ProvisionError, match=r"no AWS region: set \[aws\] region"):
        p.list()


def test_a_vm_whose_console_prints_no_host_keys_is_refused(proxy):
    p = provider()
    (vm,) = p.create([f"{p.cluster_name}-w001"])  # moto's console output is a fixed text without keys
    with pytest.raises(GroupError, match=r"printed no SSH host keys to its console .* never trusts a host key"):
        p.host_keys([vm.name])
    assert len(proxy.recorded("GetConsoleOutput")) >= 2, "read again until the deadline"
    p.delete([vm.name])


# --- an interruption with terminate: heal launches it again -------------------------------


def test_a_terminated_spot_worker_is_launched_again_by_heal(aws_lab):
    a = aws_lab(workers=1, interruption="terminate")
    (name,) = a.config.vm_names()
    p = a.provider()
    p.create([name])
    run = a.runs()[0]
    assert run.params["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert a.backend.interrupt(name) == "terminate"
    assert p.list() == [], "a terminated instance is not live"
    (vm,) = p.start([name])
    assert vm.status is Status.RUNNING and len(a.runs()) == 2
    assert p.host_keys([name]) == a.lab.provider.host_keys([name]), "the new VM's real host key, from its console"
    p.delete([name])
    assert a.lab.statuses() == {}


# --- a stopped worker EC2 will not start: heal launches it again, elsewhere if it was full --


def test_heal_recreates_a_worker_ec2_will_not_start_in_another_zone_then_type_and_says_so(aws_lab):
    a = aws_lab(workers=2)
    names = a.config.vm_names()
    a.fab_ok("up")
    victim = names[1]
    old = a.backend.by_name(victim).id
    assert a.backend.interrupt(victim) == "stop"
    a.proxy.fail("StartInstances", "InsufficientInstanceCapacity", count=100)
    a.proxy.fail("RunInstances", "InsufficientInstanceCapacity", count=100,
                 where=lambda q: (q["InstanceType"], q.get("Placement.AvailabilityZone")) == (TYPES[0], ZONES[1]))
    heal = a.fab_ok("heal")
    assert re.search(rf"^{victim}: recreated in {ZONES[0]}; mount: ok \(mounted\)", heal.stdout, re.M), heal.stdout
    assert re.search(rf"^{names[0]}: running in {ZONES[0]}", heal.stdout, re.M), heal.stdout
    assert f"==> heal: 1 VMs needed help ({victim})" in heal.stdout
    assert f"{victim} cannot be started (starting {victim}: InsufficientInstanceCapacity" in heal.stderr, heal.stderr
    (start,) = a.proxy.recorded("StartInstances")
    assert (start.params["InstanceId.1"], start.fault) == (old, "InsufficientInstanceCapacity")
    tried = [(r.params["InstanceType"], r.params["Placement.AvailabilityZone"], r.fault)
             for r in a.runs(ok=None) if r.tags()["Name"] == victim]
    assert tried == [(TYPES[0], ZONES[0], None), (TYPES[0], ZONES[1], "InsufficientInstanceCapacity"),
                     (TYPES[1], ZONES[0], None)], "its full zone last: the other zone, then the next type"
    assert a.backend.instance(old).state == "terminated", "the one EC2 would not start no longer bills"
    new = a.backend.by_name(victim)
    assert (new.instance_type, new.state, new.lifecycle) == (TYPES[1], "running", "spot")
    st = {v["name"]: (v["status"], v["preempted"]) for v in json.loads(a.fab_ok("status", "--json").stdout)["vms"]}
    assert st == dict.fromkeys(names, ("RUNNING", False))


def test_a_stopped_spot_worker_only_ec2_may_start_is_launched_again_and_nothing_bills_without_room(aws_lab):
    a = aws_lab(workers=1)
    (name,) = a.config.vm_names()
    p = a.provider()
    p.create([name])
    a.backend.interrupt(name)
    a.proxy.fail("StartInstances", "IncorrectSpotRequestState", count=1, status=400,
                 message="The spot instance request is not in a state that allows starting the instance.")
    (vm,) = p.start([name])
    assert (vm.status, vm.recreated, vm.zone) == (Status.RUNNING, True, ZONES[0])
    assert [(r.params["InstanceType"], r.params["Placement.AvailabilityZone"]) for r in a.runs()] == \
        [(TYPES[0], ZONES[0])] * 2, "not a capacity problem: launched again where it was first"
    assert p.host_keys([name]) == a.lab.provider.host_keys([name]), "the new VM's real host key, from its console"

    a.backend.interrupt(name)
    a.proxy.fail("StartInstances", "InsufficientInstanceCapacity", count=1)
    a.proxy.fail("RunInstances", "InsufficientInstanceCapacity", count=100)
    with pytest.raises(StockoutError, match=r"no capacity for c5\.large, c6i\.large in any of us-east-1a, "
                                            r"us-east-1b for .*-w001.*add zones or instance types"):
        p.start([name])
    assert p.list() == [] and a.lab.statuses() == {}, "the stopped one terminated, none launched: nothing bills"


# --- the spot notice watch on the VM ------------------------------------------------------


class _Imds(http.server.BaseHTTPRequestHandler):
    token = "spotfan-imds-token"
    notice: bytes | None = None
    refused = 0

    def do_PUT(self) -> None:
        ok = self.path == "/latest/api/token" and "X-aws-ec2-metadata-token-ttl-seconds" in self.headers
        self._send(200 if ok else 400, self.token.encode() if ok else b"")

    def do_GET(self) -> None:
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            type(self).refused += 1
            return self._send(401, b"")
        if self.path == "/latest/meta-data/spot/instance-action" and type(self).notice is not None:
            return self._send(200, type(self).notice)
        self._send(404, b"")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_spot_notice_watch_records_the_two_minute_notice(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Imds)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    watch = subprocess.Popen(["sh", str(REPO / "cluster" / "vm" / "spot_notice.sh")], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "SPOTFAN_HOME": str(tmp_path),
                                             "SPOTFAN_IMDS_URL": f"http://127.0.0.1:{server.server_port}"})
    try:
        time.sleep(1)
        assert watch.poll() is None and not (tmp_path / "preempted").exists(), "no notice yet: keeps watching"
        _Imds.notice = b'{"action": "stop", "time": "2030-01-01T00:02:00Z"}'
        out, _ = watch.communicate(timeout=30)
        assert watch.returncode == 0
        (line,) = (tmp_path / "preempted").read_text().splitlines()
        assert line.endswith(' {"action": "stop", "time": "2030-01-01T00:02:00Z"}'), line
        assert "spot notice:" in out and _Imds.refused == 0, "asked with the IMDSv2 token"
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        server.shutdown()
        server.server_close()
        thread.join()
