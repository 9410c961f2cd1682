"""The GPUs of a worker VM as its driver reports them: the boot check, and utilisation and memory for the metrics.

Two readers, one record. NVML through `nvidia-ml-py` (the NVIDIA-maintained binding,
`import pynvml`) when it is importable, since it costs no process per sample; otherwise the
driver's own `nvidia-smi`, asked for CSV:

    nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits
    0, Tesla T4, 37, 1024, 15360

(one line per GPU; utilisation in percent, memory in MiB; a field the card does not report
reads "[N/A]" or "[Not Supported]"). The boot check uses `nvidia-smi` alone: it ships with
every NVIDIA driver, and it is what the image documentation tells people to run. A driver that
is missing or does not answer is reported as such (`GpuRead.problem`), never as 0 % GPU.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

NVIDIA_SMI_QUERY = ("--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits")
SMI_TIMEOUT_S = 20.0  # a wedged driver can hang nvidia-smi: never wait longer
MAX_GPUS = 64
DRIVER_MISSING = "GPU driver not found on the image"
IMAGE_FIX = ("install the NVIDIA driver (and CUDA) in the image, see docs/gpu.md, or ask for no "
             "accelerator in cluster.toml; this VM stops itself rather than run CPU-only at GPU prices")


@dataclass(frozen=True)
class Gpu:
    """One GPU as the driver reports it at one moment."""

    index: int  # the driver's index (what CUDA_VISIBLE_DEVICES names)
    name: str  # e.g. "Tesla T4"
    util_pct: float | None  # busy share of the last sample period, 0-100; None if not reported
    mem_used_mib: float | None
    mem_total_mib: float | None


@dataclass(frozen=True)
class GpuRead:
    """What one look at the driver gave: its GPUs, or why there are none to show."""

    gpus: tuple[Gpu, ...]  # empty when `problem` is set, or on a machine without GPUs
    problem: str = ""  # "" when the driver answered; else what failed, e.g. "nvidia-smi: not found"
    source: str = ""  # "nvml" or "nvidia-smi"


def parse_smi(text: str) -> tuple[Gpu, ...]:
    """The GPUs in `nvidia-smi --query-gpu=... --format=csv,noheader,nounits` output (NVIDIA_SMI_QUERY)."""
    gpus = []
    for line in text.splitlines()[:MAX_GPUS]:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit():
            raise ValueError(f"not a line of nvidia-smi {' '.join(NVIDIA_SMI_QUERY)}: {line[:120]!r}")
        gpus.append(Gpu(index=int(fields[0]), name=fields[1], util_pct=_number(fields[2]),
                        mem_used_mib=_number(fields[3]), mem_total_mib=_number(fields[4])))
    return tuple(gpus)


def _number(field: str) -> float | None:
    try:
        return float(field)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def read_smi(nvidia_smi: str = "nvidia-smi") -> GpuRead:
    """Ask `nvidia-smi` (a name on PATH or a path); a missing or failing tool is the problem."""
    tool = shutil.which(nvidia_smi)
    if tool is None:
        return GpuRead((), problem=f"{nvidia_smi}: not found", source="nvidia-smi")
    try:
        out = subprocess.run([tool, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return GpuRead((), problem=f"{nvidia_smi}: {e}", source="nvidia-smi")
    if out.returncode != 0:
        said = (out.stdout + out.stderr).strip().splitlines()
        return GpuRead((), problem=f"{nvidia_smi} exited {out.returncode}: {said[0][:160] if said else ''}",
                       source="nvidia-smi")
    try:
        return GpuRead(parse_smi(out.stdout), source="nvidia-smi")
    except ValueError as e:
        return GpuRead((), problem=str(e), source="nvidia-smi")


def read_nvml() -> GpuRead | None:
    """Ask NVML through nvidia-ml-py; None when the binding is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # no libnvidia-ml, no driver loaded
        return GpuRead((), problem=f"NVML: {e}", source="nvml")
    try:
        gpus = []
        for i in range(min(pynvml.nvmlDeviceGetCount(), MAX_GPUS)):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(Gpu(index=i, name=name.decode() if isinstance(name, bytes) else str(name),
                            util_pct=float(util.gpu), mem_used_mib=mem.used / 2**20, mem_total_mib=mem.total / 2**20))
        return GpuRead(tuple(gpus), source="nvml")
    except pynvml.NVMLError as e:
        return GpuRead((), problem=f"NVML: {e}", source="nvml")
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def read(nvidia_smi: str = "nvidia-smi") -> GpuRead:
    """The GPUs now: NVML when nvidia-ml-py is installed, else `nvidia-smi`."""
    found = read_nvml()
    return found if found is not None else read_smi(nvidia_smi)


def boot_check(*, want: int, nvidia_smi: str = "nvidia-smi") -> str:
    """"" when the driver shows at least `want` GPUs; else the message `fab status` shows."""
    found = read_smi(nvidia_smi)
    if found.problem:
        return f"{DRIVER_MISSING} ({found.problem}): {IMAGE_FIX}"
    if len(found.gpus) < want:
        return (f"the GPU driver shows {len(found.gpus)} of the {want} GPUs asked for ({nvidia_smi}): "
                "check the image's driver and the VM's accelerators; this VM stops itself")
    return ""
