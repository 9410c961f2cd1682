"""`fab top`: every running VM sampled at once (`python -m cluster.vm.top` there), each judged against the
worker processes its runs asked for, so that a person sees what limits the run where."""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from cluster.errors import ClusterError, ResultError
from cluster.lifecycle import running_hosts
from cluster.providers.base import Accelerated
from cluster.runs import requests
from cluster.session import Cluster
from cluster.ssh import Host
from cluster.status import cluster_status
from cluster.vm.env import pythonpath
from cluster.vm.sample import MAX_SECONDS, Sample
from cluster.vm.verdict import Verdict

TOP_SLACK_S = 30.0  # beyond the sample itself: SSH, starting Python, importing psutil
MAX_TOP_BYTES = 1 << 20  # what one VM's sampler may print


@dataclass(frozen=True)
class VMTop:
    """One VM's sample and verdict."""

    name: str  # the VM
    workers: int  # pool processes its running runs asked for: what the verdict judges against
    sample: Sample
    verdict: Verdict


def asked_workers(cluster: Cluster) -> dict[str, int]:
    """Per VM, the `tasks run --workers` of the runs its agent is running (summed), else the
    cluster's default. On GPU VMs the agent starts one worker process per GPU group instead."""
    gpus = cluster.provider.gpus_per_vm() if isinstance(cluster.provider, Accelerated) else 0
    per_gpus = gpus // cluster.config.gpus_per_worker if gpus else 0
    default = per_gpus or cluster.config.workers_per_vm
    status = cluster_status(cluster, live=False)
    asked = {r.id: per_gpus or r.workers_per_vm or default for r in requests(cluster).requests}
    out = {}
    for vm in status.vms:
        going = [asked[rid] for rid, state in vm.runs.items() if state == "running" and rid in asked]
        out[vm.name] = sum(going) or default
    return out


def top(cluster: Cluster, *, seconds: float) -> dict[str, VMTop]:
    """Sample every running VM at once for `seconds`; GroupError carries each VM's result or error."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ClusterError(f"--seconds must be in (0, {MAX_SECONDS:.0f}], got {seconds:g}")
    hosts = running_hosts(cluster)
    if not hosts:
        raise ClusterError("no VM is running: `fab status` shows why, `fab heal` starts stopped ones")
    workers = asked_workers(cluster)
    config, remote = cluster.config, cluster.remote
    path = pythonpath(extra=config.python_path)

    def one(host: Host) -> VMTop:
        n = workers[host.name] if host.name in workers else config.workers_per_vm
        argv = [config.python, "-m", "cluster.vm.top", "--seconds", f"{seconds:g}", "--json", "--workers", str(n),
                "--nvidia-smi", config.nvidia_smi]
        command = (f"PYTHONPATH={shlex.quote(path)} " if path else "") + shlex.join(argv)
        with remote.open(host) as conn:
            out = remote.run_on(conn, host, command, timeout=seconds + TOP_SLACK_S)
        source = f"what `python -m cluster.vm.top` printed on {host.name}"
        if len(out.stdout) > MAX_TOP_BYTES:
            raise ResultError(f"refused {source}: more than {MAX_TOP_BYTES} bytes")
        try:
            data = json.loads(out.stdout)
        except ValueError as e:
            raise ResultError(f"{host.name}: cluster.vm.top printed no sample ({e}): "
                              f"{out.stdout.strip()[-200:]!r}") from e
        if not isinstance(data, dict):
            raise ResultError(f"refused {source}: not a JSON object")
        return VMTop(host.name, n, Sample.from_dict(data.get("sample"), source=f"{source}: sample"),
                     Verdict.from_dict(data.get("verdict"), source=f"{source}: verdict"))

    return remote.each(hosts, one, what="cluster.vm.top")
