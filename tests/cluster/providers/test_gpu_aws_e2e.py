"""A GPU instance type end to end through the AWS code path (moto behind the EC2 fault proxy, lab VMs as
instances): nothing extra in RunInstances, and the agent checks and shares out the type's GPUs as on
GCE. A stand-in nvidia-smi on the lab VM plays the driver."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("boto3", reason="boto3 is not installed (pip install -e '.[test,aws]')")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")

from aws_lab import aws_lab  # noqa: E402,F401

# The real tool's `--query-gpu=index,name,utilization.gpu,memory.used,memory.total
# --format=csv,noheader,nounits` on a g4dn.12xlarge (four T4s), and its words without a driver.
FOUR_T4S = """#!/bin/sh
printf '0, Tesla T4, 0, 0, 15360\\n1, Tesla T4, 0, 0, 15360\\n2, Tesla T4, 0, 0, 15360\\n3, Tesla T4, 0, 0, 15360\\n'
"""
NO_DRIVER = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
exit 9
"""
WORK = """#!/bin/sh
# the worker process that runs this key: its GPUs and its pid (the first python up the tree)
p=$PPID
while [ "$p" -gt 1 ] && ! grep -q python "/proc/$p/cmdline" 2>/dev/null; do p=$(awk '{print $4}' "/proc/$p/stat"); done
printf '%s %s\\n' "${CUDA_VISIBLE_DEVICES:-unset}" "$p" > "$2"
sleep 0.05
"""
KEYS = 32


def stand_in(tmp_path: Path, text: str) -> str:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(text)
    tool.chmod(0o755)
    return str(tool)


def test_a_gpu_instance_type_gets_one_worker_process_per_gpu(aws_lab, tmp_path: Path):
    a = aws_lab(workers=1, workers_per_vm=3, instance_types=["g4dn.12xlarge"],
                nvidia_smi=stand_in(tmp_path, FOUR_T4S))
    share = a.lab.share
    (share / "in").mkdir(parents=True)
    for i in range(KEYS):
        (share / "in" / f"{i:03d}.txt").write_text(str(i))
    work = tmp_path / "gpu_work.sh"
    work.write_text(WORK)
    assert "agent: ok (started" in a.fab_ok("up").stdout
    (run,) = a.runs()
    assert run.params["InstanceType"] == "g4dn.12xlarge"
    assert not any(k.startswith(("ElasticGpuSpecification", "ElasticInferenceAccelerator")) for k in run.params)
    a.fab_ok("run", "sh gpu_work.sh {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
             "--ship", str(work), "--wait", "--wait-timeout", "150", timeout=200)
    by_pid: dict[str, set[str]] = {}
    for p in sorted((share / "out").iterdir()):
        devices, pid = p.read_text().split()
        by_pid.setdefault(pid, set()).add(devices)
    assert len(list((share / "out").iterdir())) == KEYS
    assert len(by_pid) == 4, by_pid  # four GPUs decide, not workers_per_vm = 3
    assert sorted(d for ds in by_pid.values() for d in ds) == ["0", "1", "2", "3"]  # one GPU each, for life
    log = next((share / ".spotfan" / "cluster" / "logs").rglob("r*.log")).read_text()
    assert "--workers 4 --gpus 4 --gpus-per-worker 1" in log, log
    a.fab_ok("down")


def test_a_gpu_instance_without_a_driver_stops(aws_lab, tmp_path: Path):
    a = aws_lab(workers=1, instance_types=["g4dn.xlarge"], nvidia_smi=stand_in(tmp_path, NO_DRIVER))
    up = a.fab("up")
    assert up.returncode != 0, up.stdout
    assert "GPU driver not found on the image" in up.stdout + up.stderr
    st = json.loads(a.fab_ok("status", "--json").stdout)
    (vm,) = st["vms"]
    assert vm["agent"] == "no-gpu-driver" and vm["status"] == "TERMINATED", vm
    a.fab_ok("down")
