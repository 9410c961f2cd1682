"""`tasks report` (what `fab report` draws on a VM) with GPU samples: a GPU panel and a GPU column per
host when the metric samples have GPUs, none when they do not, and old samples still read."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from tasks.records import GpuMetric, MetricSample
from tasks.report import write_report

T0 = 1_700_000_000.0


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk
    return width, height


def write_run(root: Path, gpus_of: dict[str, list[float | None]] | None) -> None:
    """Two hosts' execution logs and metric samples; `gpus_of`: each host's GPU utilisations."""
    log, metrics = root / ".spotfan/tasks/infer/log", root / ".spotfan/metrics"
    log.mkdir(parents=True)
    metrics.mkdir(parents=True)
    for host in ("gpu-a", "gpu-b"):
        rows = [{"key": f"{host}-{i}", "start": T0 + i, "seconds": 0.9, "ok": True, "dup": False,
                 "owner": f"{host}-1-ab", "host": host} for i in range(60)]
        (log / f"{host}-1-ab.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines = []
        for s in range(5, 65, 5):
            gpus = tuple(GpuMetric(i, u, 9000.0, 15360.0) for i, u in enumerate((gpus_of or {}).get(host, [])))
            m = MetricSample(t=T0 + s, host=host, seconds=5.0, cpu=40.0, cpu_per_core=[40.0, 40.0], iowait=1.0,
                             steal=0.0, load1=1.0, mem_used=1, mem_available=2, swap_used=0, disk_read_bps=0.0,
                             disk_write_bps=0.0, net_recv_bps=0.0, net_sent_bps=0.0, workers=2, workers_cpu=80.0,
                             workers_rss=3, gpus=gpus)
            line = json.loads(m.to_json())
            if gpus_of is None:
                del line["gpus"]  # as a recorder older than GPU sampling wrote them
            lines.append(json.dumps(line) + "\n")
        (metrics / f"{host}.jsonl").write_text("".join(lines))


def test_gpu_use_per_host_is_drawn_and_tabled(tmp_path: Path) -> None:
    write_run(tmp_path, {"gpu-a": [90.0, 70.0], "gpu-b": [10.0, None]})  # gpu-b: one card reports nothing
    rep = write_report("infer", root=tmp_path)
    assert [(h.host, h.gpu_mean) for h in rep.hosts] == [("gpu-a", 80.0), ("gpu-b", 10.0)]
    page = rep.html.read_text()
    assert "<th>mean GPU %</th>" in page
    assert "<tr><td>gpu-a</td><td>60</td><td>0</td>" in page and "<td>1</td><td>80</td><td>" in page
    assert "<td>1</td><td>10</td><td>" in page
    width, height = png_size(rep.png)
    assert (width, height) == (1210, 1177)  # 11 x (8.5 + 2.2) inches at 110 dpi: the GPU panel is there


def test_without_gpu_samples_there_is_no_gpu_panel(tmp_path: Path) -> None:
    write_run(tmp_path, None)  # old lines, no "gpus" at all: they still read
    rep = write_report("infer", root=tmp_path)
    assert [h.cpu_mean for h in rep.hosts] == [40.0, 40.0] and all(h.gpu_mean is None for h in rep.hosts)
    assert "mean GPU %" not in rep.html.read_text()
    assert png_size(rep.png) == (1210, 935)  # 11 x 8.5 inches
