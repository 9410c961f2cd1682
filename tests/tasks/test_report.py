"""Run reports: a PNG and an HTML page drawn from the execution logs and metric samples."""
from __future__ import annotations

import json
import socket
from pathlib import Path

from tasks.report import write_report
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_real_run(tmp_path: Path, write_module) -> None:
    write_module("t", """
        import time
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=[f"k{i}" for i in range(30)], out="out/{key}")
        def slowish(key: str, out: Path) -> None:
            time.sleep(0.01)
            if key == "k4":
                raise RuntimeError("broken input")
            out.write_text(key)
    """)
    assert run_cli(["run", "t:slowish", "--max-attempts", "1"], tmp_path).returncode == 1
    proc = run_cli(["report", "t:slowish"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    base = tmp_path / ".spotfan/tasks/slowish"
    assert got == {"task": "slowish", "png": str(base / "report.png"),
                   "html": str(base / "report.html"), "tasks": 29, "failures": 1, "hosts": 1}
    png = (base / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000
    page = (base / "report.html").read_text()
    assert '<a href="report.png"><img' in page and "data:image/png;base64," in page
    host = socket.gethostname()
    assert f"<tr><td>{host}</td><td>29</td><td>1</td>" in page
    assert "No CPU samples were recorded" in page


def test_report_per_host_with_metric_samples(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    log = tmp_path / ".spotfan/tasks/feat/log"
    metrics = tmp_path / ".spotfan/metrics"
    log.mkdir(parents=True)
    metrics.mkdir(parents=True)
    for h, (n, every) in enumerate([(120, 1.0), (60, 2.0), (20, 1.0)]):  # vm-2 stops early
        host = f"vm-{h}"
        rows = [{"key": f"{host}-{i}", "start": t0 + i * every, "seconds": every * 0.9,
                 "ok": i % 30 != 29, "dup": False, "owner": f"{host}-1-ab", "host": host}
                for i in range(n)]
        (log / f"{host}-1-ab.jsonl").write_text(
            "\n".join(json.dumps(r) for r in rows) + '\n{"key": "torn li')
        (metrics / f"{host}.jsonl").write_text("".join(
            json.dumps({"t": t0 + s, "host": host, "seconds": 5.0, "cpu": 90.0 - 30 * h,
                        "iowait": 2.0 * h}) + "\n" for s in range(5, 125, 5)) + "not json\n")
    rep = write_report("feat", root=tmp_path)
    assert [(h.host, h.tasks, h.failures) for h in rep.hosts] == [
        ("vm-0", 116, 4), ("vm-1", 58, 2), ("vm-2", 20, 0)]
    vm0 = rep.hosts[0]
    assert round(vm0.rate) == 58 and vm0.cpu_mean == 90.0 and vm0.iowait_mean == 0.0
    assert rep.hosts[2].cpu_mean == 30.0 and rep.hosts[2].iowait_mean == 4.0
    assert rep.png.read_bytes().startswith(PNG_MAGIC)
    page = rep.html.read_text()
    assert "<tr><td>vm-1</td><td>58</td><td>2</td><td>29.0</td>" in page
    assert "No CPU samples" not in page


def test_report_before_any_run_says_what_to_do(tmp_path: Path, write_module) -> None:
    write_module("t", """
        from tasks import filetask

        @filetask(keys=["a"], out="out/{key}")
        def never(key, out) -> None:
            out.write_text(key)
    """)
    proc = run_cli(["report", "t:never"], tmp_path)
    assert proc.returncode == 1
    assert "no executions of never are logged" in proc.stderr and "run the task first" in proc.stderr
