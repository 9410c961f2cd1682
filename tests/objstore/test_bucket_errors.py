"""What a user reads when a bucket cannot be used: a missing bucket, a denied permission,
no credentials, an endpoint that does not answer. Each message says what happened and how
to fix it; each error is in tasks.errors' tree (RootError: the command line exits 3)."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tasks.errors import NoSuchBucket, RootError, StoreAccessError, StoreUnreachable
from tasks.store import ObjectInfo, open_bucket

from .backends import FAST, PERMISSIONS, clean_env

CHILD_TIMEOUT_S = 60
# How to make a missing bucket on each store, as the message must say.
MAKE_BUCKET = {"s3": "aws s3 mb s3://", "gs": "gcloud storage buckets create gs://"}


def test_a_missing_bucket_is_named_with_how_to_create_it(backend):
    absent = type(backend.bucket)("spotfan-no-such-bucket", retries=FAST)
    calls = [absent.check, lambda: absent.create("claims/u1", b"x"), lambda: list(absent.list("out/")),
             lambda: absent.get("in/a")]
    if backend.scheme == "gs":  # an S3 HEAD answers a bare 404 for either: stat says None there
        calls.append(lambda: absent.stat("in/a"))
    for call in calls:
        with pytest.raises(NoSuchBucket) as caught:
            call()
        message = str(caught.value)
        assert "spotfan-no-such-bucket does not exist" in message
        assert f"{MAKE_BUCKET[backend.scheme]}spotfan-no-such-bucket" in message
        assert isinstance(caught.value, RootError)
    absent.close()


@pytest.mark.parametrize("op", ["create", "get", "list", "delete"])
def test_a_denied_permission_is_named_with_how_to_grant_it(backend, op):
    backend.bucket.create("in/a", b"x")
    backend.deny(op)
    calls = {"create": lambda: backend.bucket.create("claims/u1", b"x"), "get": lambda: backend.bucket.get("in/a"),
             "list": lambda: list(backend.bucket.list("in/")), "delete": lambda: backend.bucket.delete("in/a")}
    with pytest.raises(StoreAccessError) as caught:
        calls[op]()
    needed = PERMISSIONS[backend.scheme][op]
    assert caught.value.permission == needed
    assert f"grant {needed} on" in str(caught.value)
    assert backend.bucket_name in str(caught.value)
    backend.clear_faults()
    assert backend.body("in/a") == b"x"  # a denied call changed nothing


def test_a_denied_upload_names_the_create_permission(backend, tmp_path):
    local = tmp_path / "out.bin"
    local.write_bytes(b"result")
    backend.deny("create")
    with pytest.raises(StoreAccessError, match=PERMISSIONS[backend.scheme]["create"]):
        backend.bucket.upload(local, "out/k.bin")
    assert backend.body("out/k.bin") is None


_CHILD = """
import sys
from tasks.errors import TaskError
from tasks.store import open_bucket
try:
    open_bucket(sys.argv[1]).check()
except TaskError as e:
    print(type(e).__name__, e, sep=": ")
    sys.exit(3)
print("ok")
"""


def _child(url: str, env: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _CHILD, url], env={**env, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def test_no_aws_credentials_say_where_to_get_them(s3_server, s3_bucket, tmp_path):
    done = _child(f"s3://{s3_bucket}/run", clean_env({"AWS_ENDPOINT_URL": s3_server.endpoint,
                                                      "AWS_DEFAULT_REGION": "us-east-1"}), tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("StoreAccessError: ")
    assert "no AWS credentials were found" in done.stdout and "aws configure" in done.stdout
    assert "instance role" in done.stdout
    assert s3_server.proxy.requests.select(bucket=s3_bucket) == []  # refused before any request
    with_keys = _child(f"s3://{s3_bucket}/run", clean_env(s3_server.env), tmp_path)
    assert (with_keys.returncode, with_keys.stdout.strip()) == (0, "ok"), with_keys.stderr


def test_no_google_credentials_say_where_to_get_them(gcs_server, gcs_bucket, tmp_path):
    done = _child(f"gs://{gcs_bucket}/run", clean_env({"GOOGLE_CLOUD_PROJECT": gcs_server.project}), tmp_path)
    assert done.returncode == 3, done.stderr
    assert done.stdout.startswith("StoreAccessError: ")
    assert "no Google credentials were found" in done.stdout
    assert "gcloud auth application-default login" in done.stdout and "service account" in done.stdout
    with_emulator = _child(f"gs://{gcs_bucket}/run", clean_env(gcs_server.env), tmp_path)
    assert (with_emulator.returncode, with_emulator.stdout.strip()) == (0, "ok"), with_emulator.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_endpoint_that_does_not_answer_is_named_after_bounded_retries(backend, monkeypatch):
    variable = "AWS_ENDPOINT_URL" if backend.scheme == "s3" else "STORAGE_EMULATOR_HOST"
    monkeypatch.setenv(variable, f"http://127.0.0.1:{_closed_port()}")
    unreachable = backend.new()
    started = time.monotonic()
    for call in (unreachable.check, lambda: unreachable.create("claims/u1", b"x")):
        with pytest.raises(StoreUnreachable) as caught:
            call()
        assert variable in str(caught.value) and "run again" in str(caught.value)
    assert time.monotonic() - started < 4 * (FAST.deadline_s + FAST.connect_timeout_s)
    unreachable.close()


def test_open_bucket_takes_the_root_url_and_connects_on_first_use(backend):
    bucket = open_bucket(f"{backend.scheme}://{backend.bucket_name}/runs/one", retries=FAST)
    assert type(bucket) is type(backend.bucket) and bucket.name == backend.bucket_name
    assert isinstance(bucket.create("runs/one/x", b"x"), ObjectInfo)
    bucket.close()


def test_gcs_check_and_clock_need_only_the_object_permissions_a_worker_has(gcs_server, gcs_bucket, gcs_env):
    """roles/storage.objectUser has no storage.buckets.get: check() and clock() must not need it."""
    from tasks.store.gcs import GcsBucket

    bucket = GcsBucket(gcs_bucket, retries=FAST)
    gcs_server.deny("storage.buckets.get")
    bucket.check()
    bucket.clock()
    gcs_server.deny("storage.objects.list")
    with pytest.raises(StoreAccessError) as caught:
        bucket.check()
    assert caught.value.permission == "storage.objects.list"
    bucket.close()
