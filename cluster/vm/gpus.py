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
A sampler looks through a `GpuMeter`: NVML opened once and kept open, utilisation averaged
over the looks of one sample, memory at its peak.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any

NVIDIA_SMI_QUERY = ("--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
                    "--format=csv,noheader,nounits")
SMI_TIMEOUT_S = 20.0  # a wedged driver can hang nvidia-smi: never wait longer
MAX_GPUS = 64
MAX_NAME = 96  # NVML's device name buffer (NVML_DEVICE_NAME_V2_BUFFER_SIZE)
NVML_LOOK_S = 1.0  # NVML's own utilisation period is 1/6 s to 1 s: looking more often adds nothing
SMI_LOOK_S = 2.5  # nvidia-smi is a process per look: fewer looks
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


def nvml_module() -> Any | None:
    """nvidia-ml-py's `pynvml`, imported on first use; None when it is not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pynvml


class NvmlSession:
    """NVML opened once (nvmlInit) and read many times: what a sampler that looks every second wants.

    `nvml` is the `pynvml` module, or in tests a stand-in for it with the same few functions
    (nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex, nvmlDeviceGetName,
    nvmlDeviceGetUtilizationRates, nvmlDeviceGetMemoryInfo) and its `NVMLError`. Shapes, from
    NVIDIA's NVML API reference: nvmlUtilization_t has `gpu` and `memory`, percent of the last
    sample period (1/6 s to 1 s by product); nvmlMemory_t has `total`, `free` and `used` in bytes.
    """

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.opened = False
        self.problem = ""  # why NVML could not be opened, once it was tried

    def read(self) -> GpuRead:
        nv = self.nvml
        if not self.opened:
            if self.problem:
                return GpuRead((), problem=self.problem, source="nvml")
            try:
                nv.nvmlInit()
            except nv.NVMLError as e:  # no libnvidia-ml, no driver loaded
                self.problem = f"NVML: {e}"
                return GpuRead((), problem=self.problem, source="nvml")
            self.opened = True
        try:
            handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(min(nv.nvmlDeviceGetCount(), MAX_GPUS))]
        except nv.NVMLError as e:
            return GpuRead((), problem=f"NVML: {e}", source="nvml")
        return GpuRead(tuple(self._one(i, h) for i, h in enumerate(handles)), source="nvml")

    def _one(self, index: int, handle: Any) -> Gpu:
        """One GPU; a query the card does not support (NVMLError) leaves its field unknown, not 0."""
        nv = self.nvml

        def ask(call: Any) -> Any:
            try:
                return call(handle)
            except nv.NVMLError:
                return None

        name, util, mem = ask(nv.nvmlDeviceGetName), ask(nv.nvmlDeviceGetUtilizationRates), ask(nv.nvmlDeviceGetMemoryInfo)
        return Gpu(index=index, name=(name.decode(errors="replace") if isinstance(name, bytes) else str(name or "?"))[:MAX_NAME],
                   util_pct=None if util is None else float(util.gpu),
                   mem_used_mib=None if mem is None else mem.used / 2**20,
                   mem_total_mib=None if mem is None else mem.total / 2**20)

    def close(self) -> None:
        if self.opened:
            self.opened = False
            try:
                self.nvml.nvmlShutdown()
            except self.nvml.NVMLError:
                pass


def read_nvml(nvml: Any | None = None) -> GpuRead | None:
    """Ask NVML once (`nvml`: the pynvml module by default); None when nvidia-ml-py is not installed."""
    nvml = nvml if nvml is not None else nvml_module()
    if nvml is None:
        return None
    session = NvmlSession(nvml)
    try:
        return session.read()
    finally:
        session.close()


def read(nvidia_smi: str = "nvidia-smi") -> GpuRead:
    """The GPUs now: NVML when nvidia-ml-py is installed and opens, else `nvidia-smi`."""
    meter = GpuMeter(nvidia_smi=nvidia_smi)
    try:
        return meter.read()
    finally:
        meter.close()


class GpuMeter:
    """The GPUs over one sample of a few seconds: utilisation averaged over looks, memory at its peak.

    Looks through NVML (opened once, kept open across samples) every NVML_LOOK_S; without
    nvidia-ml-py, or where NVML does not open, through `nvidia-smi` every SMI_LOOK_S (a
    process each time). `nvml` is the pynvml module by default, or a stand-in in tests.
    """

    def __init__(self, *, nvidia_smi: str = "nvidia-smi", nvml: Any | None = None) -> None:
        self.nvidia_smi = nvidia_smi
        self._nvml_given = nvml
        self._session: NvmlSession | None = None
        self._resolved = False
        self._reads: list[GpuRead] = []
        self._last_look = -float("inf")

    def read(self) -> GpuRead:
        """One look at the driver now."""
        if not self._resolved:
            module = self._nvml_given if self._nvml_given is not None else nvml_module()
            self._session = NvmlSession(module) if module is not None else None
            self._resolved = True
        if self._session is not None:
            found = self._session.read()
            if not found.problem:
                return found
            smi = read_smi(self.nvidia_smi)  # NVML did not open: the driver's tool may still answer
            return smi if not smi.problem else GpuRead((), problem=f"{found.problem}; {smi.problem}", source="nvml")
        return read_smi(self.nvidia_smi)

    def start(self) -> None:
        """A new sample begins: forget the looks of the last one."""
        self._reads = []
        self._last_look = -float("inf")

    def look(self, *, now: float | None = None) -> None:
        """Look at the GPUs if the last look is old enough (called every tick of a sample)."""
        now = time.monotonic() if now is None else now
        every = NVML_LOOK_S if self._session is not None and self._session.opened else SMI_LOOK_S
        if now - self._last_look >= every:
            self._last_look = now
            self._reads.append(self.read())

    def result(self) -> GpuRead:
        """The sample's GPUs: mean utilisation over the looks that reported it, peak memory used."""
        if not self._reads:
            self._reads.append(self.read())
        return combine(self._reads)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._resolved = False
        self._session = None


def combine(reads: list[GpuRead]) -> GpuRead:
    """Several looks as one: the GPUs of the last look that saw any, each with its mean utilisation
    and peak memory over the looks; the last problem when no look saw a GPU."""
    seen = [r for r in reads if r.gpus]
    if not seen:
        last = reads[-1]
        return GpuRead((), problem=last.problem, source=last.source)
    by_index: dict[int, list[Gpu]] = {}
    for r in seen:
        for g in r.gpus:
            by_index.setdefault(g.index, []).append(g)
    gpus = []
    for g in seen[-1].gpus:
        looks = by_index[g.index]
        utils = [x.util_pct for x in looks if x.util_pct is not None]
        used = [x.mem_used_mib for x in looks if x.mem_used_mib is not None]
        gpus.append(replace(g, util_pct=sum(utils) / len(utils) if utils else None,
                            mem_used_mib=max(used) if used else None))
    return GpuRead(tuple(gpus), source=seen[-1].source)


def boot_check(*, want: int, nvidia_smi: str = "nvidia-smi") -> str:
    """"" when the driver shows at least `want` GPUs; else the message `fab status` shows."""
    found = read_smi(nvidia_smi)
    if found.problem:
        return f"{DRIVER_MISSING} ({found.problem}): {IMAGE_FIX}"
    if len(found.gpus) < want:
        return (f"the GPU driver shows {len(found.gpus)} of the {want} GPUs asked for ({nvidia_smi}): "
                "check the image's driver and the VM's accelerators; this VM stops itself")
    return ""
