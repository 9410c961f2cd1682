"""Reading the GPUs: nvidia-smi's CSV as the real tool prints it, NVML when installed, and a missing
driver reported as missing, never as an idle GPU."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from cluster.vm import gpus

# Recorded from `nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total
# --format=csv,noheader,nounits`: a busy T4 and an idle one; then a card that reports no utilisation.
T4S = "0, Tesla T4, 97, 14101, 15360\n1, Tesla T4, 0, 3, 15360\n"
NOT_SUPPORTED = "0, NVIDIA GeForce GT 710, [N/A], 254, 2001\n"


def tool(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_parse_the_real_csv_shape():
    busy, idle = gpus.parse_smi(T4S)
    assert (busy.index, busy.name, busy.util_pct, busy.mem_used_mib, busy.mem_total_mib) == (0, "Tesla T4", 97, 14101, 15360)
    assert idle.util_pct == 0 and idle.index == 1
    (old,) = gpus.parse_smi(NOT_SUPPORTED)
    assert old.util_pct is None and old.mem_used_mib == 254  # unknown is not 0 %


def test_garbage_is_refused():
    with pytest.raises(ValueError, match="not a line of nvidia-smi"):
        gpus.parse_smi("No devices were found\n")


def test_read_through_nvidia_smi(tmp_path):
    read = gpus.read_smi(tool(tmp_path, f"printf '{T4S}'\n"))
    assert read.problem == "" and [g.util_pct for g in read.gpus] == [97, 0]


def test_missing_or_failing_driver_is_a_problem_not_zero_percent(tmp_path):
    missing = gpus.read_smi(str(tmp_path / "no-such-nvidia-smi"))
    assert missing.gpus == () and "not found" in missing.problem
    failing = gpus.read_smi(tool(tmp_path, "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9\n"))
    assert failing.gpus == () and failing.problem.startswith(f"{tmp_path}/nvidia-smi exited 9: NVIDIA-SMI has failed")
    said = gpus.boot_check(want=1, nvidia_smi=str(tmp_path / "no-such-nvidia-smi"))
    assert said.startswith("GPU driver not found on the image (") and "docs/gpu.md" in said


def test_boot_check_counts_the_gpus(tmp_path):
    smi = tool(tmp_path, f"printf '{T4S}'\n")
    assert gpus.boot_check(want=2, nvidia_smi=smi) == ""
    assert "shows 2 of the 4 GPUs asked for" in gpus.boot_check(want=4, nvidia_smi=smi)


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="nvidia-ml-py is installed here")
def test_without_nvml_the_reader_falls_back_to_nvidia_smi(tmp_path):
    assert gpus.read_nvml() is None
    read = gpus.read(tool(tmp_path, f"printf '{T4S}'\n"))
    assert read.source == "nvidia-smi" and len(read.gpus) == 2
    none = gpus.read(str(tmp_path / "absent"))
    assert none.source == "nvidia-smi" and none.problem and none.gpus == ()
