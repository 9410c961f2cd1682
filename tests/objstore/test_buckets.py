"""tasks.store's bucket adaptors, each test once on S3 (boto3 -> proxy -> moto) and once on
GCS (google-cloud-storage -> our emulator), asserting what a caller sees: results, bytes
on the server, files on disk, requests sent."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tasks.errors import StoreUnreachable
from tasks.store import Bucket, ObjectInfo, Prefix, Refused

from .backends import FAST

RACERS = 8  # threads racing one create
RACE_ROUNDS = 5
RACE_JOIN_S = 60  # the longest one racer may take
LISTED = 2345  # names listed: three pages
CHILD_TIMEOUT_S = 60
CONDITION_WAIT_S = 30  # how long a test waits for a server to see a request
POLL_S = 0.02
MIB = 1 << 20


def _clock_near(when: datetime, expected_s: float, *, within_s: float = 30) -> bool:
    return abs(when.timestamp() - expected_s) < within_s


# --- create only if absent -------------------------------------------------------------


def test_create_writes_once_and_refuses_the_second(backend):
    first = backend.bucket.create("claims/u1", b"owner-a")
    assert isinstance(first, ObjectInfo) and first.size == 7 and first.name == "claims/u1"
    assert backend.bucket.create("claims/u1", b"owner-b") == Refused("exists")
    assert backend.body("claims/u1") == b"owner-a"
    got = backend.bucket.get("claims/u1")
    assert got is not None and got.data == b"owner-a" and got.info.version == first.version


def test_two_concurrent_creators_of_one_name_exactly_one_wins(backend):
    backend.add_latency("create", 0.05)  # every racer's request in flight together
    racers = [backend.new() for _ in range(RACERS)]
    for round_ in range(RACE_ROUNDS):
        name = f"claims/race-{round_}"
        outcomes: list[object] = [None] * RACERS
        barrier = threading.Barrier(RACERS, timeout=RACE_JOIN_S)

        def one(i: int) -> None:
            barrier.wait()
            outcomes[i] = racers[i].create(name, f"racer-{i}".encode())

        threads = [threading.Thread(target=one, args=(i,)) for i in range(RACERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=RACE_JOIN_S)
        assert not any(t.is_alive() for t in threads)
        winners = [i for i, o in enumerate(outcomes) if isinstance(o, ObjectInfo)]
        assert len(winners) == 1, outcomes
        assert [o for o in outcomes if not isinstance(o, ObjectInfo)] == [Refused("exists")] * (RACERS - 1)
        assert backend.body(name) == f"racer-{winners[0]}".encode()
    for racer in racers:
        racer.close()


def test_a_lost_create_answer_is_recognised_as_ours_not_as_exists(backend):
    """The store wrote it, the answer was lost, the client retried and got 412: the object
    holds our bytes, so the create is ours. A peer's identical-looking refusal stays refused."""
    backend.fail_next("create", status=503, after_apply=True)
    ours = backend.bucket.create("claims/lost", b"owner-a #1")
    assert isinstance(ours, ObjectInfo)
    assert [r.status for r in backend.requests("create")][-2:] == [503, 412]
    assert ours.version == backend.bucket.stat("claims/lost").version
    assert backend.bucket.create("claims/lost", b"owner-b #1") == Refused("exists")


# --- compare and swap, delete if unchanged ---------------------------------------------


def test_replace_with_a_stale_version_fails_and_leaves_the_object_unchanged(backend):
    v1 = backend.bucket.create("claims/u2", b"lease-1 owner-a")
    assert isinstance(v1, ObjectInfo)
    v2 = backend.bucket.replace("claims/u2", b"lease-2 owner-a", version=v1.version)
    assert isinstance(v2, ObjectInfo) and v2.version != v1.version
    assert backend.bucket.replace("claims/u2", b"lease-1 taker-b", version=v1.version) == Refused("changed")
    assert backend.body("claims/u2") == b"lease-2 owner-a"
    assert backend.bucket.stat("claims/u2").version == v2.version
    assert backend.bucket.replace("claims/none", b"x", version=v1.version) == Refused("missing")
    assert backend.body("claims/none") is None


def test_delete_only_if_unchanged(backend):
    v1 = backend.bucket.create("claims/u3", b"v1")
    v2 = backend.bucket.replace("claims/u3", b"v2", version=v1.version)
    assert backend.bucket.delete("claims/u3", version=v1.version) is False
    assert backend.body("claims/u3") == b"v2"
    assert backend.bucket.delete("claims/u3", version=v2.version) is True
    assert backend.body("claims/u3") is None
    assert backend.bucket.delete("claims/u3") is True  # missing: gone already


# --- reads -----------------------------------------------------------------------------


def test_get_and_stat_of_a_missing_object_are_none(backend):
    assert backend.bucket.get("nothing/here") is None
    assert backend.bucket.stat("nothing/here") is None


def test_list_pages_over_more_than_1000_names_with_sizes_and_versions(backend):
    names = [f"out/{i:05d}.txt" for i in range(LISTED)]
    for i, name in enumerate(names):
        backend.seed(name, b"x" * (i % 7))
    for name in ("out/sub1/a", "out/sub1/b", "out/sub2/c", "other/x"):
        backend.seed(name, b"y")

    everything = list(backend.bucket.list("out/"))
    assert [e.name for e in everything] == sorted([*names, "out/sub1/a", "out/sub1/b", "out/sub2/c"])
    assert all(isinstance(e, ObjectInfo) for e in everything)
    sizes = {e.name: e.size for e in everything}
    assert [sizes[n] for n in names] == [i % 7 for i in range(LISTED)]
    assert len(backend.requests("list")) == 3  # 1,000 a page
    one = backend.bucket.stat(names[3])
    assert next(e for e in everything if e.name == names[3]).version == one.version

    shallow = list(backend.bucket.list("out/", delimiter=True))
    assert [e.name for e in shallow if isinstance(e, Prefix)] == ["out/sub1/", "out/sub2/"]
    assert sorted(e.name for e in shallow if isinstance(e, ObjectInfo)) == names
    assert len(backend.requests("list")) == 6


# --- upload only if absent, download atomically ----------------------------------------


def test_upload_if_absent_refuses_to_replace_an_existing_object(backend, tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(b"a late, stale upload")
    done = backend.bucket.upload(first, "out/k1.bin")
    assert isinstance(done, ObjectInfo) and done.size == 300_000
    assert backend.bucket.upload(second, "out/k1.bin") == Refused("exists")
    assert backend.body("out/k1.bin") == first.read_bytes()


def test_a_big_upload_goes_in_parts_and_is_still_only_if_absent(backend, tmp_path):
    """S3: a multipart upload completed with If-None-Match; GCS: a resumable upload in
    chunks. A second one is refused and leaves no upload behind on S3."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MIB))
    options = ({"multipart_threshold": 5 * MIB, "part_size": 5 * MIB} if backend.scheme == "s3"
               else {"upload_chunk": 4 * MIB})
    bucket = backend.new(**options)
    done = bucket.upload(big, "out/big.bin")
    assert isinstance(done, ObjectInfo) and done.size == 11 * MIB
    assert len(backend.requests("part")) == 3
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(6 * MIB))
    assert bucket.upload(other, "out/big.bin") == Refused("exists")
    assert backend.body("out/big.bin") == big.read_bytes()
    if backend.scheme == "s3":
        uploads = backend.server.client().list_multipart_uploads(Bucket=backend.bucket_name)
        assert uploads.get("Uploads", []) == []
    bucket.close()


def test_download_writes_the_whole_object_at_the_path(backend, tmp_path):
    data = os.urandom(500_000)
    backend.seed("in/a.bin", data)
    target = tmp_path / "cache" / "a.bin"
    info = backend.bucket.download("in/a.bin", target)
    assert isinstance(info, ObjectInfo) and info.size == len(data)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    assert backend.bucket.download("in/missing", tmp_path / "missing") is None
    assert not (tmp_path / "missing").exists()


def test_a_download_of_a_named_version_is_none_once_it_was_replaced(backend, tmp_path):
    v1 = backend.bucket.create("in/v", b"first")
    assert backend.bucket.download("in/v", tmp_path / "one", version=v1.version).version == v1.version
    assert (tmp_path / "one").read_bytes() == b"first"
    backend.bucket.replace("in/v", b"second", version=v1.version)
    assert backend.bucket.download("in/v", tmp_path / "two", version=v1.version) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_a_download_cut_once_is_retried_whole(backend, tmp_path):
    data = os.urandom(500_000)
    backend.seed("in/b.bin", data)
    backend.cut_next("download", after_bytes=100_000)
    target = tmp_path / "b.bin"
    backend.bucket.download("in/b.bin", target)
    assert target.read_bytes() == data
    assert [r.fault for r in backend.requests("download")][:1] == ["cut after 100000 bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin"]


def test_a_download_cut_every_time_leaves_nothing_at_the_path(backend, tmp_path):
    data = os.urandom(500_000)
    backend.seed("in/c.bin", data)
    # Cut before the first body byte: a cut after some bytes lets a client that resumes with a
    # Range (google-resumable-media does) make progress and, on a fast machine, finish in time.
    backend.cut_next("download", 1_000, after_bytes=0)
    target = tmp_path / "c.bin"
    with pytest.raises(StoreUnreachable, match=r"did not answer"):
        backend.bucket.download("in/c.bin", target)
    assert list(tmp_path.iterdir()) == []  # no half object, no temporary
    target.write_bytes(b"an older copy")
    with pytest.raises(StoreUnreachable):
        backend.bucket.download("in/c.bin", target)
    assert target.read_bytes() == b"an older copy"  # replaced whole or not at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin"]


_DOWNLOAD_CHILD = """
import sys
from pathlib import Path
from tasks.store import open_bucket
bucket = open_bucket(sys.argv[1])
print("started", flush=True)
bucket.download(sys.argv[2], Path(sys.argv[3]))
print("finished", flush=True)
"""


def test_a_download_killed_mid_way_leaves_nothing_at_the_path(backend, tmp_path):
    """A worker SIGKILLed while its download is under way (the server holds the answer):
    the final path never appears; only a hidden temporary may stay beside it."""
    backend.seed("in/d.bin", os.urandom(200_000))
    backend.add_latency("download", 20.0, count=1)
    target = tmp_path / "d.bin"
    url = f"{backend.scheme}://{backend.bucket_name}/"
    child = subprocess.Popen([sys.executable, "-c", _DOWNLOAD_CHILD, url, "in/d.bin", str(target)],
                             env={**os.environ, **backend.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + CONDITION_WAIT_S
        # The temporary is made just before the held GET goes out: the download is under way.
        while not any(p.name.startswith(".d.bin.") for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline and child.poll() is None, child.communicate(timeout=CHILD_TIMEOUT_S)
            time.sleep(POLL_S)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert not target.exists()
    assert all(p.name.startswith(".d.bin.") and p.name.endswith(".part") for p in tmp_path.iterdir())


# --- the store's clock, transient errors, pickling -------------------------------------


def test_the_clock_is_the_stores_not_this_machines(backend):
    backend.skew_clock(3600)
    backend.fail_next("check", status=503)  # a transient failure of the probe is retried
    assert _clock_near(backend.bucket.clock(), time.time() + 3600)
    assert [r.status for r in backend.requests("check")] == [503, 200]
    written = backend.bucket.create("clock/probe", b"probe")
    assert isinstance(written, ObjectInfo) and _clock_near(written.updated, time.time() + 3600)
    assert written.updated.tzinfo is not None
    backend.clear_faults()
    assert _clock_near(backend.bucket.clock(), datetime.now(timezone.utc).timestamp())


def test_a_transient_failure_is_retried_and_one_that_persists_is_bounded(backend):
    backend.fail_next("create", 2, status=503)
    assert isinstance(backend.bucket.create("claims/t1", b"x"), ObjectInfo)
    backend.fail_next("create", 1_000, status=503)
    started = time.monotonic()
    with pytest.raises(StoreUnreachable, match=r"kept failing|did not answer") as caught:
        backend.bucket.create("claims/t2", b"x")
    assert "run again" in str(caught.value)
    tries = [r for r in backend.requests("create") if r.key == "claims/t2"]
    if backend.scheme == "s3":
        assert len(tries) == FAST.attempts
    else:
        assert 2 <= len(tries) and time.monotonic() - started < FAST.deadline_s + 30
    assert backend.body("claims/t2") is None


def test_a_bucket_is_a_bucket_and_pickles_without_its_connection(backend):
    assert isinstance(backend.bucket, Bucket)
    backend.bucket.create("claims/p", b"before")
    copy = pickle.loads(pickle.dumps(backend.bucket))
    assert copy.get("claims/p").data == b"before"
    copy.close()


def test_s3_conditional_request_conflicts_are_tried_again(s3_server, s3_bucket, s3_env):
    """S3 answers 409 ConditionalRequestConflict while another conditional write to the key
    is under way (botocore does not retry it): tried again a bounded number of times.
    (GCS decides every precondition at once: no such answer.)"""
    from tasks.store.bucket import CONFLICT_RETRIES
    from tasks.store.s3 import S3Bucket

    bucket = S3Bucket(s3_bucket, retries=FAST)
    s3_server.proxy.fail_next(CONFLICT_RETRIES, status=409, operation="PutObject")
    assert isinstance(bucket.create("claims/c1", b"x"), ObjectInfo)
    s3_server.proxy.fail_next(CONFLICT_RETRIES + 1, status=409, operation="PutObject")
    with pytest.raises(StoreUnreachable, match="ConditionalRequestConflict"):
        bucket.create("claims/c2", b"x")
    tries = s3_server.proxy.requests.select(bucket=s3_bucket, key="^claims/c2$")
    assert [r.status for r in tries] == [409] * (CONFLICT_RETRIES + 1)
    bucket.close()
