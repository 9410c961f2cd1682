"""GPU VMs in the lab: the boot's driver check fails closed, and the real agent starts one worker
process per GPU, each with its own CUDA_VISIBLE_DEVICES (a stand-in nvidia-smi plays the driver)."""
from __future__ import annotations

import json
from pathlib import Path

from cluster.config import load
from labs import Lab

# The real tool's output for `--query-gpu=index,name,utilization.gpu,memory.used,memory.total
# --format=csv,noheader,nounits` on a two-T4 VM, and its words when the driver is not loaded.
GOOD_SMI = """#!/bin/sh
case "$*" in
  *--query-gpu=*) printf '0, Tesla T4, 0, 0, 15360\\n1, Tesla T4, 0, 0, 15360\\n' ;;
  *) printf 'GPU 0: Tesla T4 (UUID: GPU-0)\\nGPU 1: Tesla T4 (UUID: GPU-1)\\n' ;;
esac
"""
NO_DRIVER_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."
exit 9
"""
WORK = """#!/bin/sh
# what the worker process that runs this key sees: its GPUs, and its pid (the first python up the tree)
p=$PPID
while [ "$p" -gt 1 ] && ! grep -q python "/proc/$p/cmdline" 2>/dev/null; do p=$(awk '{print $4}' "/proc/$p/stat"); done
printf '%s %s\\n' "${CUDA_VISIBLE_DEVICES:-unset}" "$p" > "$2"
sleep 0.05
"""
KEYS = 24


def gpu_lab(make_lab, *, smi: str, gpus: int, workers_per_vm: int = 1) -> Lab:
    lab = make_lab(workers=1, workers_per_vm=workers_per_vm, idle_timeout=120)
    tool = lab.folder / "nvidia-smi"
    tool.write_text(smi)
    tool.chmod(0o755)
    toml = lab.folder / "cluster.toml"
    text = toml.read_text().replace('mount_point = "mnt"', f'mount_point = "mnt"\nnvidia_smi = "{tool}"')
    toml.write_text(text + f"gpus = {gpus}\n")  # [lab] is the last table
    return Lab(lab.folder, load(toml))


def test_missing_gpu_driver_is_reported_and_the_vm_stops_itself(make_lab):
    lab = gpu_lab(make_lab, smi=NO_DRIVER_SMI, gpus=1)
    (vm,) = lab.config.vm_names()
    up = lab.fab("up")
    assert up.returncode != 0, up.stdout
    assert "GPU driver not found on the image" in up.stdout + up.stderr
    lab.wait_for(f"{vm} to stop", lambda: lab.statuses().get(vm) == "TERMINATED", timeout=60)
    status = lab.fab("status")
    assert f"{vm}: GPU driver not found on the image (" in status.stdout, status.stdout
    assert "couldn't communicate with the NVIDIA driver" in status.stdout
    st = json.loads(lab.fab_ok("status", "--json"))
    (state,) = st["vms"]
    assert state["agent"] == "no-gpu-driver" and state["status"] == "TERMINATED"
    # `fab up` stopped it as soon as its agent said so; started again by anyone else (a spot
    # VM's own restart), it stops itself: its guard powers it off at its agent's word.
    lab.provider.start([vm])
    lab.wait_for(f"{vm} to stop itself", lambda: lab.statuses().get(vm) == "TERMINATED", timeout=90)
    guard = (lab.provider.vm_home(vm) / "watchdog.log").read_text()
    assert "the agent says this VM cannot work (no-gpu-driver): powering off" in guard, guard


def test_one_worker_process_per_gpu_each_with_its_own_devices(make_lab, tmp_path: Path):
    lab = gpu_lab(make_lab, smi=GOOD_SMI, gpus=2, workers_per_vm=5)  # GPUs decide, not workers_per_vm
    (lab.share / "in").mkdir(parents=True)
    for i in range(KEYS):
        (lab.share / "in" / f"{i:03d}.txt").write_text(str(i))
    work = tmp_path / "gpu_work.sh"
    work.write_text(WORK)
    assert "agent: ok (started" in lab.fab_ok("up")
    lab.fab_ok("run", "sh gpu_work.sh {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
               "--ship", str(work), "--wait", "--wait-timeout", "150", timeout=200)
    rows = [p.read_text().split() for p in sorted((lab.share / "out").iterdir())]
    assert len(rows) == KEYS
    by_pid: dict[str, set[str]] = {}
    for devices, pid in rows:
        by_pid.setdefault(pid, set()).add(devices)
    assert len(by_pid) == 2, by_pid  # two GPUs: two worker processes
    assert sorted(d for ds in by_pid.values() for d in ds) == ["0", "1"]  # one GPU each, for life
    log = next((lab.share / ".spotfan" / "cluster" / "logs").rglob("r*.log")).read_text()
    assert "--workers 2 --gpus 2 --gpus-per-worker 1" in log, log
