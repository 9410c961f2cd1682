"""`fab logs all --follow`: every VM's run log as it grows, prefixed by VM and run, to the run's end."""
from __future__ import annotations

import json
import re

FOLLOW_TIMEOUT_S = 150


def test_follow_every_vms_run_log_until_the_run_is_over(make_lab):
    lab = make_lab(workers=2)
    (lab.share / "in").mkdir(parents=True)
    for i in range(16):
        (lab.share / "in" / f"f{i:02d}.txt").write_text(f"{i}\n")
    lab.fab_ok("up")
    assert lab.fab("logs", "all").returncode == 2, "`all` without --follow is a usage error"
    unknown = lab.fab("logs", "no-such-vm", "--follow", "--timeout", "5")
    assert unknown.returncode != 0 and "no logs for 'no-such-vm'" in unknown.stderr + unknown.stdout
    lab.fab_ok("run", "sleep 0.5 && cp {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt")
    r = lab.fab("logs", "all", "--follow", "--timeout", str(FOLLOW_TIMEOUT_S), timeout=FOLLOW_TIMEOUT_S + 30)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "==> logs: following every VM (Ctrl-C stops; the runs go on)"
    assert lines[-1] == "==> logs: every run is over"
    for vm in lab.config.vm_names():
        mine = [ln for ln in lines if re.match(rf"{vm} r[\w-]+ \| ", ln)]
        assert mine, f"no line of {vm}'s run log:\n{r.stdout}"
    summaries = [json.loads(ln.split(" | ", 1)[1]) for ln in lines
                 if " | {" in ln and '"succeeded"' in ln]
    assert summaries and sum(s["succeeded"] for s in summaries) == 16, r.stdout
    assert sorted(p.name for p in (lab.share / "out").iterdir()) == [f"f{i:02d}.txt" for i in range(16)]
