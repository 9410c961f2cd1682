"""GPU use in a sample: NVML's values as the binding returns them, nvidia-smi as a real process, the
verdicts that follow, a missing driver shown as "no GPU", and the metric lines `fab report` reads.

The NVML side uses a stand-in for the vendor library (nvidia-ml-py's `pynvml` module, which needs
a GPU and its driver): an object with the same functions, returning values of the shapes NVIDIA's
NVML API reference gives (nvmlUtilization_t: `gpu` and `memory` in percent; nvmlMemory_t: `total`,
`free`, `used` in bytes; errors as `NVMLError` whose text is the NVML error string). None of our
own code is patched: the stand-in is handed in where pynvml would be.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from cluster.errors import ResultError
from cluster.vm import gpus
from cluster.vm.gpus import Gpu, GpuMeter
from cluster.vm.sample import Sample, sample
from cluster.vm.top import record
from cluster.vm.verdict import describe, verdict
from tasks.records import GpuMetric
from tasks.report import read_metrics

REPO = Path(__file__).resolve().parents[3]
MIB = 2**20
T4_TOTAL = 15360 * MIB  # what NVML reports as a T4's total memory


class NVMLError(Exception):
    """pynvml raises NVMLError subclasses whose str() is NVML's error string."""


@dataclass
class Utilization:  # nvmlUtilization_t
    gpu: int
    memory: int


@dataclass
class Memory:  # nvmlMemory_t
    total: int
    free: int
    used: int


class RecordedNvml:
    """Stands in for `pynvml`: each GPU replays its recorded utilisation, one value per look."""

    NVMLError = NVMLError

    def __init__(self, cards: list[dict], *, init_error: str = "") -> None:
        self.cards = cards
        self.init_error = init_error
        self.inits = self.shutdowns = 0
        self.looks = [0] * len(cards)

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self.cards[h]["name"]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Utilization:
        utils = self.cards[h]["util"]
        if utils is None:
            raise NVMLError("Not Supported")
        u = utils[min(self.looks[h], len(utils) - 1)]
        self.looks[h] += 1
        return Utilization(gpu=u, memory=u // 2)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Memory:
        used = self.cards[h]["used"]
        return Memory(total=T4_TOTAL, free=T4_TOTAL - used, used=used)


def two_t4s() -> RecordedNvml:
    return RecordedNvml([{"name": "Tesla T4", "util": [90, 100, 95], "used": 14101 * MIB},
                         {"name": b"Tesla T4", "util": None, "used": 3 * MIB}])  # older bindings: bytes


def tool(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_nvml_values_become_gpus_and_unsupported_fields_stay_unknown():
    nvml = two_t4s()
    read = gpus.read_nvml(nvml)
    assert read is not None and read.problem == "" and read.source == "nvml"
    busy, old = read.gpus
    assert (busy.index, busy.name, busy.util_pct, busy.mem_used_mib, busy.mem_total_mib) == (0, "Tesla T4", 90, 14101, 15360)
    assert old.name == "Tesla T4" and old.util_pct is None and old.mem_used_mib == 3  # unknown, not 0 %
    assert nvml.inits == nvml.shutdowns == 1


def test_nvml_that_does_not_open_falls_back_to_nvidia_smi_and_names_both(tmp_path):
    no_driver = RecordedNvml([], init_error="Driver Not Loaded")
    assert gpus.read_nvml(no_driver).problem == "NVML: Driver Not Loaded"
    meter = GpuMeter(nvidia_smi=str(tmp_path / "absent"), nvml=no_driver)
    got = meter.read()
    assert got.gpus == () and got.problem == f"NVML: Driver Not Loaded; {tmp_path}/absent: not found"
    smi = GpuMeter(nvidia_smi=tool(tmp_path, "printf '0, Tesla T4, 12, 100, 15360\\n'"), nvml=no_driver)
    assert [g.util_pct for g in smi.read().gpus] == [12]


def test_a_meter_averages_utilisation_and_keeps_peak_memory_over_its_looks():
    nvml = two_t4s()
    meter = GpuMeter(nvml=nvml)
    meter.start()
    for now in (0.0, 0.5, 1.0, 2.0):  # NVML is looked at once a second: 3 looks of 4 ticks
        meter.look(now=now)
    got = meter.result()
    assert [g.util_pct for g in got.gpus] == [95.0, None] and got.gpus[0].mem_used_mib == 14101
    meter.start()
    meter.look(now=10.0)
    assert meter.result().gpus[0].util_pct == 95  # the last recorded value, alone
    meter.close()
    assert nvml.inits == nvml.shutdowns == 1  # opened once for every sample


def test_a_sample_carries_the_gpus_and_they_travel_validated(tmp_path):
    smi = tool(tmp_path, "printf '0, Tesla T4, 97, 14101, 15360\\n1, Tesla T4, 0, 3, 15360\\n'")
    s = sample(0.6, pids=[], gpu=GpuMeter(nvidia_smi=smi))
    assert [g.util_pct for g in s.gpus] == [97, 0] and s.gpu_problem == ""
    back = Sample.from_dict(json.loads(json.dumps(s.to_dict())), source="test")
    assert back.gpus == s.gpus
    line = s.metric_sample()
    assert line.gpus == (GpuMetric(0, 97.0, 14101.0, 15360.0), GpuMetric(1, 0.0, 3.0, 15360.0))
    older = {k: v for k, v in s.to_dict().items() if k not in ("gpus", "gpu_problem")}
    assert Sample.from_dict(older, source="an older sampler").gpus == ()
    for forged, why in (([{"index": 0, "name": "x", "util_pct": 250}], "`util_pct` = '250'"),
                        ("all", "`gpus` must be a list"), ([{"index": -1, "name": "x"}], "`index`")):
        with pytest.raises(ResultError, match=why):
            Sample.from_dict({**s.to_dict(), "gpus": forged}, source="vm")


def test_without_a_driver_top_says_no_gpu(tmp_path):
    """NVML absent (nvidia-ml-py is not installed here) and no nvidia-smi: "no GPU", not 0 %."""
    out = subprocess.run([sys.executable, "-m", "cluster.vm.top", "--seconds", "0.5", "--pid", "1",
                          "--nvidia-smi", str(tmp_path / "no-nvidia-smi")], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("  gpu")]
    assert line.startswith("  gpu      no GPU (") and "no-nvidia-smi: not found)" in line, out.stdout
    assert "%" not in line
    js = subprocess.run([sys.executable, "-m", "cluster.vm.top", "--seconds", "0.3", "--json", "--pid", "1",
                         "--nvidia-smi", str(tmp_path / "no-nvidia-smi")], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    got = json.loads(js.stdout)["sample"]
    assert got["gpus"] == [] and "not found" in got["gpu_problem"]


def busy_sample(**changes) -> Sample:
    """A real sample of this machine, with the GPU, CPU and I/O figures a rule needs."""
    s = sample(0.3, pids=[])
    s = replace(s, workers=replace(s.workers, runs=1, pool=2, processes=2, runnable=0.0, blocked=0.0, cpu=20.0),
                cpu=20.0, iowait=0.0, io_pressure=0.0, mem_pressure=0.0, swap_bps=0.0,
                mem_available=s.mem_total // 2, others=())
    return replace(s, **changes)


def t4(index: int, util: float | None, used: float = 2000.0) -> Gpu:
    return Gpu(index=index, name="Tesla T4", util_pct=util, mem_used_mib=used, mem_total_mib=15360.0)


def test_gpu_verdicts():
    v = verdict(busy_sample(gpus=(t4(0, 97), t4(1, 91))), workers=2)
    assert v.kind == "gpu-bound" and v.summary.startswith("GPU-bound: 2 GPU(s) 94% busy (GPU 0 97%, GPU 1 91%)")
    assert "more GPU VMs" in v.advice[0]

    s = busy_sample(gpus=(t4(0, 12), t4(1, 8)), cpu=97.0)
    v = verdict(replace(s, workers=replace(s.workers, runnable=2.0, cpu=190.0)), workers=2)
    assert v.kind == "input-bound" and v.summary.startswith("input-bound: the GPU(s) wait for input, 10% busy")
    assert "the CPU is 97% busy" in v.summary and "more data-loading workers" in v.advice[0]

    s = busy_sample(gpus=(t4(0, 5),), iowait=40.0)
    v = verdict(replace(s, workers=replace(s.workers, blocked=1.5)), workers=1)
    assert v.kind == "input-bound" and "I/O waits (iowait 40%" in v.summary and v.advice[0].startswith("a faster disk")

    v = verdict(busy_sample(gpus=(t4(0, 60, used=15200.0),)), workers=1)
    assert v.kind == "gpu-memory" and v.summary.startswith("GPU memory-bound: 1 of 1 GPU(s) nearly full, GPU 0 holds 14.8 of 15.0 GiB")

    assert verdict(busy_sample(gpus=(t4(0, 3),)), workers=1).summary.startswith("GPU(s) and CPU idle, workers waiting")
    # a card that does not report its use: the CPU rules decide, nothing is made up
    assert verdict(busy_sample(gpus=(t4(0, None),)), workers=1).kind not in ("gpu-bound", "input-bound")
    text = describe(busy_sample(gpus=(t4(0, None), t4(1, 40))), verdict(busy_sample(), workers=1))
    assert "  gpu 0    Tesla T4: busy unknown, memory 2.0 of 15.0 GiB used" in text
    assert "  gpu 1    Tesla T4: 40% busy" in text


def test_recorded_lines_hold_the_gpus_and_old_or_forged_lines_read_right(tmp_path):
    smi = tool(tmp_path, "printf '0, Tesla T4, 55, 9000, 15360\\n'")
    path = tmp_path / ".spotfan/metrics/gpu-vm.jsonl"
    assert record(path, 0.3, threading.Event(), pids=[], max_samples=2, gpu=GpuMeter(nvidia_smi=smi)) == 2
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["gpus"] == [{"index": 0, "util": 55.0, "mem_used_mib": 9000.0, "mem_total_mib": 15360.0}]
    host = lines[0]["host"]
    old = {k: v for k, v in lines[0].items() if k != "gpus"}  # written before GPU sampling
    forged = {**lines[0], "t": lines[0]["t"] + 0.1, "gpus": [{"index": 0, "util": "97"}]}
    with open(path, "a") as f:
        f.write(json.dumps(old) + "\n" + json.dumps(forged) + "\n")
    got = read_metrics(tmp_path)[host]
    assert len(got) == 3  # the forged line is skipped, the old one read without GPUs
    seen = (GpuMetric(0, 55.0, 9000.0, 15360.0),)
    assert sorted(s["gpus"] for s in got) == [(), seen, seen]
