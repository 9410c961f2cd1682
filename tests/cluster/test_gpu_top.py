"""GPU use seen from the laptop: `fab top` on a lab VM whose driver (a stand-in nvidia-smi, printing the
real tool's CSV) shows two busy T4s, the agent's recorder writing GPU samples, and `fab report`
drawing them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import psutil

from cluster.config import load
from labs import Lab

# `nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits`
# on a VM whose two T4s run kernels nearly all the time.
BUSY_SMI = """#!/bin/sh
printf '0, Tesla T4, 97, 14101, 15360\\n1, Tesla T4, 91, 9000, 15360\\n'
"""
# Each key waits (at most 2 minutes) until the test releases it: the workers stay busy while sampled.
WORK = """#!/bin/sh
i=0
while [ ! -e "$(dirname "$1")/../release" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
echo done > "$2"
"""
KEYS = 30


def keys_running(lab: Lab, vm: str) -> int:
    """How many of the keys' `sh gpu_work.sh` processes run on the VM."""
    n = 0
    for p in lab.provider.processes(vm):
        try:
            n += p.cmdline()[:2] == ["sh", "gpu_work.sh"]
        except psutil.Error:
            pass  # it ended while listed
    return n


def busy_gpu_lab(make_lab) -> Lab:
    lab = make_lab(workers=1, idle_timeout=120)
    tool = lab.folder / "nvidia-smi"
    tool.write_text(BUSY_SMI)
    tool.chmod(0o755)
    toml = lab.folder / "cluster.toml"
    text = toml.read_text().replace('mount_point = "mnt"', f'mount_point = "mnt"\nnvidia_smi = "{tool}"')
    toml.write_text(text + "gpus = 2\n")  # [lab] is the last table
    return Lab(lab.folder, load(toml))


def test_top_and_report_show_each_vms_gpus(make_lab, tmp_path: Path):
    lab = busy_gpu_lab(make_lab)
    (vm,) = lab.config.vm_names()
    (lab.share / "in").mkdir(parents=True)
    for i in range(KEYS):
        (lab.share / "in" / f"{i:03d}.txt").write_text(str(i))
    work = tmp_path / "gpu_work.sh"
    work.write_text(WORK)
    lab.fab_ok("up")
    out = lab.fab_ok("run", "sh gpu_work.sh {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
                     "--ship", str(work))
    run_id = re.search(r"run (r[\w-]+) requested", out).group(1)
    # Both GPU workers busy: one `run` process feeds both from the units it claims, so the
    # claim files say nothing about it; the keys' own processes on the VM do.
    lab.wait_for("both GPU workers to run a key", lambda: keys_running(lab, vm) >= 2, timeout=120, run_id=run_id)

    r = lab.fab("top", "--seconds", "2", "--json", timeout=90)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)[vm]
    s, v = got["sample"], got["verdict"]
    assert [(g["index"], g["name"], g["util_pct"]) for g in s["gpus"]] == [(0, "Tesla T4", 97), (1, "Tesla T4", 91)]
    assert s["gpu_problem"] == "" and got["workers"] == 2  # one worker process per GPU
    assert v["kind"] == "gpu-bound", v
    assert v["summary"].startswith("GPU-bound: 2 GPU(s) 94% busy (GPU 0 97%, GPU 1 91%)")
    text = lab.fab_ok("top", "--seconds", "1", timeout=90)
    assert "  gpu 0    Tesla T4: 97% busy, memory 13.8 of 15.0 GiB used" in text, text
    assert "==> top: " + vm + " gpu-bound" in text

    metrics = lab.share / ".spotfan/metrics" / f"{vm}.jsonl"
    lab.wait_for("a recorded GPU sample", lambda: metrics.exists() and '"gpus": [{"index": 0' in metrics.read_text(),
                 timeout=60)
    (lab.share / "release").touch()
    out = lab.share / "out"
    lab.wait_for("every key", lambda: out.exists() and len(list(out.iterdir())) == KEYS, timeout=120)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {tuple(g["util"] for g in row["gpus"]) for row in rows} == {(97.0, 91.0)}

    said = lab.fab_ok("report", "--to", str(tmp_path / "reports"), timeout=120)
    page = next((tmp_path / "reports").glob("*/report.html")).read_text()
    assert "==> report of " in said and "<th>mean GPU %</th>" in page
    assert re.search(rf"<tr><td>{vm}</td><td>{KEYS}</td><td>0</td>(<td>[^<]*</td>){{4}}<td>94</td>", page), page[page.index("<table>"):]
