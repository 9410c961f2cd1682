"""`fab top`: cluster.top sampled on every running VM at once, each VM judged against the
worker processes its runs asked for, so that a person sees what limits the run where.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from cluster import runs
from cluster.bootstrap import running_hosts
from cluster.config import ClusterConfig
from cluster.errors import ClusterError
from cluster.share import Share
from cluster.ssh import Host, Remote
from cluster.top import MAX_SECONDS, Sample, Verdict

TOP_SLACK_S = 30.0  # beyond the sample itself: SSH, starting Python, importing psutil


@dataclass(frozen=True)
class VMTop:
    """One VM's sample and verdict."""

    name: str  # the VM
    workers: int  # pool processes its running runs asked for: what the verdict judges against
    sample: Sample
    verdict: Verdict


def asked_workers(config: ClusterConfig) -> dict[str, int]:
    """Per VM, the `tasks run --workers` of the runs its agent is running (summed), else the
    cluster's default."""
    status = runs.cluster_status(config, live=False)
    with Share.from_config(config) as share:
        asked = {r.id: r.workers_per_vm or config.workers_per_vm for r in runs.requests(share)}
    out = {}
    for vm in status.vms:
        going = [asked[rid] for rid, state in vm.runs.items() if state == "running" and rid in asked]
        out[vm.name] = sum(going) or config.workers_per_vm
    return out


def top(config: ClusterConfig, *, seconds: float) -> dict[str, VMTop]:
    """Sample every running VM at once for `seconds`; GroupError carries each VM's result or error."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ClusterError(f"--seconds must be in (0, {MAX_SECONDS:.0f}], got {seconds:g}")
    hosts = running_hosts(config)
    if not hosts:
        raise ClusterError("no VM is running: `fab status` shows why, `fab heal` starts stopped ones")
    workers = asked_workers(config)
    remote = Remote.from_config(config)
    pythonpath = ":".join(config.python_path)

    def one(host: Host) -> VMTop:
        n = workers.get(host.name, config.workers_per_vm)
        argv = [config.python, "-m", "cluster.top", "--seconds", f"{seconds:g}", "--json",
                "--workers", str(n)]
        command = (f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else "") + shlex.join(argv)
        with remote.open(host) as conn:
            out = remote.run_on(conn, host, command, timeout=seconds + TOP_SLACK_S)
        try:
            data = json.loads(out.stdout)
            return VMTop(host.name, n, Sample.from_dict(data["sample"]),
                         Verdict.from_dict(data["verdict"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ClusterError(f"{host.name}: cluster.top printed no sample ({e}): "
                               f"{out.stdout.strip()[-200:]!r}") from e

    return remote.each(hosts, one, what="cluster.top")
