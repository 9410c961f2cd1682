"""The GCS emulator, driven through the real google-cloud-storage client (and raw HTTP where
the client never sends a request form, such as uploadType=media)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from google.api_core import exceptions as gexc
from google.api_core.exceptions import RetryError
from google.cloud.storage.retry import DEFAULT_RETRY

from .gcs_emulator import LIST_PAGE_MAX, GcsEmulator

RACERS = 8  # threads racing one create
RACE_ROUNDS = 10
FAST_RETRY = DEFAULT_RETRY.with_delay(initial=0.01, maximum=0.05).with_timeout(2.0)  # a bounded retry for tests
CHILD_TIMEOUT_S = 60


def _upload(client, bucket: str, name: str, data: bytes, **kw) -> int:
    blob = client.bucket(bucket).blob(name)
    blob.upload_from_string(data, **kw)
    return blob.generation


# --- preconditions -------------------------------------------------------------------


def test_second_create_with_if_generation_match_0_fails_and_keeps_the_first(gcs_server, gcs_client, gcs_bucket):
    first = _upload(gcs_client, gcs_bucket, "claims/u1", b"owner-a", if_generation_match=0)

    with pytest.raises(gexc.PreconditionFailed) as caught:
        _upload(gcs_client, gcs_bucket, "claims/u1", b"owner-b", if_generation_match=0)

    assert caught.value.code == 412
    assert "conditionNotMet" in str(caught.value)  # GCS's error body reached the client
    stored = gcs_server.get(gcs_bucket, "claims/u1")
    assert (stored.data, stored.generation) == (b"owner-a", first)


def test_compare_and_swap_succeeds_once_and_refuses_the_stale_generation(gcs_server, gcs_client, gcs_bucket):
    g1 = _upload(gcs_client, gcs_bucket, "claims/u2", b"lease-1", if_generation_match=0)
    g2 = _upload(gcs_client, gcs_bucket, "claims/u2", b"lease-2", if_generation_match=g1)
    assert g2 > g1

    with pytest.raises(gexc.PreconditionFailed):
        _upload(gcs_client, gcs_bucket, "claims/u2", b"stale-taker", if_generation_match=g1)

    # The same bytes again still make a new generation: a generation names a write, not content.
    g3 = _upload(gcs_client, gcs_bucket, "claims/u2", b"lease-2", if_generation_match=g2)
    assert g3 > g2
    with pytest.raises(gexc.PreconditionFailed):
        _upload(gcs_client, gcs_bucket, "claims/u2", b"lease-2", if_generation_match=g2)
    assert gcs_server.get(gcs_bucket, "claims/u2").generation == g3


def test_generation_match_on_a_missing_object_is_precondition_failed(gcs_server, gcs_client, gcs_bucket):
    with pytest.raises(gexc.PreconditionFailed):
        _upload(gcs_client, gcs_bucket, "nothing-here", b"x", if_generation_match=12345)
    with pytest.raises(gexc.PreconditionFailed):  # "no live object": a NotMatch fails too
        _upload(gcs_client, gcs_bucket, "nothing-here", b"x", if_generation_not_match=0)
    with pytest.raises(gexc.PreconditionFailed):
        _upload(gcs_client, gcs_bucket, "nothing-here", b"x", if_metageneration_match=1)
    assert gcs_server.get(gcs_bucket, "nothing-here") is None


def test_generation_not_match_answers_not_modified(gcs_client, gcs_bucket):
    gen = _upload(gcs_client, gcs_bucket, "obj", b"v1")
    blob = gcs_client.bucket(gcs_bucket).blob("obj")

    with pytest.raises(gexc.NotModified):
        blob.reload(if_generation_not_match=gen)
    with pytest.raises(gexc.NotModified):
        blob.download_as_bytes(if_generation_not_match=gen)
    assert blob.download_as_bytes(if_generation_not_match=gen - 1) == b"v1"
    with pytest.raises(gexc.NotModified):
        _upload(gcs_client, gcs_bucket, "obj", b"v2", if_generation_not_match=gen)
    assert _upload(gcs_client, gcs_bucket, "obj", b"v2", if_generation_not_match=0) > gen


def test_racing_creates_have_exactly_one_winner(gcs_server, gcs_client, gcs_bucket):
    # Every insert waits in the server first, so all racers are in flight together.
    gcs_server.add_latency(0.05, kind="objects.insert")
    for round_ in range(RACE_ROUNDS):
        name = f"claims/race-{round_}"
        barrier = threading.Barrier(RACERS)
        outcomes: dict[int, str] = {}

        def race(racer: int) -> None:
            barrier.wait()
            try:
                _upload(gcs_client, gcs_bucket, name, f"racer-{racer}".encode(), if_generation_match=0)
                outcomes[racer] = "won"
            except gexc.PreconditionFailed:
                outcomes[racer] = "412"

        threads = [threading.Thread(target=race, args=(i,)) for i in range(RACERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        winners = [r for r, outcome in outcomes.items() if outcome == "won"]
        assert len(outcomes) == RACERS and sorted(Counter(outcomes.values()).items()) == [("412", RACERS - 1), ("won", 1)]
        assert gcs_server.get(gcs_bucket, name).data == f"racer-{winners[0]}".encode()


def test_delete_with_a_stale_generation_is_refused(gcs_server, gcs_client, gcs_bucket):
    g1 = _upload(gcs_client, gcs_bucket, "claims/u3", b"a")
    g2 = _upload(gcs_client, gcs_bucket, "claims/u3", b"b")
    blob = gcs_client.bucket(gcs_bucket).blob("claims/u3")

    with pytest.raises(gexc.PreconditionFailed):
        blob.delete(if_generation_match=g1)
    assert gcs_server.get(gcs_bucket, "claims/u3").data == b"b"

    blob.delete(if_generation_match=g2)
    assert gcs_server.get(gcs_bucket, "claims/u3") is None
    with pytest.raises(gexc.NotFound):
        blob.delete()


def test_metadata_patch_with_a_stale_metageneration_is_refused(gcs_server, gcs_client, gcs_bucket):
    gen = _upload(gcs_client, gcs_bucket, "obj", b"data")
    blob = gcs_client.bucket(gcs_bucket).get_blob("obj")
    blob.metadata = {"owner": "vm-1"}
    blob.patch(if_metageneration_match=1)
    assert (blob.generation, blob.metageneration, blob.metadata) == (gen, 2, {"owner": "vm-1"})

    stale = gcs_client.bucket(gcs_bucket).blob("obj")
    stale.metadata = {"owner": "vm-2"}
    with pytest.raises(gexc.PreconditionFailed):
        stale.patch(if_metageneration_match=1)
    assert dict(gcs_server.get(gcs_bucket, "obj").metadata) == {"owner": "vm-1"}


# --- uploads and downloads -----------------------------------------------------------


def test_an_upload_above_8_mib_is_resumable_and_checks_its_condition(gcs_server, gcs_client, gcs_bucket):
    data = os.urandom(9 * 1024 * 1024)  # the client goes resumable above 8 MiB
    gen = _upload(gcs_client, gcs_bucket, "out/big.bin", data, if_generation_match=0)
    kinds = [r.kind for r in gcs_server.requests.select(bucket=gcs_bucket, key="^out/big.bin$")]
    assert kinds == ["objects.insert", "objects.insert.chunk"]  # one PUT of 9 MiB (chunk size 100 MiB)
    assert gcs_server.get(gcs_bucket, "out/big.bin").data == data

    with pytest.raises(gexc.PreconditionFailed):  # refused when the session starts: no byte sent
        _upload(gcs_client, gcs_bucket, "out/big.bin", data, if_generation_match=0)
    assert gcs_server.get(gcs_bucket, "out/big.bin").generation == gen
    assert [r.kind for r in gcs_server.requests.select(bucket=gcs_bucket, key="^out/big.bin$")][2:] == ["objects.insert"]


def test_a_resumable_upload_in_chunks_rechecks_its_condition_at_the_end(gcs_server, gcs_client, gcs_bucket):
    data = os.urandom(9 * 1024 * 1024 + 5)  # at most 8 MiB goes multipart whatever the chunk size
    blob = gcs_client.bucket(gcs_bucket).blob("out/chunked.bin", chunk_size=1024 * 1024)
    blob.upload_from_string(data, if_generation_match=0)
    chunks = gcs_server.requests.select(kind="objects.insert.chunk", bucket=gcs_bucket)
    assert [r.status for r in chunks] == [308] * 9 + [200]
    assert gcs_client.bucket(gcs_bucket).blob("out/chunked.bin").download_as_bytes() == data

    # A peer publishes while our session is open: our last byte is refused with 412.
    url = gcs_client.bucket(gcs_bucket).blob("out/late.bin").create_resumable_upload_session(if_generation_match=0)
    gcs_server.put(gcs_bucket, "out/late.bin", b"the peer's output")
    request = urllib.request.Request(url, data=b"ours", method="PUT", headers={"Content-Range": "bytes 0-3/4"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 412
    assert json.loads(caught.value.read())["error"]["errors"][0]["reason"] == "conditionNotMet"
    assert gcs_server.get(gcs_bucket, "out/late.bin").data == b"the peer's output"


def test_a_simple_media_upload_honours_if_generation_match(gcs_server, gcs_bucket):
    url = f"{gcs_server.endpoint}/upload/storage/v1/b/{gcs_bucket}/o?uploadType=media&name=a%2Fb.txt&ifGenerationMatch=0"

    def post() -> tuple[int, dict]:
        request = urllib.request.Request(url, data=b"hello", method="POST", headers={"Content-Type": "text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, resource = post()
    assert status == 200 and resource["name"] == "a/b.txt" and resource["contentType"] == "text/plain"
    assert resource["size"] == "5" and int(resource["generation"]) == gcs_server.get(gcs_bucket, "a/b.txt").generation
    status, error = post()
    assert status == 412
    assert error["error"]["message"] == "At least one of the pre-conditions you specified did not hold."


def test_ranged_downloads(gcs_client, gcs_bucket):
    data = bytes(range(256)) * 4
    _upload(gcs_client, gcs_bucket, "r.bin", data)
    blob = gcs_client.bucket(gcs_bucket).blob("r.bin")

    assert blob.download_as_bytes(start=10, end=19) == data[10:20]
    assert blob.download_as_bytes(start=1000) == data[1000:]
    assert blob.download_as_bytes(end=3) == data[:4]
    assert blob.download_as_bytes() == data
    with pytest.raises(gexc.RequestRangeNotSatisfiable):
        blob.download_as_bytes(start=len(data) + 10)


def test_list_pages_hold_at_most_1000_entries_with_prefix_and_delimiter(gcs_server, gcs_client, gcs_bucket):
    outputs = {f"out/{i:05d}.txt" for i in range(2345)}
    for name in [*outputs, "out/sub1/a", "out/sub1/b", "out/sub2/c", "other/x", "out"]:
        gcs_server.put(gcs_bucket, name, b"x")

    it = gcs_client.list_blobs(gcs_bucket, prefix="out/", delimiter="/")
    sizes = []
    names = []
    for page in it.pages:
        items = list(page)
        names += [b.name for b in items]
        sizes.append(len(items) + len(page.prefixes))
    assert set(names) == outputs and names == sorted(names)
    assert it.prefixes == {"out/sub1/", "out/sub2/"}
    assert sizes == [LIST_PAGE_MAX, LIST_PAGE_MAX, 2347 - 2 * LIST_PAGE_MAX]
    lists = gcs_server.requests.select(kind="objects.list", bucket=gcs_bucket)
    assert len(lists) == 3 and "pageToken" not in lists[0].query and all("pageToken" in r.query for r in lists[1:])

    small = gcs_client.list_blobs(gcs_bucket, prefix="out/", page_size=700)
    assert [len(list(page)) for page in small.pages] == [700, 700, 700, 248]
    everything = {b.name for b in gcs_client.list_blobs(gcs_bucket)}
    assert len(everything) == 2345 + 5
    window = [b.name for b in gcs_client.list_blobs(gcs_bucket, start_offset="out/00010", end_offset="out/00013")]
    assert window == ["out/00010.txt", "out/00011.txt", "out/00012.txt"]


def test_rewrite_and_copy_honour_the_destination_generation(gcs_server, gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    _upload(gcs_client, gcs_bucket, "src", b"source", content_type="text/plain")
    copied = bucket.copy_blob(bucket.blob("src"), bucket, "dst", if_generation_match=0)
    assert copied.download_as_bytes() == b"source" and copied.content_type == "text/plain"
    with pytest.raises(gexc.PreconditionFailed):
        bucket.copy_blob(bucket.blob("src"), bucket, "dst", if_generation_match=0)

    token, done, total = bucket.blob("dst2").rewrite(bucket.blob("src"), if_generation_match=0)
    assert (token, done, total) == (None, 6, 6)
    with pytest.raises(gexc.PreconditionFailed):
        bucket.blob("dst2").rewrite(bucket.blob("src"), if_generation_match=0)
    assert gcs_server.get(gcs_bucket, "dst2").data == b"source"


def test_missing_buckets_and_objects_are_not_found(gcs_client):
    with pytest.raises(gexc.NotFound):
        gcs_client.get_bucket("no-such-bucket")
    with pytest.raises(gexc.NotFound):
        gcs_client.bucket("no-such-bucket").blob("x").upload_from_string(b"x", if_generation_match=0)
    with pytest.raises(gexc.NotFound):
        list(gcs_client.list_blobs("no-such-bucket"))
    assert gcs_client.lookup_bucket("no-such-bucket") is None


def test_a_missing_object_is_not_found(gcs_client, gcs_bucket):
    blob = gcs_client.bucket(gcs_bucket).blob("missing")
    assert not blob.exists()
    with pytest.raises(gexc.NotFound):
        blob.download_as_bytes()
    assert gcs_client.bucket(gcs_bucket).get_blob("missing") is None


def test_buckets_are_created_once_and_deleted_only_when_empty(gcs_server, gcs_client):
    bucket = gcs_client.create_bucket("spotfan-made-by-client")
    assert gcs_client.get_bucket("spotfan-made-by-client").name == bucket.name
    with pytest.raises(gexc.Conflict):
        gcs_client.create_bucket("spotfan-made-by-client")
    gcs_server.put("spotfan-made-by-client", "x", b"x")
    with pytest.raises(gexc.Conflict):
        bucket.delete()
    bucket.blob("x").delete()
    bucket.delete()
    assert gcs_client.lookup_bucket("spotfan-made-by-client") is None


def test_what_the_emulator_does_not_emulate_is_refused_not_ignored(gcs_server, gcs_client, gcs_bucket):
    with pytest.raises(gexc.BadRequest, match="versioning is not emulated"):
        list(gcs_client.list_blobs(gcs_bucket, versions=True))
    with pytest.raises(gexc.BadRequest, match="matchGlob"):
        list(gcs_client.list_blobs(gcs_bucket, match_glob="**.txt"))
    request = urllib.request.Request(f"{gcs_server.endpoint}/storage/v1/b/{gcs_bucket}/o/a/b", method="GET")
    with pytest.raises(urllib.error.HTTPError) as caught:  # an unencoded '/' in a name
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 404 and "percent-encoded" in caught.value.read().decode()


# --- faults --------------------------------------------------------------------------


def test_a_503_on_a_create_is_retried_by_the_client(gcs_server, gcs_client, gcs_bucket):
    gcs_server.fail_next(1, status=503, kind="objects.insert")
    _upload(gcs_client, gcs_bucket, "claims/u4", b"x", if_generation_match=0)
    inserts = gcs_server.requests.select(kind="objects.insert", bucket=gcs_bucket)
    assert [(r.status, r.fault) for r in inserts] == [(503, "503"), (200, None)]


def test_a_503_that_persists_surfaces(gcs_server, gcs_client, gcs_bucket):
    _upload(gcs_client, gcs_bucket, "obj", b"x")
    blob = gcs_client.bucket(gcs_bucket).blob("obj")
    gcs_server.fail_next(1, status=503, kind="objects.get")
    with pytest.raises(gexc.ServiceUnavailable, match="internal error"):
        blob.reload(retry=None)

    gcs_server.fail_next(10_000, status=503, kind="objects.get")
    with pytest.raises(RetryError) as caught:  # after the retry's deadline, wrapping the last 503
        blob.reload(retry=FAST_RETRY)
    assert isinstance(caught.value.cause, gexc.ServiceUnavailable)
    assert len(gcs_server.requests.select(kind="objects.get", bucket=gcs_bucket)) > 2


def test_a_429_is_retried_by_the_client(gcs_server, gcs_client, gcs_bucket):
    _upload(gcs_client, gcs_bucket, "obj", b"x")
    gcs_server.fail_next(2, status=429, kind="objects.download")
    assert gcs_client.bucket(gcs_bucket).blob("obj").download_as_bytes(retry=FAST_RETRY) == b"x"
    assert [r.status for r in gcs_server.requests.select(kind="objects.download", bucket=gcs_bucket)] == [429, 429, 200]

    gcs_server.fail_next(1, status=429, kind="objects.get")
    with pytest.raises(gexc.TooManyRequests) as caught:
        gcs_client.bucket(gcs_bucket).blob("obj").reload(retry=None)
    assert caught.value.errors[0]["reason"] == "rateLimitExceeded"


def test_a_lost_create_response_comes_back_as_precondition_failed(gcs_server, gcs_client, gcs_bucket):
    """The trap for claims: the create happened, its answer was lost, the client retried
    by itself, and the retry met our own object. A 412 on a create does not prove a peer won."""
    gcs_server.fail_next(1, status=503, kind="objects.insert", after_apply=True)
    with pytest.raises(gexc.PreconditionFailed):
        _upload(gcs_client, gcs_bucket, "claims/u5", b"ours", if_generation_match=0)
    assert gcs_server.get(gcs_bucket, "claims/u5").data == b"ours"
    inserts = gcs_server.requests.select(kind="objects.insert", bucket=gcs_bucket)
    assert [(r.status, r.fault) for r in inserts] == [(503, "503 after apply"), (412, None)]


def test_a_resumable_upload_survives_a_lost_final_response(gcs_server, gcs_client, gcs_bucket):
    """Unlike a multipart create, a resumable session remembers it finished: the client's
    retry of the last chunk gets the object, not a 412."""
    data = os.urandom(9 * 1024 * 1024)
    gcs_server.fail_next(1, status=503, kind="objects.insert.chunk", after_apply=True)
    gen = _upload(gcs_client, gcs_bucket, "out/big.bin", data, if_generation_match=0)
    assert gcs_server.get(gcs_bucket, "out/big.bin").generation == gen
    chunks = gcs_server.requests.select(kind="objects.insert.chunk", bucket=gcs_bucket)
    assert [(r.status, r.fault) for r in chunks] == [(503, "503 after apply"), (200, None)]


def test_a_lost_delete_response_comes_back_as_not_found(gcs_server, gcs_client, gcs_bucket):
    _upload(gcs_client, gcs_bucket, "obj", b"x")
    gcs_server.fail_next(1, status=503, kind="objects.delete", after_apply=True)
    with pytest.raises(gexc.NotFound):
        gcs_client.bucket(gcs_bucket).blob("obj").delete()
    assert gcs_server.get(gcs_bucket, "obj") is None


def test_a_403_names_the_missing_permission(gcs_server, gcs_client, gcs_bucket):
    gcs_server.fail_next(1, status=403, kind="objects.insert")
    with pytest.raises(gexc.Forbidden) as caught:
        _upload(gcs_client, gcs_bucket, "x", b"x", if_generation_match=0)
    assert "does not have storage.objects.create access" in str(caught.value)
    assert "Permission 'storage.objects.create' denied" in str(caught.value)

    gcs_server.fail_next(1, status=403, kind="objects.list")
    with pytest.raises(gexc.Forbidden) as caught:
        list(gcs_client.list_blobs(gcs_bucket))
    assert caught.value.errors[0]["reason"] == "forbidden"
    assert "storage.objects.list access to the Google Cloud Storage bucket" in caught.value.message


def test_overwriting_needs_the_delete_permission(gcs_server, gcs_client, gcs_bucket):
    _upload(gcs_client, gcs_bucket, "existing", b"v1")
    gcs_server.deny("storage.objects.delete")  # roles/storage.objectCreator, say

    assert _upload(gcs_client, gcs_bucket, "new", b"v1") > 0  # creating is still allowed
    with pytest.raises(gexc.Forbidden, match="storage.objects.delete"):
        _upload(gcs_client, gcs_bucket, "existing", b"v2")
    with pytest.raises(gexc.Forbidden, match="storage.objects.delete"):
        gcs_client.bucket(gcs_bucket).blob("existing").delete()
    assert gcs_server.get(gcs_bucket, "existing").data == b"v1"

    gcs_server.clear_faults()
    assert _upload(gcs_client, gcs_bucket, "existing", b"v2") > 0


def test_latency_is_added_and_recorded(gcs_server, gcs_client, gcs_bucket):
    _upload(gcs_client, gcs_bucket, "obj", b"x")
    gcs_server.add_latency(0.3, kind="objects.download", count=1)
    started = time.monotonic()
    gcs_client.bucket(gcs_bucket).blob("obj").download_as_bytes()
    assert time.monotonic() - started >= 0.3
    gcs_client.bucket(gcs_bucket).blob("obj").download_as_bytes()
    downloads = gcs_server.requests.select(kind="objects.download", bucket=gcs_bucket)
    assert [r.seconds_delayed for r in downloads] == [0.3, 0.0]


def test_requests_are_counted_by_kind(gcs_server, gcs_client, gcs_bucket):
    bucket = gcs_client.bucket(gcs_bucket)
    bucket.blob("claims/k1").upload_from_string(b"claim", if_generation_match=0)
    bucket.blob("out/k1").upload_from_string(b"output", if_generation_match=0)
    assert bucket.blob("out/k1").exists()
    assert bucket.blob("out/k1").download_as_bytes() == b"output"
    assert [b.name for b in gcs_client.list_blobs(gcs_bucket, prefix="out/")] == ["out/k1"]
    bucket.blob("claims/k1").delete()

    counts = gcs_server.requests.counts(bucket=gcs_bucket)
    assert Counter({k: n for k, n in counts.items() if k.startswith("objects.")}) == Counter(
        {"objects.insert": 2, "objects.get": 1, "objects.download": 1, "objects.list": 1, "objects.delete": 1})
    # The client's bucket-metadata cache (for its telemetry) may fetch the bucket once, in
    # the background: a request spotfan does not make but a request count must expect.
    assert set(counts) - {k for k in counts if k.startswith("objects.")} <= {"buckets.get"}
    assert counts["buckets.get"] <= 1


def test_a_child_process_reaches_the_emulator_with_env_alone(gcs_server, gcs_bucket):
    code = (
        "from google.cloud import storage\n"
        "c = storage.Client()\n"
        "b = c.bucket(%r)\n"
        "b.blob('from-child').upload_from_string(b'hi', if_generation_match=0)\n"
        "print(c.project, b.blob('from-child').download_as_bytes().decode())\n"
    ) % gcs_bucket
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "STORAGE_EMULATOR"))}
    done = subprocess.run([sys.executable, "-c", code], env={**env, **gcs_server.env}, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [gcs_server.project, "hi"]
    assert gcs_server.get(gcs_bucket, "from-child").data == b"hi"


def test_the_emulator_shuts_down_cleanly():
    with GcsEmulator() as emulator:
        emulator.create_bucket("b-1")
        endpoint = emulator.endpoint
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{endpoint}/storage/v1/b/b-1", timeout=5)


# --- the cut and clock knobs -------------------------------------------------------------


def _raw_get(url: str) -> tuple[int, int, bytes, str | None]:
    """(status, declared Content-Length, the body bytes that arrived, Date) of one plain GET."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CHILD_TIMEOUT_S)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}")
        response = conn.getresponse()
        declared = int(response.getheader("Content-Length"))
        try:
            body = response.read()
        except http.client.IncompleteRead as e:
            body = e.partial
        return response.status, declared, body, response.getheader("Date")
    finally:
        conn.close()


def test_cut_next_sends_part_of_the_body_and_closes(gcs_server, gcs_bucket):
    data = os.urandom(100_000)
    gcs_server.put(gcs_bucket, "out/cut", data)
    media = f"{gcs_server.endpoint}/download/storage/v1/b/{gcs_bucket}/o/out%2Fcut?alt=media"
    gcs_server.cut_next(1, after_bytes=1234, kind="objects.download", key="^out/cut$")
    assert _raw_get(media)[:3] == (200, len(data), data[:1234])
    assert _raw_get(media)[2] == data  # one cut only
    downloads = gcs_server.requests.select(kind="objects.download", bucket=gcs_bucket)
    assert [r.fault for r in downloads] == ["cut after 1234 bytes", None]


def test_skew_clock_moves_the_date_header_and_object_times(gcs_server, gcs_client, gcs_bucket):
    from email.utils import parsedate_to_datetime

    gcs_server.skew_clock(3600)
    date = _raw_get(f"{gcs_server.endpoint}/storage/v1/b/{gcs_bucket}?fields=name")[3]
    assert abs(parsedate_to_datetime(date).timestamp() - (time.time() + 3600)) < 30
    blob = gcs_client.bucket(gcs_bucket).blob("skewed")
    blob.upload_from_string(b"x", if_generation_match=0)
    assert abs(blob.updated.timestamp() - (time.time() + 3600)) < 30
    gcs_server.clear_faults()
    date = _raw_get(f"{gcs_server.endpoint}/storage/v1/b/{gcs_bucket}?fields=name")[3]
    assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 30


def test_an_upload_cut_off_mid_body_stores_nothing(gcs_server, gcs_bucket):
    # As GCS does: an uploader killed mid-body leaves no object, not a short one.
    from urllib.parse import urlsplit

    from .loopback import send_and_hang_up

    raw = (f"POST /upload/storage/v1/b/{gcs_bucket}/o?uploadType=media&name=out%2Fcut.bin&ifGenerationMatch=0 "
           f"HTTP/1.1\r\nHost: {urlsplit(gcs_server.endpoint).netloc}\r\nContent-Type: application/octet-stream\r\n"
           "Content-Length: 1000\r\n\r\n").encode() + b"x" * 10
    send_and_hang_up(gcs_server.endpoint, raw)  # the uploader is gone
    assert gcs_server.get(gcs_bucket, "out/cut.bin") is None
