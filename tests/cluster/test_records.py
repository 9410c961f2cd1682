"""The share's records and the engine's results, read as untrusted input (no lab needed): what each
reader refuses, with the file named, and that every record reads back what its writer wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster import records, results
from cluster.errors import RecordError, ResultError
from cluster.records import DesiredCount, Heartbeat, RunDone, RunRequest, VmRun
from tasks.records import MetricSample
from tasks.report import read_metrics

RID = "r20250101-120000-ab12"
REQ = {"id": RID, "spec_args": ["m:f"], "run_args": [], "workers_per_vm": None, "created": 1.0, "after": None}
BEAT = {"name": "demo-w001", "state": "idle", "time": 1e9, "agent_id": "ab12", "seq": 3, "mount": "ok"}


def test_every_record_reads_back_what_its_writer_wrote():
    req = RunRequest(id=RID, spec_args=["--cmd", "cp {src} {out}", "--name", "copy"], run_args=["--limit", "3"],
                     workers_per_vm=4, created=1.5, after="r20250101-110000-0000")
    assert RunRequest.from_json(req.to_json(), source="x", run_id=RID) == req
    done = RunDone(id=RID, result="failed", exit_code=1, vm="demo-w001", time=2.0,
                   status=records.EngineCounts(total=3, done=2, failed=1, running=0, pending=0))
    assert RunDone.from_json(done.to_json(), source="x", run_id=RID) == done
    beat = Heartbeat(name="demo-w001", state="working", time=3.0, agent_id="ab12", seq=7, mount="ok", agent_pid=40,
                     idle_for=0.0, idle_timeout=60.0, rate=2.5, executions=9,
                     runs={RID: VmRun(state="running", pid=41, started=2.5, phase="working", useful=True)})
    assert Heartbeat.from_json(beat.to_json(), source="x", vm="demo-w001") == beat
    assert DesiredCount.from_json(DesiredCount(3).to_json(), source="x") == DesiredCount(3)


@pytest.mark.parametrize("change, why", [
    ({"id": "r1"}, "`id` = 'r1' is not of the form"),
    ({"id": "r20250101-120000-ffff"}, "but the file is named for"),
    ({"spec_args": []}, "`spec_args` must be a list of 1 to"),
    ({"spec_args": ["m:f", 3]}, "`spec_args` must be a list of 1 to"),
    ({"spec_args": ["m:f", "--name", "/etc"]}, "--name '/etc' contains '/'"),
    ({"spec_args": ["m:f", "--name=.."]}, "--name '..' is '..', which would escape its folder"),
    ({"workers_per_vm": 10**6}, "`workers_per_vm` = '1000000' is not a whole number from 1 to"),
    ({"created": float("nan")}, "`created`"),
    ({"after": "../x"}, "`after` = '../x' is not of the form"),
    ({"run_args": "--limit 3"}, "`run_args` must be a list"),
])
def test_a_forged_run_request_is_refused_naming_its_file(change, why):
    with pytest.raises(RecordError) as e:
        RunRequest.from_json(json.dumps({**REQ, **change}), source=".spotfan/cluster/runs/x.json", run_id=RID)
    assert str(e.value).startswith("refused .spotfan/cluster/runs/x.json: ") and why in str(e.value)


@pytest.mark.parametrize("text, why", [
    ("not json", "not JSON"),
    ("[]", "not a JSON object"),
    (json.dumps({**BEAT, "state": "pwned"}), "`state` = 'pwned' is not one of"),
    (json.dumps({**BEAT, "name": "demo-w002"}), "but the file is 'demo-w001''s"),
    (json.dumps({**BEAT, "time": True}), "`time`"),
    (json.dumps({**BEAT, "agent_id": "\x1b[2J"}), "`agent_id` must be a string of at most"),
    (json.dumps({**BEAT, "runs": {"../x": {"state": "running"}}}), "names a run '../x', not a run id"),
    (json.dumps({**BEAT, "runs": {RID: {"state": "running", "pid": -1}}}), "`pid` = '-1' is not a whole number"),
    (" " * (records.MAX_RECORD_BYTES + 1), f"more than {records.MAX_RECORD_BYTES} bytes"),
])
def test_a_forged_heartbeat_is_refused_naming_its_file(text, why):
    with pytest.raises(RecordError) as e:
        Heartbeat.from_json(text, source="vms/demo-w001.json", vm="demo-w001")
    assert "vms/demo-w001.json" in str(e.value) and why in str(e.value)


def test_a_forged_done_record_and_worker_count_are_refused():
    with pytest.raises(RecordError, match="`result` = 'ok' is not one of done, failed, spec-error"):
        RunDone.from_json(json.dumps({"id": RID, "result": "ok", "vm": "v", "time": 1}), source="d", run_id=RID)
    with pytest.raises(RecordError, match=r"d: status: `total` = '-1'"):
        RunDone.from_json(json.dumps({"id": RID, "result": "done", "vm": "v", "time": 1, "status": {
            "total": -1, "done": 0, "failed": 0, "running": 0, "pending": 0}}), source="d", run_id=RID)
    with pytest.raises(RecordError, match="`vm` = '../v' contains '/'"):
        RunDone.from_json(json.dumps({"id": RID, "result": "done", "vm": "../v", "time": 1}), source="d")
    with pytest.raises(RecordError, match="`workers` = '-3'"):
        DesiredCount.from_json('{"workers": -3}', source="cluster.json")


def test_a_local_record_is_read_bounded(tmp_path: Path):
    path = tmp_path / "r.json"
    assert records.read_bounded(path, source="runs/r.json") is None
    path.write_bytes(b"x" * (records.MAX_RECORD_BYTES + 1))
    with pytest.raises(RecordError, match=r"^refused runs/r.json: more than"):
        records.read_bounded(path, source="runs/r.json")


def test_engine_results_are_checked_and_their_text_escaped():
    ok = json.dumps({"task": "t", "total": 3, "failed": 1, "gave_up": 1, "groups": [
        {"signature": "E", "keys": ["a\nb"], "count": 1, "gave_up": 1, "error": "E\x1b[2J", "detail": "l1\nl2\x07"}]})
    rep = results.failures("noise\n" + ok + "\n", host="vm")
    assert rep.groups[0].keys == ("a\nb",) and rep.groups[0].error == "E\\x1b[2J" and rep.groups[0].detail == "l1\nl2\\x07"
    for bad, why in (('{"task": "../t", "total": 1, "failed": 0, "gave_up": 0, "groups": []}', "`task` = '../t'"),
                     ('{"task": "t", "total": 1, "failed": 0, "gave_up": 0, "groups": [{"keys": [1]}]}', "`keys`"),
                     ('{"task": "t", "total": "1", "failed": 0, "gave_up": 0, "groups": []}', "`total`"),
                     ("[1]", "not a JSON object"), ("", "printed no JSON result")):
        with pytest.raises(ResultError) as e:
            results.failures(bad, host="vm")
        assert why in str(e.value)
    with pytest.raises(ResultError, match="reported the task name '/x', which contains '/'"):
        results.reported('{"task": "/x", "tasks": 1, "failures": 0, "hosts": 1}', host="vm", to="reports")
    assert results.counts('{"total": 2, "done": 1, "failed": 0, "running": 1, "pending": 0, "extra": 1}',
                          host="vm").running == 1


def test_metric_samples_are_what_the_engines_report_reads(tmp_path: Path):
    s = MetricSample(t=100.0, host="vm-1", seconds=5.0, cpu=50.0, cpu_per_core=[40.0, 60.0], iowait=1.0, steal=0.0,
                     load1=1.0, mem_used=1, mem_available=2, swap_used=0, disk_read_bps=0.0, disk_write_bps=0.0,
                     net_recv_bps=0.0, net_sent_bps=0.0, workers=2, workers_cpu=100.0, workers_rss=3)
    path = tmp_path / records.metrics_file("vm-1")
    path.parent.mkdir(parents=True)
    path.write_text(s.to_json() + "\n")
    assert read_metrics(tmp_path) == {"vm-1": [{**json.loads(s.to_json()), "gpus": ()}]}  # a CPU host: no GPUs
