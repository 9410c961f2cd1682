"""`fab report --to DIR` writes under DIR only, whatever the share or a VM says the task is.

The task's name reaches the laptop twice from untrusted places: in the run request on the
share (which any share writer can forge) and in the JSON line the VM's engine prints
(which a VM someone controls can forge). Neither may pick a folder outside DIR: the
laptop refuses the forged request itself (naming its file, exit 2), and refuses the
lying VM's result (exit 1).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

FORGED_NAME = "../../escape"


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_report_never_writes_outside_its_folder(make_lab, tmp_path: Path) -> None:
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    (lab.share / "in").mkdir()
    for name in ("a.txt", "b.txt"):
        (lab.share / "in" / name).write_text(name)
    lab.fab_ok("run", "cp {src} {out}", "--src", "in/*", "--out", "o/{name}", "--name", "copy",
               "--wait", "--wait-timeout", "120")
    to = tmp_path / "a" / "b" / "reports"  # to / FORGED_NAME would be tmp_path/a/escape
    around = tmp_path / "a"
    around.mkdir()
    before = tree(tmp_path)

    # 1. A forged run request (the newest, so `fab report` would pick it) names the task
    #    "../../escape": the laptop's reader refuses the file, naming it, exit 2.
    forged = {"id": "r20990101-000000-f0f0", "created": time.time() + 86400, "after": None,
              "spec_args": ["--cmd", "cp {src} {out}", "--src", "in/*", "--out", "o/{name}",
                            "--name", FORGED_NAME],
              "run_args": [], "workers_per_vm": None}
    runs = lab.share / ".spotfan" / "cluster" / "runs"
    (runs / f"{forged['id']}.json").write_text(json.dumps(forged))
    r = lab.fab("report", "--to", str(to))
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
    assert f"--name '{FORGED_NAME}' contains '/'" in r.stderr
    assert f"refused .spotfan/cluster/runs/{forged['id']}.json" in r.stderr, "the message names the file"
    assert tree(tmp_path) == before, "nothing written on the laptop"
    (runs / f"{forged['id']}.json").unlink()  # the next step forges the VM's answer instead

    # 2. A VM whose engine lies: it prints the forged name and leaves report files where
    #    the laptop would fetch them from (.spotfan/tasks/../../escape/ = escape/).
    wrapper = tmp_path / "lying-python"
    wrapper.write_text(f"""#!/bin/sh
if [ "$1 $2 $3" = "-m tasks report" ]; then
    mkdir -p escape && echo png > escape/report.png && echo '<p>html</p>' > escape/report.html
    echo '{{"task": "{FORGED_NAME}", "png": "x", "html": "x", "tasks": 2, "failures": 0, "hosts": 1}}'
    exit 0
fi
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    toml = lab.folder / "cluster.toml"
    toml.write_text(toml.read_text().replace(f'python = "{sys.executable}"', f'python = "{wrapper}"'))
    r = lab.fab("report", "--to", str(to))
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert f"reported the task name '{FORGED_NAME}', which contains '/'" in r.stderr
    assert "refusing to use it as a folder" in r.stderr
    assert (lab.share / "escape" / "report.png").exists(), "the VM did leave the files to fetch"
    assert not (around / "escape").exists(), "a report was written outside --to"
    assert tree(tmp_path) == before | {"lying-python"}
