"""End to end with no head machine: `[share] kind = "s3"`, 4 lab VMs on a bucket of moto (127.0.0.1),
inputs sent by `fab push`, a task over the bucket root through `fab run`, 2 VMs preempted mid-run,
`fab heal`, every output exact in the bucket (and through `fab pull`), and after `fab down` no VM
process and no mount left, the bucket kept."""
from __future__ import annotations

import collections
import json
import re
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from labs import FIXTURES, REPO, lab_processes

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from objstore.s3_fault_proxy import S3FaultProxy  # noqa: E402

KEYS = 64
WORKERS_PER_VM = 2
PREEMPTED = 2
PREFIX = "fleet"
RUN_TIMEOUT_S = 120
S3_KEY = "testing"  # moto's: no real key is ever used


@dataclass(frozen=True)
class LocalS3:
    """moto behind the fault proxy (one conditional write at a time, as S3 decides them), on 127.0.0.1."""

    endpoint: str
    proxy: S3FaultProxy  # faults armed by a test are cleared after it
    env: dict[str, str]  # what boto3 (the laptop's fab, and through store.env the lab's VMs) needs

    def client(self) -> Any:
        import boto3

        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                              aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY)


@pytest.fixture(scope="module")
def local_s3() -> Iterator[LocalS3]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        with S3FaultProxy(upstream=f"http://{host}:{port}") as proxy:
            yield LocalS3(proxy.endpoint, proxy, {
                "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    finally:
        moto.stop()


def payload(i: int) -> str:
    return f"input {i}\n" + "spotfan " * 64 + "\n"


def names(s3: Any, bucket: str, prefix: str) -> list[str]:
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return out


def body(s3: Any, bucket: str, key: str) -> str:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def mounts_under(folder: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.strip() for ln in f if str(folder) in ln]


def test_headless_fleet_on_s3_preempt_two_then_heal(monkeypatch, local_s3, make_lab):
    for k, v in local_s3.env.items():
        monkeypatch.setenv(k, v)
    s3 = local_s3.client()
    bucket = f"spotfan-fleet-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/{PREFIX}"
    lab = make_lab(workers=4, workers_per_vm=WORKERS_PER_VM, idle_timeout=120, share_url=root)
    assert lab.share is None and lab.config.head is None
    local = lab.folder / "in"
    local.mkdir()
    for i in range(KEYS):
        (local / f"{i:04d}.txt").write_text(payload(i))
    pushed = lab.fab_ok("push", str(local))  # `fab push` talks to the bucket: no head to go through
    assert f"pushed {KEYS} file(s)" in pushed and "-> in" in pushed, pushed
    assert sorted(names(s3, bucket, f"{PREFIX}/in/")) == [f"{PREFIX}/in/{i:04d}.txt" for i in range(KEYS)]

    t0 = time.monotonic()
    up = lab.fab_ok("up")
    print(f"fab up: {time.monotonic() - t0:.1f}s")
    assert up.count("agent: ok (started") == 4, up
    assert up.count(f"store: ok ({root}") == 4, up
    assert "mount:" not in up, "a headless VM mounts nothing"
    assert mounts_under(lab.folder) == []
    for vm in lab.config.vm_names():  # no key for a head was copied: there is no head
        home = lab.provider.vm_home(vm)
        assert not (home / "worker_key").exists() and (home / "store.env").stat().st_mode & 0o077 == 0

    work, markers = FIXTURES / "lab_work.sh", lab.folder / "starts"  # lab VMs see this machine's files
    out = lab.fab_ok("run", f"sh {work} {{src}} {{out}} {markers}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
                     "--lease", "5")
    run_id = re.search(r"run (r[\w-]+) requested", out).group(1)
    assert names(s3, bucket, f"{PREFIX}/.spotfan/cluster/runs/{run_id}.json"), "the request is in the bucket"

    def outputs() -> list[str]:
        return names(s3, bucket, f"{PREFIX}/out/")

    lab.wait_for("a quarter of the outputs", lambda: len(outputs()) >= KEYS // 4, timeout=60)
    victims = lab.preempt(PREEMPTED)

    healed = lab.fab_ok("heal")
    for v in victims:
        assert re.search(rf"{v}: started;.*store: ok", healed), healed

    done_key = f"{PREFIX}/.spotfan/cluster/runs/{run_id}.done.json"
    lab.wait_for("the run to finish", lambda: bool(names(s3, bucket, done_key)), timeout=RUN_TIMEOUT_S)
    print(f"run done: {time.monotonic() - t0:.1f}s")
    record = json.loads(body(s3, bucket, done_key))
    assert record["result"] == "done", record

    # Exact output set in the bucket, every output whole.
    assert sorted(outputs()) == [f"{PREFIX}/out/{i:04d}.txt" for i in range(KEYS)]
    for i in range(KEYS):
        assert body(s3, bucket, f"{PREFIX}/out/{i:04d}.txt") == payload(i) * 5, f"output {i} is torn"

    # Duplicates: at most what was in flight on the preempted VMs ran twice, from the engine's
    # per-execution logs in the bucket and from the task's own start markers on each VM's disk.
    # On a bucket a worker uploads each key as it finishes (in a thread, while it runs the next)
    # and the runner logs a chunk when the chunk returns: in flight per preempted worker are a
    # running key and one finished but not yet uploaded; and a preempted VM's published keys
    # of its unfinished chunk are not logged.
    in_flight_bound = 2 * PREEMPTED * WORKERS_PER_VM
    rows = [json.loads(line) for key in names(s3, bucket, f"{PREFIX}/.spotfan/tasks/") if key.endswith(".jsonl")
            and "/log/" in key for line in body(s3, bucket, key).splitlines() if line.strip()]
    per_key = collections.Counter(r["key"] for r in rows if r["ok"])
    started_on = collections.defaultdict(set)  # key -> hosts that started it (marker: NAME.txt.HOST.PID)
    for p in markers.iterdir():
        name, _, rest = p.name.partition(".txt.")
        started_on[f"{name}.txt"].add(rest.rsplit(".", 1)[0])
    unlogged = {f"{i:04d}.txt" for i in range(KEYS)} - set(per_key)
    assert all(started_on[k] & set(victims) for k in unlogged), (unlogged, victims)
    assert 0 <= sum(per_key.values()) - len(per_key) <= in_flight_bound
    starts = collections.Counter(p.name.split(".txt.")[0] for p in markers.iterdir())
    assert set(starts) == {f"{i:04d}" for i in range(KEYS)}
    assert 0 <= sum(starts.values()) - KEYS <= in_flight_bound
    assert set(lab.config.vm_names()) <= {r["host"] for r in rows}, "every VM, the healed ones too, did work"

    pulled = lab.folder / "pulled"
    assert f"pulled {KEYS} file(s)" in lab.fab_ok("pull", "out", "--to", str(pulled))
    assert {p.name: p.read_text() for p in pulled.iterdir()} == {f"{i:04d}.txt": payload(i) * 5 for i in range(KEYS)}

    status = lab.fab_ok("status")
    assert re.search(rf"run {run_id}: done: {KEYS}/{KEYS} done, 0 failed", status), status
    logs = lab.fab_ok("logs", victims[0])
    assert f"==> {victims[0]}/agent.log" in logs and f"{run_id}.log" in logs

    down = lab.fab_ok("down")
    print(f"down: {time.monotonic() - t0:.1f}s")
    assert "deleted 4 VMs" in down, down
    assert f"left everything in {root}: your inputs and outputs (in, out) are never deleted" in down, down
    assert lab.statuses() == {}
    assert lab_processes(lab.folder) == [], "fab down must leave no VM process behind"
    assert mounts_under(lab.folder) == []
    assert len(outputs()) == KEYS and len(names(s3, bucket, f"{PREFIX}/in/")) == KEYS, "the bucket is the user's"


def test_push_and_pull_talk_to_the_bucket(monkeypatch, local_s3, make_lab):
    """`fab push`/`fab pull` on a headless cluster (no VM needed): whole objects, a second push copies
    nothing, an object with other bytes is never replaced, a pull skips what it has."""
    for k, v in local_s3.env.items():
        monkeypatch.setenv(k, v)
    s3 = local_s3.client()
    bucket = f"spotfan-files-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    lab = make_lab(workers=1, share_url=f"s3://{bucket}/p")
    local = lab.folder / "data"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("a\n")
    (local / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    assert "pushed 2 file(s)" in lab.fab_ok("push", str(local), "--to", "inputs")
    assert sorted(names(s3, bucket, "p/")) == ["p/inputs/a.txt", "p/inputs/sub/b.bin"]
    again = lab.fab_ok("push", str(local), "--to", "inputs")
    assert "pushed 0 file(s)" in again and "2 already there" in again, again
    (local / "a.txt").write_text("changed\n")
    r = lab.fab("push", str(local), "--to", "inputs")
    assert r.returncode == 1, r
    assert f"s3://{bucket}/p/inputs/a.txt is there with 2 bytes, this file has 8: not replaced" in r.stdout, r
    assert body(s3, bucket, "p/inputs/a.txt") == "a\n"
    r = lab.fab("push", str(local), "--checksum")
    assert r.returncode == 2 and "--checksum compares files over SFTP" in r.stderr, r
    out = lab.folder / "back"
    assert "pulled 2 file(s)" in lab.fab_ok("pull", "inputs", "--to", str(out))
    assert (out / "a.txt").read_text() == "a\n" and (out / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 64
    assert "pulled 0 file(s)" in lab.fab_ok("pull", "inputs", "--to", str(out))
    assert lab.statuses() == {}, "no VM was needed"


def test_a_fleet_that_cannot_use_the_bucket_is_refused_or_stopped(monkeypatch, local_s3, make_lab):
    """Fail closed. No such bucket: `fab up` refuses before it creates a VM. A bucket the VMs may
    not write (their role lacks s3:PutObject): each VM's boot check fails, `fab up` exits 1 naming
    the permission, and the VM is stopped, not left billing while reporting ok."""
    for k, v in local_s3.env.items():
        monkeypatch.setenv(k, v)
    missing = f"spotfan-missing-{uuid.uuid4().hex[:8]}"
    lab = make_lab(workers=1, idle_timeout=120, share_url=f"s3://{missing}/p")
    r = lab.fab("up")
    assert r.returncode == 1, r
    assert f"bucket s3://{missing} does not exist" in r.stderr and f"`aws s3 mb s3://{missing}`" in r.stderr
    assert lab.statuses() == {}, "no VM was created"

    bucket = f"spotfan-denied-{uuid.uuid4().hex[:8]}"
    local_s3.client().create_bucket(Bucket=bucket)
    lab = make_lab(workers=1, idle_timeout=120, share_url=f"s3://{bucket}/p")
    local_s3.proxy.fail_next(1000, status=403, operation="PutObject", key=r"\.spotfan/cluster/probe/")
    try:
        r = lab.fab("up")
    finally:
        local_s3.proxy.clear_faults()
    said = r.stdout + r.stderr
    assert r.returncode == 1, said
    assert re.search(rf"agent did not report: s3://{bucket}/p: cannot write \.spotfan/cluster/probe/\S+: .*s3:PutObject",
                     said), said
    assert "agent: ok" not in said
    assert "stopped so that it does not bill" in said, said
    assert lab.statuses() == {lab.config.vm_names()[0]: "TERMINATED"}
