"""cluster.toml's [share]: a bucket instead of a head, checked before anything is created (no lab needed)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import load
from cluster.errors import ConfigError, ProvisionError
from cluster.providers.lab.store import store_env
from cluster.session import Cluster

FAB = Path(sys.executable).parent / "fab"
REPO = Path(__file__).resolve().parents[2]
AMI = "ami-0123456789abcdef0"

LAB = """
[cluster]
name = "demo"
[share]
kind = "s3"
url = "s3://my-bucket/runs/one"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cluster.toml"
    p.write_text(text)
    return p


def problem(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, text))
    return str(e.value)


def test_a_bucket_share_needs_no_head(tmp_path):
    c = load(write(tmp_path, LAB))
    assert c.head is None and c.share.headless and c.share.kind == "s3"
    assert (c.share.url.bucket, c.share.url.prefix) == ("my-bucket", "runs/one/")
    assert c.run_root == "s3://my-bucket/runs/one"
    with Cluster(c) as cluster:
        assert cluster.headless
        with pytest.raises(ConfigError, match="this cluster has no head: its share is the bucket s3://my-bucket"):
            cluster.share  # noqa: B018  (the head's SFTP share: there is none)


def test_the_default_share_is_the_head(tmp_path):
    c = load(write(tmp_path, '[cluster]\nname = "demo"\n[share]\nkind = "sshfs"\n[head]\naddress = "127.0.0.1"\n'
                             'share = "share"\n'))
    assert c.share.kind == "sshfs" and not c.share.headless and c.head is not None
    assert c.run_root == c.mount_point


@pytest.mark.parametrize("share, message", [
    ('kind = "s33"\nurl = "s3://my-bucket/p"', r"\[share\] kind = 's33': must be one of 'sshfs', 's3', 'gcs'; did you mean 's3'\?"),
    ('kind = "s3"\nurll = "s3://my-bucket/p"', r"\[share\] urll is not a known key; did you mean url\?"),
    ('kind = "s3"', r'\[share\] url is required with kind = "s3": add `url = "s3://BUCKET/PREFIX"`'),
    ('kind = "s3"\nurl = "s3a://my-bucket/p"', r"\[share\] url = 's3a://my-bucket/p': unknown scheme 's3a'; did you mean s3://my-bucket/p\?"),
    ('kind = "s3"\nurl = "s3://My_Bucket/p"', r"\[share\] url = 's3://My_Bucket/p': Amazon S3 bucket name 'My_Bucket' has"),
    ('kind = "s3"\nurl = "my-bucket/p"', r"\[share\] url = 'my-bucket/p': is not an object-store URL; write s3://BUCKET/PREFIX"),
    ('kind = "s3"\nurl = "s3://my-bucket/a/../b"', r"\[share\] url = 's3://my-bucket/a/../b': the prefix 'a/../b' has an empty, '.' or '..' part"),
    ('kind = "gcs"\nurl = "s3://my-bucket/p"', r"\[share\] url = 's3://my-bucket/p' is a s3:// URL, but kind = \"gcs\": write gs://BUCKET/PREFIX, or set kind = \"s3\""),
    ('url = "s3://my-bucket/p"', r"\[share\] url = 's3://my-bucket/p': a url is for kind = \"s3\" or \"gcs\" \(a bucket\)"),
    ('kind = "s3"\nurl = 3', r"\[share\] url = 3: must be a string"),
])
def test_share_errors_name_the_key_and_the_fix(tmp_path, share, message):
    path = write(tmp_path, f'[cluster]\nname = "demo"\n[share]\n{share}\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load(path)


def test_a_head_beside_a_bucket_is_refused(tmp_path):
    text = LAB + '[head]\naddress = "127.0.0.1"\nshare = "share"\n'
    assert problem(tmp_path, text).endswith(
        '[head] is for a share on a head machine (kind = "sshfs"); with [share] kind = "s3" the VMs use the '
        "bucket and there is no head: remove [head]")


def test_a_bad_share_is_refused_before_fab_up_creates_anything(tmp_path):
    """Exit 2 with the fix, and no key, no lab state, no VM: nothing was made."""
    write(tmp_path, LAB.replace("s3://my-bucket/runs/one", "s3://my_bucket/runs/one"))
    env = {**os.environ, "SPOTFAN_CONFIG": str(tmp_path / "cluster.toml")}
    r = subprocess.run([str(FAB), "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "[share] url = 's3://my_bucket/runs/one': Amazon S3 bucket name 'my_bucket' has '_'" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster.toml"]


# -- each provider's way to the bucket: an identity, never copied keys ---------------------


GCE = """
[cluster]
name = "demo"
provider = "gce"
zones = ["us-central1-b"]
image = "spotfan-worker"
[share]
kind = "{kind}"
url = "{url}"
[gce]
project = "spotfan-test"
{extra}
"""


def test_gce_on_a_bucket_uses_its_service_account(tmp_path):
    ok = load(write(tmp_path, GCE.format(kind="gcs", url="gs://data-b/run",
                                         extra='service_account = "w@p.iam.gserviceaccount.com"')))
    assert ok.share.kind == "gcs" and ok.head is None
    assert problem(tmp_path, GCE.format(kind="gcs", url="gs://data-b/run", extra="")).endswith(
        '[gce] service_account is required with [share] kind = "gcs": the VMs use the bucket as this service '
        "account (with the cloud-platform scope); grant it roles/storage.objectUser on gs://data-b "
        "(docs/objstore.md)")
    assert 'kind = "s3" with provider = "gce"' in problem(
        tmp_path, GCE.format(kind="s3", url="s3://data-b/run", extra='service_account = "w@p.iam.gserviceaccount.com"'))
    assert "[gce.head] makes a head VM" in problem(tmp_path, GCE.format(
        kind="gcs", url="gs://data-b/run", extra='service_account = "w@p.iam.gserviceaccount.com"\n'
                                                 '[gce.head]\ncreate = true\nzone = "us-central1-b"'))


AWS = f"""
[cluster]
name = "demo"
provider = "aws"
[share]
kind = "{{kind}}"
url = "{{url}}"
[aws]
region = "us-east-1"
image = "{AMI}"
instance_types = ["c5.large"]
zones = ["us-east-1a"]
ssh_cidr = "203.0.113.7/32"
{{extra}}
"""


def test_aws_on_a_bucket_uses_its_instance_profile(tmp_path):
    ok = load(write(tmp_path, AWS.format(kind="s3", url="s3://data-b/run", extra='instance_profile = "spotfan-worker"')))
    assert ok.share.kind == "s3" and ok.settings.instance_profile == "spotfan-worker"
    assert problem(tmp_path, AWS.format(kind="s3", url="s3://data-b/run", extra="")).endswith(
        '[aws] instance_profile is required with [share] kind = "s3": the VMs use the bucket through this '
        "instance profile; its role needs s3:ListBucket on the bucket and s3:GetObject, s3:PutObject, "
        "s3:DeleteObject on PREFIX/* (docs/objstore.md)")
    assert 'kind = "gcs" with provider = "aws"' in problem(
        tmp_path, AWS.format(kind="gcs", url="gs://data-b/run", extra='instance_profile = "spotfan-worker"'))


def test_the_lab_hands_its_vms_a_loopback_store_only():
    moto = {"AWS_ENDPOINT_URL": "http://127.0.0.1:5123", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "HOME": "/root"}
    env = store_env("s3", moto)
    assert env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:5123", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                   "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    with pytest.raises(ProvisionError, match="AWS_ENDPOINT_URL is not set"):
        store_env("s3", {"AWS_ACCESS_KEY_ID": "AKIAREAL"})
    with pytest.raises(ProvisionError, match=r"AWS_ENDPOINT_URL='https://s3.amazonaws.com' is not on loopback"):
        store_env("s3", {**moto, "AWS_ENDPOINT_URL": "https://s3.amazonaws.com"})
    with pytest.raises(ProvisionError, match="STORAGE_EMULATOR_HOST='http://10.0.0.5:9023' is not on loopback"):
        store_env("gs", {"STORAGE_EMULATOR_HOST": "http://10.0.0.5:9023"})
    assert store_env("gs", {"STORAGE_EMULATOR_HOST": "http://localhost:9023"})["STORAGE_EMULATOR_HOST"] == \
        "http://localhost:9023"
