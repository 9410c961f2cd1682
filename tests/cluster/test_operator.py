"""The operator's fab commands on a real lab: status --watch, failures --retry, top, report, collect."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from cluster.records import CLUSTER_DIR
from cluster.vm.verdict import VERDICT_KINDS
from tasks.layout import METRICS_DIR
from labs import FIXTURES

HERE = Path(__file__).resolve().parent
TASKS = FIXTURES / "op_tasks.py"
CORES = os.cpu_count() or 1
RUN_TIMEOUT_S = 90
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def start(lab, spec: str, *options: str) -> str:
    """`fab run SPEC` with the test tasks shipped; returns the run id."""
    out = lab.fab_ok("run", spec, "--ship", str(TASKS), "--lease", "10", *options)
    return re.search(r"run (r[\w-]+) requested", out).group(1)


def done_record(lab, run_id: str) -> Path:
    return lab.share / CLUSTER_DIR / "runs" / f"{run_id}.done.json"


def test_watch_a_run_to_its_end_then_report_and_collect_it(make_lab, tmp_path):
    lab = make_lab(workers=2, workers_per_vm=2)
    lab.fab_ok("up")
    run_id = start(lab, "op_tasks:steady")

    # Not a terminal (captured): stamped plain lines, and the watch ends with the run.
    r = lab.fab("status", "--watch", "--interval", "1", "--timeout", str(RUN_TIMEOUT_S),
                timeout=RUN_TIMEOUT_S + 30)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "\x1b[" not in r.stdout, "plain lines carry no terminal codes"
    runs = [ln for ln in lines if f" run {run_id}: " in ln]
    assert len(runs) >= 2, r.stdout
    assert all(re.fullmatch(rf"\d\d:\d\d:\d\d run {run_id}: (running|done): \d+/40 done \(\d+%\), "
                            r"\d+ failed, \d+ running, rate \S+, ETA \S+", ln) for ln in runs), runs
    assert f"run {run_id}: running: " in runs[0]
    assert f"run {run_id}: done: 40/40 done (100%), 0 failed, 0 running" in runs[-1]
    vms = lab.config.vm_names()
    assert any(re.search(rf"vms 2/2 up: {vms[0]} \w+.*, {vms[1]} \w+", ln) for ln in lines), r.stdout
    assert lines[-1] == "==> status: no run is going"
    assert json.loads(done_record(lab, run_id).read_text())["result"] == "done"

    # The agents recorded each VM's metrics while it ran tasks, and stopped when it ended.
    metrics = lab.share / METRICS_DIR  # tasks.layout owns the metric samples (.spotfan/metrics/)
    assert sorted(p.stem for p in metrics.glob("*.jsonl")) == vms
    for vm in vms:
        rows = [json.loads(ln) for ln in (metrics / f"{vm}.jsonl").read_text().splitlines()]
        assert rows and all(r["host"] == vm and 0 <= r["cpu"] <= 100 for r in rows)
        agent_log = lab.share / CLUSTER_DIR / "logs" / vm / "agent.log"
        assert "recording metrics to" in agent_log.read_text()
        # A VM whose last `tasks run` ends after the run's done record stops its recorder then.
        lab.wait_for(f"{vm}'s agent to stop its recorder",
                     lambda: "stopped recording metrics" in agent_log.read_text(), timeout=30)

    # Report: drawn on a VM, downloaded here, with a row and CPU figures per VM.
    out = lab.fab_ok("report", "--to", str(tmp_path / "reports"))
    png, page = tmp_path / "reports" / "steady" / "report.png", tmp_path / "reports" / "steady" / "report.html"
    assert out.startswith("==> report: drawing the report of ") and " on a running VM, then downloading it into " in out
    assert "==> report of steady: 40 tasks logged, 0 failed executions, 2 host(s)" in out
    assert f"    {png}" in out and f"    {page}" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    html = page.read_text()
    for vm in vms:
        row = re.search(rf"<tr><td>{vm}</td><td>(\d+)</td><td>0</td>.*?</tr>", html)
        assert row and int(row.group(1)) > 0, f"{vm} has no row in the report"
        assert re.search(rf"<tr><td>{vm}</td>(<td>[^<]*</td>){{4}}<td>\d+</td>", row.group(0)), \
            f"{vm} has no mean CPU in the report"
    assert "No CPU samples were recorded" not in html

    # Collect: written on a VM into the share, downloaded here, removed from the share.
    table = tmp_path / "steady.parquet"
    out = lab.fab_ok("collect", "--spec", run_id, "--to", str(table))
    assert out.startswith("==> collect: reading every output of ") and f"then downloading it to {table}" in out
    assert "==> collect steady: 40 rows x 4 columns from 40 outputs; 0 key(s) missing" in out
    assert f"    {table}" in out
    frame = pd.read_parquet(table)
    assert list(frame.columns) == ["key", "n", "square", "host"]
    assert sorted(frame["key"]) == [f"k{i:03d}" for i in range(40)]
    assert (frame["square"] == frame["n"] ** 2).all() and set(frame["host"]) == set(vms)
    assert list((lab.share / CLUSTER_DIR / "collect").iterdir()) == []

    bad = lab.fab("collect", "--to", str(tmp_path / "steady.csv"))
    assert bad.returncode == 2 and "name it .parquet or .pkl" in bad.stderr


def test_failures_are_grouped_and_retry_runs_them_again(make_lab):
    lab = make_lab(workers=1, workers_per_vm=2)
    lab.fab_ok("up")
    r = lab.fab("run", "op_tasks:flaky", "--ship", str(TASKS), "--lease", "10", "--max-attempts", "1",
                "--wait", "--wait-timeout", str(RUN_TIMEOUT_S), timeout=RUN_TIMEOUT_S + 30)
    assert r.returncode == 1 and "failed (8/10 done, 2 failed)" in r.stdout, r.stdout + r.stderr
    first = re.search(r"run (r[\w-]+) requested", r.stdout).group(1)

    shown = lab.fab_ok("failures")
    assert "flaky: 2 of 10 keys failed (2 gave up), 1 distinct error(s)" in shown
    assert "[1] 2 key(s): ValueError: bad input in …/…: column '…' is empty" in shown
    assert "keys: 'f03', 'f07'" in shown
    assert "| ValueError: bad input in shard/f03.csv: column 'price' is empty" in shown
    data = json.loads(lab.fab_ok("failures", "--spec", "op_tasks:flaky", "--json"))
    assert [g["keys"] for g in data["groups"]] == [["f03", "f07"]]

    (lab.share / "flaky.fixed").touch()  # the cause, fixed
    out = lab.fab_ok("failures", "--retry")
    retry_id = re.search(r"reset 2 key\(s\); run (r[\w-]+) retries them\n", out).group(1)
    assert retry_id != first and "after" not in out.split("retries them")[1].splitlines()[0]
    lab.wait_for("the retry run to end", done_record(lab, retry_id).exists, timeout=RUN_TIMEOUT_S)
    assert json.loads(done_record(lab, retry_id).read_text())["result"] == "done"
    assert sorted(p.name for p in (lab.share / "flaky").iterdir()) == [f"f{i:02d}.json" for i in range(10)]
    assert "flaky: no failed keys (10 keys)" in lab.fab_ok("failures", "--spec", first)
    assert "==> failures: nothing to retry" in lab.fab_ok("failures", "--retry")
    assert lab.fab("failures", "--spec", "r20000101-000000-0000").returncode == 2


def test_retry_while_the_run_still_goes_follows_it(make_lab):
    """A `tasks run` reads the failure records when it starts: the retry waits for it to end."""
    lab = make_lab(workers=1, workers_per_vm=4)  # a worker per key: the failing one never waits
    lab.fab_ok("up")
    going = start(lab, "op_tasks:held", "--max-attempts", "1")
    failed = lab.share / ".spotfan/tasks/held/failed"
    lab.wait_for("h0 to fail", lambda: failed.exists() and any(failed.iterdir()), timeout=RUN_TIMEOUT_S)
    (lab.share / "flaky.fixed").touch()
    out = lab.fab_ok("failures", "--retry")
    m = re.search(r"reset 1 key\(s\); run (r[\w-]+) retries them, after (r[\w-]+) \(still going", out)
    assert m and m.group(2) == going, out
    retry_id = m.group(1)
    vm = lab.config.vm_names()[0]
    beat = lab.share / CLUSTER_DIR / "vms" / f"{vm}.json"
    lab.wait_for("the agent to queue the retry", lambda: json.loads(beat.read_text())["runs"]
                 .get(retry_id, {}).get("state") == "queued", timeout=30)
    assert not done_record(lab, going).exists()

    (lab.share / "held.release").touch()
    lab.wait_for("the retry run to end", done_record(lab, retry_id).exists, timeout=RUN_TIMEOUT_S)
    assert json.loads(done_record(lab, going).read_text())["result"] == "failed"  # as it started
    assert json.loads(done_record(lab, retry_id).read_text())["result"] == "done"
    assert sorted(p.name for p in (lab.share / "held").iterdir()) == [f"h{i}.json" for i in range(4)]


def test_top_names_a_cpu_bound_run_and_one_failing_vm_hides_no_other(make_lab):
    lab = make_lab(workers=2, workers_per_vm=CORES)
    lab.fab_ok("up")
    start(lab, "op_tasks:spin")
    vms = lab.config.vm_names()
    claims = lab.share / ".spotfan/tasks/spin/claims"
    lab.wait_for("both VMs to spin", lambda: claims.exists() and len(list(claims.iterdir())) >= 2,
                 timeout=30)
    time.sleep(2)  # every pool process started and on its key

    r = lab.fab("top", "--seconds", "2", "--json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert sorted(got) == vms
    for vm in vms:
        s, v = got[vm]["sample"], got[vm]["verdict"]
        assert got[vm]["workers"] == CORES and s["host"] == vm
        assert len(s["cpu_per_core"]) == s["cores"] and len(s["load"]) == 3
        assert {"mem_available", "disk_read_bps", "disk_write_bps", "net_recv_bps", "net_sent_bps"} <= set(s)
        assert s["workers"]["runs"] == 1 and s["workers"]["pool"] == CORES
        assert v["kind"] in VERDICT_KINDS and v["summary"] and v["advice"]
    kinds = {got[vm]["verdict"]["kind"] for vm in vms}
    if kinds != {"cpu-bound"}:
        busy = min(got[vm]["sample"]["cpu"] for vm in vms)
        pytest.skip(f"verdicts {sorted(kinds)} with the machine {busy:.0f}% busy: other processes "
                    "on this 2-core box keep the workers from being seen CPU-bound")

    # One VM stops answering SSH: the other's sample and verdict are still shown.
    mute = vms[1]
    sshd = next(p for p in lab.provider.processes(mute) if p.name() == "sshd")
    sshd.send_signal(signal.SIGKILL)
    sshd.wait(5)
    r = lab.fab("top", "--seconds", "1", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"==> {vms[0]} (judged against {CORES} worker process(es))" in r.stdout
    assert "\nverdict: " in r.stdout
    assert f"==> {mute}: FAILED: {mute} (" in r.stdout
    assert re.search(rf"==> top: {vms[0]} [a-z-]+, {mute} FAILED", r.stdout), r.stdout
    assert f"error: cluster.vm.top failed on 1 of 2 VMs ({mute}); each one's error is printed above" in r.stderr
