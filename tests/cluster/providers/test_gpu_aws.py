"""EC2 GPU workers against moto behind the EC2 fault proxy: the GPU count comes from EC2's description of
the instance type (GpuInfo), is looked up once, and types that disagree (or carry GPUs spotfan cannot
check) are refused before any instance bills."""
from __future__ import annotations

import logging
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test,aws]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from aws_lab import FAST, IMAGE, REGION, ZONES, moto_env  # noqa: E402
from ec2_fault_proxy import Ec2FaultProxy  # noqa: E402

from cluster.errors import ConfigError, ProvisionError  # noqa: E402
from cluster.providers.aws import AwsProvider  # noqa: E402
from cluster.providers.aws.api import Ec2Api  # noqa: E402
from cluster.providers.aws.settings import from_mapping  # noqa: E402
from cluster.providers.base import Accelerated  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGb8tZbJq1vRJ3m0nq2mXl0pQ2n8b9Yk0xkJ8f7rGq3T laptop"
TABLE = {"region": REGION, "image": IMAGE, "zones": ZONES, "ssh_cidr": "127.0.0.1/32"}


class AmdTypes:
    """Answers DescribeInstanceTypes for g4ad.xlarge (AMD Radeon Pro V520; moto's catalogue has no AMD
    type) with EC2's XML: moto's own answer for g4dn.xlarge with the GPU's maker, name and type changed."""

    def __init__(self, upstream: str) -> None:
        form = urllib.parse.urlencode({"Action": "DescribeInstanceTypes", "Version": "2016-11-15",
                                       "InstanceType.1": "g4dn.xlarge"}).encode()
        # moto's server picks the service from the credential scope of the signature
        scope = {"Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/ec2/aws4_request, "
                                  "SignedHeaders=host, Signature=0",
                 "Content-Type": "application/x-www-form-urlencoded"}
        with urllib.request.urlopen(urllib.request.Request(upstream + "/", data=form, headers=scope), timeout=120) as r:  # moto loads its catalogue: slow under load
            nvidia = r.read().decode()
        assert "<manufacturer>NVIDIA</manufacturer>" in nvidia, nvidia[:500]
        self.xml = (nvidia.replace("g4dn.xlarge", "g4ad.xlarge").replace("<manufacturer>NVIDIA</manufacturer>",
                    "<manufacturer>AMD</manufacturer>").replace("<name>T4</name>", "<name>Radeon Pro V520</name>"))

    def answer(self, action: str, params: Mapping[str, str]) -> bytes | None:
        if action == "DescribeInstanceTypes" and params.get("InstanceType.1") == "g4ad.xlarge":
            return self.xml.encode()
        return None

    def before(self, action: str, params: Mapping[str, str]) -> None:
        pass

    def after(self, action: str, params: Mapping[str, str], body: bytes) -> None:
        pass


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
    with Ec2FaultProxy(upstream=moto_url, backend=AmdTypes(moto_url)) as p:
        for k, v in moto_env(p.endpoint).items():
            monkeypatch.setenv(k, v)
        yield p


_clusters = iter(range(1, 10_000))


def provider(*types: str) -> AwsProvider:
    name = f"g{next(_clusters)}"
    s = from_mapping({**TABLE, "instance_types": list(types)}, file="cluster.toml", cluster_name=name, spot=True)
    return AwsProvider(s, cluster_name=name, boot_script="#!/bin/sh\necho boot\n", spot_notice="#!/bin/sh\n",
                       ssh_public_key=KEY, ssh_user="admin", timing=FAST,
                       api=Ec2Api(region=s.region, profile=None, sleep=lambda s: None))


def test_the_gpu_count_is_ec2s_description_of_the_type(proxy):
    four = provider("g4dn.12xlarge")
    assert isinstance(four, Accelerated) and four.gpus_per_vm() == 4 and four.gpus_per_vm() == 4
    assert len(proxy.recorded("DescribeInstanceTypes")) == 1, "looked up once per provider"
    (asked,) = proxy.recorded("DescribeInstanceTypes")
    assert asked.params["InstanceType.1"] == "g4dn.12xlarge"
    assert provider("g4dn.xlarge", "g5.xlarge", "g6.xlarge").gpus_per_vm() == 1  # T4, A10G, L4: one each
    assert provider("p4d.24xlarge").gpus_per_vm() == 8
    assert provider("c5.large", "c6i.large").gpus_per_vm() == 0  # CPU types: no GPU check, no pinning


def test_types_with_different_gpu_counts_are_refused_before_any_instance(proxy):
    p = provider("g4dn.xlarge", "g4dn.12xlarge", "c5.large")
    with pytest.raises(ConfigError, match=r"different GPU counts \(g4dn.xlarge 1, g4dn.12xlarge 4, c5.large 0\)"):
        p.create([f"{p.cluster_name}-w001"])
    assert proxy.recorded("RunInstances") == [] and p.list() == []


def test_gpus_spotfan_cannot_check_are_refused(proxy):
    p = provider("g4ad.xlarge")
    with pytest.raises(ConfigError, match="g4ad.xlarge has AMD GPUs; spotfan checks and shares out NVIDIA GPUs only"):
        p.create([f"{p.cluster_name}-w001"])
    assert proxy.recorded("RunInstances") == []


def test_an_unknown_type_names_the_fix(proxy):
    with pytest.raises(ProvisionError, match=r"InvalidInstanceType.*check \[aws\] instance_types"):
        provider("p9.mega").gpus_per_vm()
