"""The task engine's commands (`python -m tasks status|failures|collect|report`) run for the laptop on a
VM that has the share mounted, their results read back as untrusted input, their files fetched over SFTP.

The laptop never mounts the share, so whatever needs the engine's view of the run root
(the counts, which keys failed, every output in one table, the report's picture) is
done by one running VM. Files written there land on the share, from where the laptop
downloads them through its SFTP session; their names on the laptop come from the
laptop's own options or from validated results, never from the share as it is.
"""
from __future__ import annotations

import logging
import posixpath
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cluster import results
from cluster.errors import ClusterError, ConfigError, HostKeyError, RecordError, SSHError
from cluster.lifecycle import running_hosts
from cluster.records import COLLECT_DIR, RUN_ID, EngineCounts, RunRequest
from cluster.runs import finished, requests, spec_arguments, submit
from cluster.session import Cluster
from cluster.ssh import Host, Output
from cluster.vm.env import pythonpath
from tasks.layout import Layout

logger = logging.getLogger(__name__)

ENGINE_TIMEOUT_S = 1800.0  # collect or report over a big run may read for minutes
STATUS_TIMEOUT_S = 120.0  # `tasks status` for `fab status`
EXIT_USAGE = 2  # `python -m tasks`: a usage or spec error
REPORT_FILES = ("report.png", "report.html")
MAX_DRY_RUN_CHARS = 20_000  # of what a VM's `tasks run --dry-run` printed


@dataclass(frozen=True)
class Target:
    """The task a command is about."""

    spec_args: list[str]  # SPEC or --cmd/--src/--keys/--out (+ --name, --lease), as `tasks` takes them
    request: RunRequest | None  # the latest run of this task on the cluster (or the one named)


@dataclass(frozen=True)
class Retried:
    """What `fab failures --retry` did."""

    report: results.FailureReport  # the failures, as they were before the reset
    keys: list[str]  # keys whose failure records were reset
    run: RunRequest | None  # the run requested to retry them (None when no key was reset)
    follows: str | None  # the run it waits for on each VM, when that one was still going


def tasks_command(cluster: Cluster, args: Sequence[str]) -> str:
    """The shell command that runs `python -m tasks ARGS` on a VM, in the mounted run root; on a
    headless cluster in the VM's work folder, reaching the bucket as its agent does (the lab's
    VMs: with store.env)."""
    config = cluster.config
    argv = [config.python, "-m", "tasks", *args]
    if cluster.headless:
        path = pythonpath(extra=config.python_path)
        return ('H="${SPOTFAN_HOME:-/var/lib/spotfan}" && { [ ! -f "$H/store.env" ] || . "$H/store.env"; } && '
                f'mkdir -p "$H/work" && cd "$H/work" && PYTHONPATH={shlex.quote(path)} {shlex.join(argv)}')
    path = pythonpath(root=config.mount_point, extra=config.python_path)
    return f"cd {shlex.quote(config.mount_point)} && PYTHONPATH={shlex.quote(path)} {shlex.join(argv)}"


def folder_only(cluster: Cluster, command: str) -> None:
    """Refuse an engine command that reads a folder root only, on a headless cluster (a bucket)."""
    if cluster.headless:
        raise ConfigError(
            f"`fab {command}` needs a share on a head: on an object-store root the engine does "
            f"`tasks run` and `tasks status` only so far; `fab status` counts the keys of {cluster.config.run_root}")


def engine_counts(cluster: Cluster, spec_args: Sequence[str], hosts: Sequence[Host]) -> EngineCounts | None:
    """`python -m tasks status --json` for a task, asked of the first live VM that answers (over a
    connection kept for the next ask); None when none does, or what it printed is refused."""
    config = cluster.config
    command = tasks_command(cluster, ["status", *spec_args, "--root", config.run_root, "--json"])
    for host in hosts:
        try:
            conn = cluster.remote.kept(host)
            out = cluster.remote.run_on(conn, host, command, timeout=STATUS_TIMEOUT_S)
            return results.counts(out.stdout, host=host.name)
        except HostKeyError:
            raise
        except (SSHError, ClusterError) as e:
            cluster.remote.forget(host)
            logger.info("status via %s failed: %s", host.name, e)
    return None


def target(cluster: Cluster, ref: str = "", *, src: str = "", keys: str = "", out: str = "",
           name: str = "") -> Target:
    """The task named by `ref`: empty for the latest run, a run id, or SPEC as `fab run` takes it.

    The latest run is not known while a run request on the share is refused: that is an
    error (which names the file), not a guess.
    """
    listed = requests(cluster)
    found = listed.requests
    if not ref and not (src or keys or out):
        if listed.refused:
            raise RecordError(listed.refused[0])
        if not found:
            raise ConfigError("no run on this cluster yet: give SPEC (module:function, or a command "
                              "with --src/--keys and --out)")
        return Target(found[-1].spec_args, found[-1])
    by_id = {r.id: r for r in found}
    if ref in by_id:
        return Target(by_id[ref].spec_args, by_id[ref])
    if RUN_ID.fullmatch(ref):
        refused = [m for m in listed.refused if ref in m]
        if refused:
            raise RecordError(refused[0])
        raise ConfigError(f"no run {ref} on this cluster; `fab status` lists the runs")
    spec_args = spec_arguments(ref, src=src, keys=keys, out=out, name=name)
    same = [r for r in found if _without_lease(r.spec_args) == _without_lease(spec_args)]
    # The request's own arguments keep its --lease, which `tasks status` needs.
    return Target(same[-1].spec_args, same[-1]) if same else Target(spec_args, None)


def _without_lease(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--lease":
            skip = True
        else:
            out.append(a)
    return out


def run_engine(cluster: Cluster, args: list[str], *, timeout: float = ENGINE_TIMEOUT_S) -> Output:
    """`python -m tasks ARGS` on the first running VM that answers SSH. An exit other than 0
    raises with what the engine said (its message says how to fix it)."""
    hosts = running_hosts(cluster)
    if not hosts:
        raise ClusterError("no VM is running to read the share: `fab heal` starts the stopped ones "
                           "(their agents stop them again after idle_timeout)")
    remote = cluster.remote
    command = tasks_command(cluster, args)
    unreachable = []
    for host in hosts:
        try:
            conn = remote.open(host, attempts=1)
        except HostKeyError:
            raise
        except SSHError as e:
            logger.info("%s: %s", host.name, e)
            unreachable.append(f"{host.name}: {e}")
            continue
        with conn:
            out = remote.run_on(conn, host, command, timeout=timeout, check=False)
        if out.ok:
            return out
        said = (out.stderr.strip() or out.stdout.strip() or "(nothing)").removeprefix("error: ")
        error = ConfigError if out.exit_code == EXIT_USAGE else ClusterError
        raise error(f"`python -m tasks {args[0]}` on {host.name} exited {out.exit_code}: {said}")
    raise ClusterError("no running VM answered SSH:\n  " + "\n  ".join(unreachable)
                       + "\n`fab heal` restarts what it can")


def dry_run(cluster: Cluster, *, spec_args: Sequence[str], run_args: Sequence[str],
            workers_per_vm: int | None) -> str:
    """What `tasks run --dry-run` says on one running VM of the cluster (what a run would do
    there now): nothing is requested, claimed or written."""
    workers = workers_per_vm or cluster.config.workers_per_vm
    out = run_engine(cluster, ["run", *spec_args, "--root", cluster.config.run_root, *run_args,
                               "--workers", str(workers), "--dry-run"])
    return "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in out.stdout[:MAX_DRY_RUN_CHARS])


def failures(cluster: Cluster, t: Target) -> results.FailureReport:
    """The task's failed keys grouped by error."""
    folder_only(cluster, "failures")
    out = run_engine(cluster, ["failures", *t.spec_args, "--root", cluster.config.run_root, "--json"])
    return results.failures(out.stdout, host=out.host)


def retry(cluster: Cluster, t: Target) -> Retried:
    """Reset the failed keys' records and request a run that retries them.

    A `tasks run` reads the failure records when it starts, so a run still going would
    never pick the reset keys up: the new run follows it (on each VM it starts once that
    run's process there has ended), and a run that is over is simply run again, with the
    options it had. Nothing is requested when no key was reset.
    """
    folder_only(cluster, "failures --retry")
    out = run_engine(cluster, ["failures", *t.spec_args, "--root", cluster.config.run_root, "--json", "--retry"])
    report = results.failures(out.stdout, host=out.host)
    keys = list(report.retried or ())
    if not keys:
        return Retried(report, keys, None, None)
    prev = t.request
    going = prev is not None and finished(cluster, prev.id) is None
    req = submit(cluster, spec_args=t.spec_args, run_args=prev.run_args if prev else [],
                 workers_per_vm=prev.workers_per_vm if prev else None,
                 after=prev.id if going and prev else None)
    return Retried(report, keys, req, req.after)


def collect(cluster: Cluster, t: Target, to: Path, *, skip_unreadable: bool = False,
            reader: str = "") -> tuple[results.Collected, Path]:
    """Every output of the task in one table, written on a VM into the share, then
    downloaded to `to` (Parquet or pickle, by its suffix) and removed from the share."""
    from tasks.collect import table_format  # pandas: only for the commands that need it
    from tasks.errors import SpecError

    folder_only(cluster, "collect")
    try:
        fmt = table_format(to)
    except SpecError as e:
        raise ConfigError(str(e)) from e
    to = to.resolve()
    if not to.parent.is_dir():
        raise ConfigError(f"cannot write {to}: its folder does not exist; create it first")
    mount = cluster.config.mount_point
    rel = f"{COLLECT_DIR}/{secrets.token_hex(4)}{to.suffix}"
    args = ["collect", *t.spec_args, "--root", mount, "--to", posixpath.join(mount, rel), "--format", fmt]
    if skip_unreadable:
        args.append("--skip-unreadable")
    if reader:
        args += ["--reader", reader]
    share = cluster.share
    share.makedirs(COLLECT_DIR)
    try:
        out = run_engine(cluster, args)
        got = results.collected(out.stdout, host=out.host)
        share.download(rel, to)
    finally:
        share.remove(rel)
    return got, to


def report(cluster: Cluster, t: Target, to: Path) -> tuple[results.Reported, list[Path]]:
    """Draw the task's report on a VM (into the task's bookkeeping folder on the share),
    then download report.png and report.html to `to`/<task>/.

    The task's name comes from the VM's output (and before that from a run request on the
    share): it picks a folder under `to` only if it is one plain folder name, so neither a
    share writer nor a VM can make the laptop write outside `to`."""
    folder_only(cluster, "report")
    out = run_engine(cluster, ["report", *t.spec_args, "--root", cluster.config.run_root])
    got = results.reported(out.stdout, host=out.host, to=str(to))
    folder = to / got.task
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in REPORT_FILES:
        cluster.share.download(f"{Layout(Path(), got.task).task_dir.as_posix()}/{name}", folder / name)
        paths.append((folder / name).resolve())
    return got, paths
