"""Files on the share are untrusted input for the laptop: forged ones are refused, named, and skipped
where the rest can go on (issue 12's last part, on the lab).

Anyone who can write the share (a VM, or whoever holds the worker key) can write any file
under .spotfan/cluster/. Each test forges one kind and checks what a user sees: the
message naming the file, the exit code, and that everything else still works.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cluster.records import CLUSTER_DIR, MAX_RECORD_BYTES
from cluster.vm.agent import POLL_INTERVAL_S as AGENT_POLL_S


def share_file(lab, rel: str) -> Path:
    return lab.share / CLUSTER_DIR / rel


def run_one(lab) -> str:
    """A finished run of two keys on a cluster brought up; returns its id."""
    lab.fab_ok("up")
    (lab.share / "in").mkdir(parents=True, exist_ok=True)
    for name in ("a.txt", "b.txt"):
        (lab.share / "in" / name).write_text(name)
    out = lab.fab_ok("run", "cp {src} {out}", "--src", "in/*", "--out", "out/{name}", "--wait", "--wait-timeout", "120")
    (run_id,) = [w for w in out.split() if w.startswith("r2") and len(w) == 21]
    return run_id


def test_a_forged_heartbeat_is_refused_and_status_goes_on_for_the_other_vms(make_lab):
    lab = make_lab(workers=2)
    lab.fab_ok("up")
    first, second = lab.config.vm_names()
    # The agents rewrite their own heartbeats every 2 s: forge one under a name no VM has.
    share_file(lab, "vms/ghost.json").write_text(json.dumps({"name": "ghost", "state": "working\x1b[2J",
                                                            "time": 1e9}))
    r = lab.fab("status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused .spotfan/cluster/vms/ghost.json: `state` = 'working\\x1b[2J' is not one of working," in r.stdout
    assert "\x1b" not in r.stdout, "nothing from the share reaches the terminal unescaped"
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.strip().startswith(lab.config.name)}
    assert "agent idle" in lines[first], r.stdout  # the other VM as usual
    st = json.loads(lab.fab_ok("status", "--json"))
    assert [v["name"] for v in st["vms"]] == [first, second]
    assert any("vms/ghost.json" in m for m in st["refused"])


def test_a_forged_done_record_and_a_huge_request_are_refused_by_name(make_lab):
    lab = make_lab(workers=1)
    run_id = run_one(lab)
    done = share_file(lab, f"runs/{run_id}.done.json")
    real = json.loads(done.read_text())
    done.write_text(json.dumps({**real, "result": "done; rm -rf ~"}))
    huge = share_file(lab, "runs/r20990101-000000-0000.json")
    huge.write_text(" " * (MAX_RECORD_BYTES + 1))
    st = lab.fab("status")
    assert st.returncode == 0, st.stdout + st.stderr
    assert f"refused .spotfan/cluster/runs/{run_id}.done.json: `result` = 'done; rm -rf ~' is not one of" in st.stdout
    assert "refused .spotfan/cluster/runs/r20990101-000000-0000.json on the share: more than" in st.stdout
    # The latest run is not known while a request is refused: no guess, the file is named.
    r = lab.fab("failures")
    assert r.returncode == 2 and "r20990101-000000-0000.json" in r.stderr, r.stdout + r.stderr
    # The VM's agent reads requests with the same reader: it never runs this one, and says so once.
    log = lab.share / CLUSTER_DIR / "logs" / lab.config.vm_names()[0] / "agent.log"
    refusal = "refused .spotfan/cluster/runs/r20990101-000000-0000.json"
    lab.wait_for("the agent to refuse the request", lambda: refusal in log.read_text(), timeout=30)
    time.sleep(3 * AGENT_POLL_S)
    assert log.read_text().count(refusal) == 1
    huge.unlink()
    assert "no failed keys (2 keys)" in lab.fab_ok("failures"), "the run itself is still found"


def test_a_forged_worker_count_never_creates_vms(make_lab):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    share_file(lab, "cluster.json").write_text(json.dumps({"workers": 5000}))
    r = lab.fab("up")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused .spotfan/cluster/cluster.json" in r.stderr
    assert list(lab.statuses()) == lab.config.vm_names(), "no VM was created"
    share_file(lab, "cluster.json").write_text("[1, 2]")
    r = lab.fab("up")
    assert r.returncode == 2 and "cluster.json: not a JSON object" in r.stderr, r.stdout + r.stderr


def test_a_lying_engine_result_is_refused(make_lab, tmp_path: Path):
    lab = make_lab(workers=1)
    run_one(lab)
    # A VM whose engine prints a failure report with a task name that is a path, and keys
    # that are not strings.
    wrapper = tmp_path / "lying-python"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1 $2 $3" = "-m tasks failures" ]; then
    echo '{{"task": "../../x", "total": 2, "failed": 1, "gave_up": 1, "groups": []}}'
    exit 0
fi
if [ "$1 $2 $3" = "-m tasks status" ]; then
    echo '{{"total": -5, "done": "all", "failed": 0, "running": 0, "pending": 0}}'
    exit 0
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    toml = lab.folder / "cluster.toml"
    toml.write_text(toml.read_text().replace(f'python = "{sys.executable}"', f'python = "{wrapper}"'))
    r = lab.fab("failures")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused what `python -m tasks failures` printed on" in r.stderr and "`task` = '../../x'" in r.stderr
    # The counts of a run still going come from a VM's `tasks status`: a lie there leaves them unknown.
    (lab.share / "in" / "c.txt").write_text("c")
    going = lab.fab_ok("run", "sleep 30; cp {src} {out}", "--src", "in/*", "--out", "slow/{name}")
    assert "started" in going
    st = lab.fab_ok("status")
    assert "counts unknown" in st or "counts unavailable" in st, st
