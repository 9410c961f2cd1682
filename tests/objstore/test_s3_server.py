"""moto S3 behind the fault proxy, driven through the real boto3 client.

What moto enforces is asserted as S3 behaviour; what moto does not enforce is asserted as
a gap (`test_moto_gap_*`, each naming what real S3 does instead), so that a moto upgrade
that closes one fails here and the notes get updated. Production code must not rely on a
gap: a test passing against moto proves nothing there.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import botocore.exceptions
import pytest

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import S3Backend, s3_backends

from .s3_fault_proxy import S3FaultProxy

RACERS = 8  # threads racing one create
RACE_ROUNDS = 5
GAP_RACERS = 3
GAP_BARRIER_TIMEOUT_S = 20  # how long moto's widened check-then-write waits for every racer
GAP_WINDOW_S = 0.3  # the window held open between moto's check and its write
CHILD_TIMEOUT_S = 60


def _put(client, bucket: str, key: str, body: bytes, **kw) -> str | tuple[str, int]:
    """The new ETag, or (error code, HTTP status) of the refusal."""
    try:
        return client.put_object(Bucket=bucket, Key=key, Body=body, **kw)["ETag"]
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def _body(client, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _multipart(client, bucket: str, key: str, body: bytes, **complete_kw) -> str | tuple[str, int]:
    """Upload `body` as a one-part multipart upload; the ETag or (code, status) of CompleteMultipartUpload."""
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=body)
    try:
        return client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload,
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]}, **complete_kw)["ETag"]
    except botocore.exceptions.ClientError as e:
        return e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]


def _moto_backend() -> S3Backend:
    """The in-process backend of the ThreadedMotoServer (for seeding many keys quickly)."""
    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


# --- conditional writes moto enforces -------------------------------------------------


def test_second_put_with_if_none_match_fails_and_keeps_the_first(s3_client, s3_bucket):
    assert isinstance(_put(s3_client, s3_bucket, "claims/u1", b"owner-a", IfNoneMatch="*"), str)
    assert _put(s3_client, s3_bucket, "claims/u1", b"owner-b", IfNoneMatch="*") == ("PreconditionFailed", 412)
    assert _body(s3_client, s3_bucket, "claims/u1") == b"owner-a"


def test_put_if_match_is_a_compare_and_swap(s3_client, s3_bucket):
    e1 = _put(s3_client, s3_bucket, "claims/u2", b"lease-1 owner-a", IfNoneMatch="*")
    e2 = _put(s3_client, s3_bucket, "claims/u2", b"lease-2 owner-a", IfMatch=e1)
    assert isinstance(e2, str) and e2 != e1
    assert _put(s3_client, s3_bucket, "claims/u2", b"lease-1 taker-b", IfMatch=e1) == ("PreconditionFailed", 412)
    assert _body(s3_client, s3_bucket, "claims/u2") == b"lease-2 owner-a"
    assert _put(s3_client, s3_bucket, "missing", b"x", IfMatch=e1) == ("NoSuchKey", 404)  # as S3: If-Match needs an object


def test_an_etag_names_content_so_rewriting_the_same_bytes_keeps_it(s3_client, s3_bucket):
    """An ETag is the MD5 of the content (single PUT, no KMS), on S3 as on moto: a swap
    with a stale ETag succeeds when the current object has the same bytes. Every claim or
    lease body must therefore be unique (owner, nonce, counter) for If-Match to fence."""
    e1 = _put(s3_client, s3_bucket, "claims/u3", b"same bytes", IfNoneMatch="*")
    e2 = _put(s3_client, s3_bucket, "claims/u3", b"same bytes", IfMatch=e1)
    assert e2 == e1
    assert _put(s3_client, s3_bucket, "claims/u3", b"same bytes", IfMatch=e1) == e1  # "stale", yet accepted


def test_racing_creates_have_exactly_one_winner(s3_server, s3_client, s3_bucket):
    s3_server.proxy.add_latency(0.05, operation="PutObject")  # every racer in flight together
    clients = [s3_server.client() for _ in range(RACERS)]
    for round_ in range(RACE_ROUNDS):
        key = f"claims/race-{round_}"
        outcomes = _race(clients, s3_bucket, key)
        winners = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, str)]
        assert len(winners) == 1, outcomes
        assert [o for o in outcomes if not isinstance(o, str)] == [("PreconditionFailed", 412)] * (RACERS - 1)
        assert _body(s3_client, s3_bucket, key) == f"racer-{winners[0]}".encode()


def test_moto_gap_its_check_then_write_is_not_atomic_so_the_proxy_serializes_writes(s3_server, s3_bucket, monkeypatch):
    """moto checks If-None-Match and then writes with no lock between (real S3 decides
    atomically). Widened here by holding each write of a "held/" key in moto: straight to
    moto, with every racer held until all have passed the check, all of them win; through
    the proxy, which forwards one write at a time, exactly one does."""
    original = S3Backend.put_object
    hold = {"wait": lambda: None}

    def held_put_object(self, bucket_name, key_name, *args, **kwargs):
        if key_name.startswith("held/"):
            hold["wait"]()
        return original(self, bucket_name, key_name, *args, **kwargs)

    monkeypatch.setattr(S3Backend, "put_object", held_put_object)

    hold["wait"] = threading.Barrier(GAP_RACERS, timeout=GAP_BARRIER_TIMEOUT_S).wait
    straight = _race([s3_server.client(endpoint=s3_server.moto_endpoint) for _ in range(GAP_RACERS)], s3_bucket, "held/a")
    assert all(isinstance(outcome, str) for outcome in straight), straight  # every racer "created" it

    hold["wait"] = lambda: time.sleep(GAP_WINDOW_S)  # a barrier would wait for racers the proxy holds back
    proxied = _race([s3_server.client() for _ in range(GAP_RACERS)], s3_bucket, "held/b")
    assert sum(isinstance(outcome, str) for outcome in proxied) == 1, proxied
    assert [o for o in proxied if not isinstance(o, str)] == [("PreconditionFailed", 412)] * (GAP_RACERS - 1)


def _race(clients: list, bucket: str, key: str) -> list[object]:
    """Each client puts `key` with IfNoneMatch='*' at once; their outcomes, in client order."""
    outcomes: list[object] = [None] * len(clients)
    barrier = threading.Barrier(len(clients))

    def one(i: int) -> None:
        barrier.wait()
        outcomes[i] = _put(clients[i], bucket, key, f"racer-{i}".encode(), IfNoneMatch="*")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * GAP_BARRIER_TIMEOUT_S + 30)
    return outcomes


def test_delete_if_match_is_enforced(s3_client, s3_bucket):
    e1 = _put(s3_client, s3_bucket, "claims/u4", b"v1")
    e2 = _put(s3_client, s3_bucket, "claims/u4", b"v2")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3_client.delete_object(Bucket=s3_bucket, Key="claims/u4", IfMatch=e1)
    assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    assert _body(s3_client, s3_bucket, "claims/u4") == b"v2"
    s3_client.delete_object(Bucket=s3_bucket, Key="claims/u4", IfMatch=e2)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="claims/")


def test_complete_multipart_upload_if_none_match_is_enforced(s3_client, s3_bucket):
    assert isinstance(_multipart(s3_client, s3_bucket, "out/big", b"first", IfNoneMatch="*"), str)
    assert _multipart(s3_client, s3_bucket, "out/big", b"second", IfNoneMatch="*") == ("PreconditionFailed", 412)
    assert _body(s3_client, s3_bucket, "out/big") == b"first"


def test_upload_file_cannot_send_if_none_match(s3_client, s3_bucket, tmp_path):
    """boto3's managed transfer (upload_file/upload_fileobj, multipart past 8 MiB) refuses
    the condition, so a publish-if-absent must call put_object (up to 5 GiB) or drive the
    multipart upload itself with IfNoneMatch on CompleteMultipartUpload."""
    path = tmp_path / "out.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="Invalid extra_args key 'IfNoneMatch'"):
        s3_client.upload_file(str(path), s3_bucket, "out.bin", ExtraArgs={"IfNoneMatch": "*"})


# --- gaps: conditions moto accepts and ignores -----------------------------------------


def test_moto_gap_complete_multipart_upload_ignores_if_match(s3_client, s3_bucket):
    """Real S3: CompleteMultipartUpload with a stale If-Match is 412, and with If-Match on
    a missing key 404 NoSuchKey. moto 5.2: both complete and write."""
    first = _multipart(s3_client, s3_bucket, "out/cas", b"v1")
    _put(s3_client, s3_bucket, "out/cas", b"v2 by a peer")
    assert isinstance(_multipart(s3_client, s3_bucket, "out/cas", b"v3 stale", IfMatch=first), str)
    assert _body(s3_client, s3_bucket, "out/cas") == b"v3 stale"
    assert isinstance(_multipart(s3_client, s3_bucket, "out/none", b"x", IfMatch=first), str)


def test_moto_gap_copy_object_ignores_destination_conditions(s3_client, s3_bucket):
    """Real S3: CopyObject with IfNoneMatch='*' onto an existing key, or with a stale
    IfMatch, is 412. moto 5.2: the copy overwrites the destination."""
    _put(s3_client, s3_bucket, "src", b"source")
    stale = _put(s3_client, s3_bucket, "dst", b"old")
    _put(s3_client, s3_bucket, "dst", b"peer")
    s3_client.copy_object(Bucket=s3_bucket, Key="dst", CopySource={"Bucket": s3_bucket, "Key": "src"}, IfNoneMatch="*")
    assert _body(s3_client, s3_bucket, "dst") == b"source"
    _put(s3_client, s3_bucket, "dst", b"peer again")
    s3_client.copy_object(Bucket=s3_bucket, Key="dst", CopySource={"Bucket": s3_bucket, "Key": "src"}, IfMatch=stale)
    assert _body(s3_client, s3_bucket, "dst") == b"source"


def test_moto_gap_if_none_match_with_an_etag_is_ignored(s3_client, s3_bucket):
    """S3 documents only If-None-Match: '*' for writes; moto ignores any other value, even
    the current ETag (under RFC 9110 that write would be refused). Send only '*'."""
    etag = _put(s3_client, s3_bucket, "k", b"v1")
    assert isinstance(_put(s3_client, s3_bucket, "k", b"v2", IfNoneMatch=etag), str)
    assert _body(s3_client, s3_bucket, "k") == b"v2"


def test_moto_gap_a_lost_complete_multipart_response_is_idempotent_on_moto(s3_server, s3_client, s3_bucket):
    """moto answers a retried CompleteMultipartUpload of the upload that created the object
    with 200 even under IfNoneMatch='*' (its code calls this idempotent); not checked
    against real S3 here, so production must still handle a 412 on that retry."""
    s3_server.proxy.fail_next(1, status=503, operation="CompleteMultipartUpload", after_apply=True)
    assert isinstance(_multipart(s3_client, s3_bucket, "out/lost", b"ours", IfNoneMatch="*"), str)
    completes = s3_server.proxy.requests.select(kind="CompleteMultipartUpload", bucket=s3_bucket)
    assert [(r.status, r.fault) for r in completes] == [(503, "503 after apply"), (200, None)]


# --- listing ---------------------------------------------------------------------------


def test_list_objects_v2_pages_hold_at_most_1000_keys(s3_server, s3_client, s3_bucket):
    backend = _moto_backend()
    outputs = {f"out/{i:05d}.txt" for i in range(2345)}
    for key in [*outputs, "out/sub1/a", "out/sub1/b", "out/sub2/c", "other/x"]:
        backend.put_object(s3_bucket, key, b"x")

    pages = list(s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/", Delimiter="/"))
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    prefixes = [p["Prefix"] for page in pages for p in page.get("CommonPrefixes", [])]
    assert set(keys) == outputs and keys == sorted(keys)
    assert prefixes == ["out/sub1/", "out/sub2/"]
    assert [page["KeyCount"] for page in pages] == [1000, 1000, 347]  # keys and prefixes together
    lists = s3_server.proxy.requests.select(kind="ListObjectsV2", bucket=s3_bucket)
    assert len(lists) == 3 and all("continuation-token" in r.query for r in lists[1:])

    small = s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket, Prefix="out/0", MaxKeys=700)
    assert [page["KeyCount"] for page in small] == [700, 700, 700, 245]


# --- the fault layer -------------------------------------------------------------------


def test_a_503_slowdown_is_retried_by_boto3(s3_server, s3_client, s3_bucket):
    s3_server.proxy.fail_next(2, status=503, operation="PutObject")
    assert isinstance(_put(s3_client, s3_bucket, "k", b"x", IfNoneMatch="*"), str)
    puts = s3_server.proxy.requests.select(kind="PutObject", bucket=s3_bucket)
    assert [(r.status, r.fault) for r in puts] == [(503, "503"), (503, "503"), (200, None)]


def test_a_503_that_persists_surfaces_as_slowdown(s3_server, s3_bucket):
    client = s3_server.client(retries={"mode": "standard", "total_max_attempts": 2})
    s3_server.proxy.fail_next(10, status=503, operation="GetObject")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        client.get_object(Bucket=s3_bucket, Key="k")
    error = caught.value.response["Error"]
    assert (error["Code"], error["Message"]) == ("SlowDown", "Please reduce your request rate.")
    assert len(s3_server.proxy.requests.select(kind="GetObject", bucket=s3_bucket)) == 2


def test_a_500_internal_error_is_retried_by_boto3(s3_server, s3_client, s3_bucket):
    _put(s3_client, s3_bucket, "k", b"x")
    s3_server.proxy.fail_next(1, status=500, operation="GetObject")
    assert _body(s3_client, s3_bucket, "k") == b"x"
    gets = s3_server.proxy.requests.select(kind="GetObject", bucket=s3_bucket)
    assert [r.status for r in gets] == [500, 200]


def test_a_403_access_denied_surfaces_at_once_naming_the_action(s3_server, s3_client, s3_bucket):
    s3_server.proxy.fail_next(1, status=403, operation="PutObject")
    assert _put(s3_client, s3_bucket, "k", b"x", IfNoneMatch="*") == ("AccessDenied", 403)
    s3_server.proxy.fail_next(1, status=403, operation="ListObjectsV2")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        s3_client.list_objects_v2(Bucket=s3_bucket)
    message = caught.value.response["Error"]["Message"]
    assert "is not authorized to perform: s3:ListBucket" in message and f"arn:aws:s3:::{s3_bucket}" in message
    kinds = [(r.kind, r.status) for r in s3_server.proxy.requests.select(bucket=s3_bucket)]
    assert kinds == [("PutObject", 403), ("ListObjectsV2", 403)]  # not retried


def test_a_409_conditional_request_conflict_surfaces(s3_server, s3_client, s3_bucket):
    """S3 may answer a conditional write racing another with 409; boto3 does not retry it."""
    s3_server.proxy.fail_next(1, status=409, operation="PutObject")
    assert _put(s3_client, s3_bucket, "k", b"x", IfNoneMatch="*") == ("ConditionalRequestConflict", 409)
    assert isinstance(_put(s3_client, s3_bucket, "k", b"x", IfNoneMatch="*"), str)


def test_a_lost_create_response_comes_back_as_precondition_failed(s3_server, s3_client, s3_bucket):
    """The claims trap on S3 too: the create happened, its answer was lost, boto3 retried by
    itself and met our own object. A 412 on a create does not prove a peer won."""
    s3_server.proxy.fail_next(1, status=503, operation="PutObject", after_apply=True)
    assert _put(s3_client, s3_bucket, "claims/u5", b"ours", IfNoneMatch="*") == ("PreconditionFailed", 412)
    assert _body(s3_client, s3_bucket, "claims/u5") == b"ours"


def test_latency_and_counts_by_operation(s3_server, s3_client, s3_bucket):
    s3_server.proxy.add_latency(0.3, operation="HeadObject", count=1)
    _put(s3_client, s3_bucket, "claims/k1", b"claim", IfNoneMatch="*")
    s3_client.put_object(Bucket=s3_bucket, Key="out/k1", Body=b"output", IfNoneMatch="*")
    started = time.monotonic()
    s3_client.head_object(Bucket=s3_bucket, Key="out/k1")
    assert time.monotonic() - started >= 0.3
    s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")
    s3_client.upload_fileobj(io.BytesIO(os.urandom(9 * 1024 * 1024)), s3_bucket, "out/big")
    s3_client.delete_object(Bucket=s3_bucket, Key="claims/k1")

    assert s3_server.proxy.requests.counts(bucket=s3_bucket) == Counter({
        "PutObject": 2, "HeadObject": 1, "ListObjectsV2": 1, "CreateMultipartUpload": 1, "UploadPart": 2,
        "CompleteMultipartUpload": 1, "DeleteObject": 1})
    heads = s3_server.proxy.requests.select(kind="HeadObject", bucket=s3_bucket)
    assert [r.seconds_delayed for r in heads] == [0.3]


def test_a_child_process_reaches_the_proxy_with_env_alone(s3_server, s3_bucket):
    code = (
        "import boto3\n"
        "s3 = boto3.client('s3')\n"
        "s3.put_object(Bucket=%r, Key='from-child', Body=b'hi', IfNoneMatch='*')\n"
        "print(s3.get_object(Bucket=%r, Key='from-child')['Body'].read().decode())\n"
    ) % (s3_bucket, s3_bucket)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, **s3_server.env}, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hi"
    assert [r.kind for r in s3_server.proxy.requests.select(bucket=s3_bucket, key="^from-child$")] == ["PutObject", "GetObject"]


def test_the_proxy_forwards_only_to_loopback():
    for upstream in ("http://10.0.0.1:5000", "http://localhost:5000", "https://127.0.0.1:5000", "http://127.0.0.1"):
        with pytest.raises(ValueError, match="only to http://127.0.0.1:PORT"):
            S3FaultProxy(upstream=upstream)


# --- the cut and clock knobs -------------------------------------------------------------


def _raw_date(endpoint: str, path: str) -> str | None:
    """The Date header of the answer to one plain (unsigned) GET: moto refuses it, with a Date."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=CHILD_TIMEOUT_S)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.getheader("Date")
    finally:
        conn.close()


def test_cut_next_sends_part_of_the_body_and_closes(s3_server, s3_client, s3_bucket):
    data = os.urandom(100_000)
    s3_client.put_object(Bucket=s3_bucket, Key="out/cut", Body=data)
    s3_server.proxy.cut_next(1, after_bytes=1234, operation="GetObject", key="^out/cut$")
    response = s3_client.get_object(Bucket=s3_bucket, Key="out/cut")
    assert response["ContentLength"] == len(data)  # the headers promise the whole body
    with pytest.raises((botocore.exceptions.IncompleteReadError, botocore.exceptions.ResponseStreamingError)):
        response["Body"].read()
    assert _body(s3_client, s3_bucket, "out/cut") == data  # one cut only
    gets = s3_server.proxy.requests.select(kind="GetObject", bucket=s3_bucket)
    assert [(r.status, r.fault) for r in gets] == [(200, "cut after 1234 bytes"), (200, None)]


def test_skew_clock_moves_the_date_header_and_only_one_date_is_sent(s3_server, s3_bucket):
    from email.utils import parsedate_to_datetime

    s3_server.proxy.skew_clock(3600)
    date = _raw_date(s3_server.endpoint, f"/{s3_bucket}")
    assert date is not None and "," in date and date.count("GMT") == 1, date  # moto's own Date is replaced
    assert abs(parsedate_to_datetime(date).timestamp() - (time.time() + 3600)) < 30
    s3_server.proxy.clear_faults()
    date = _raw_date(s3_server.endpoint, f"/{s3_bucket}")
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 30


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_upload_cut_off_mid_body_stores_nothing(s3_server, s3_client, s3_bucket, framing):
    # As S3 does: an uploader killed mid-body (a SIGKILLed runner) leaves no object, not an
    # empty or a short one. (The proxy once took a cut body as a whole one.)
    from urllib.parse import urlsplit

    from .loopback import send_and_hang_up

    head = f"PUT /{s3_bucket}/out/cut.bin HTTP/1.1\r\nHost: {urlsplit(s3_server.endpoint).netloc}\r\nIf-None-Match: *\r\n"
    if framing == "chunked":
        raw = (head + "Transfer-Encoding: chunked\r\n\r\n" + "a\r\n0123456789\r\n").encode()  # no last chunk
    else:
        raw = (head + "Content-Length: 1000\r\n\r\n").encode() + b"x" * 10
    send_and_hang_up(s3_server.endpoint, raw)  # the uploader is gone
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3_client.head_object(Bucket=s3_bucket, Key="out/cut.bin")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
