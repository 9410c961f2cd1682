"""The task engine's own commands (`python -m tasks failures|collect|report`) run for the
laptop on a VM that has the share mounted, and the files they write brought back over SFTP.

The laptop never mounts the share, so whatever needs the engine's view of the run root
(which keys failed, every output read into one table, the report's picture) is done by
one running VM, as `fab status` does for its counts. Files written there land on the
share, from where the laptop downloads them through its SFTP session (cluster.share).
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import runs
from cluster.bootstrap import running_hosts
from cluster.config import ClusterConfig
from cluster.errors import ClusterError, ConfigError, HostKeyError, SSHError
from cluster.share import CLUSTER_DIR, Share
from cluster.ssh import Output, Remote
from tasks.keys import name_problem
from tasks.layout import Layout

logger = logging.getLogger(__name__)

ENGINE_TIMEOUT_S = 1800.0  # collect or report over a big run may read for minutes
COLLECT_DIR = f"{CLUSTER_DIR}/collect"  # `fab collect` writes its table here, then downloads it
RUN_ID = re.compile(r"r\d{8}-\d{6}-[0-9a-f]{4}")
EXIT_USAGE = 2  # `python -m tasks`: a usage or spec error


@dataclass(frozen=True)
class Target:
    """The task a command is about."""

    spec_args: list[str]  # SPEC or --cmd/--src/--keys/--out (+ --name, --lease), as `tasks` takes them
    request: runs.RunRequest | None  # the latest run of this task on the cluster (or the one named)


@dataclass(frozen=True)
class Retried:
    """What `fab failures --retry` did."""

    keys: list[str]  # keys whose failure records were reset
    run: runs.RunRequest | None  # the run requested to retry them (None when no key was reset)
    follows: str | None  # the run it waits for on each VM, when that one was still going


@dataclass(frozen=True)
class Fetched:
    """Files the engine wrote on the share, now on the laptop."""

    info: dict[str, Any]  # what the engine printed (its JSON line)
    paths: list[Path]  # where they are on the laptop


def target(config: ClusterConfig, ref: str = "", *, src: str = "", keys: str = "", out: str = "",
           name: str = "") -> Target:
    """The task named by `ref`: empty for the latest run, a run id, or SPEC as `fab run` takes it."""
    with Share.from_config(config) as share:
        requests = runs.requests(share)
    if not ref and not (src or keys or out):
        if not requests:
            raise ConfigError("no run on this cluster yet: give SPEC (module:function, or a command "
                              "with --src/--keys and --out)")
        return Target(requests[-1].spec_args, requests[-1])
    by_id = {r.id: r for r in requests}
    if ref in by_id:
        return Target(by_id[ref].spec_args, by_id[ref])
    if RUN_ID.fullmatch(ref):
        raise ConfigError(f"no run {ref} on this cluster; `fab status` lists the runs")
    spec_args = runs.spec_arguments(ref, src=src, keys=keys, out=out, name=name)
    same = [r for r in requests if _without_lease(r.spec_args) == _without_lease(spec_args)]
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


def run_engine(config: ClusterConfig, args: list[str], *, timeout: float = ENGINE_TIMEOUT_S) -> Output:
    """`python -m tasks ARGS` on the first running VM that answers SSH. An exit other than 0
    raises with what the engine said (its message says how to fix it)."""
    hosts = running_hosts(config)
    if not hosts:
        raise ClusterError("no VM is running to read the share: `fab heal` starts the stopped ones "
                           "(their agents stop them again after idle_timeout)")
    remote = Remote.from_config(config)
    command = runs.tasks_command(config, args)
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


def _json_line(out: Output) -> dict[str, Any]:
    """The engine's result: the last line of stdout, one JSON object."""
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    try:
        data = json.loads(lines[-1])
    except (IndexError, ValueError) as e:
        raise ClusterError(f"{out.host}: `python -m tasks` printed no JSON result: "
                           f"{out.stdout.strip()[-300:]!r}") from e
    if not isinstance(data, dict):
        raise ClusterError(f"{out.host}: `python -m tasks` printed {data!r}, not a JSON object")
    return data


def failures(config: ClusterConfig, t: Target) -> dict[str, Any]:
    """The task's failed keys grouped by error (tasks.failures.FailureReport as JSON)."""
    return _json_line(run_engine(config, ["failures", *t.spec_args, "--root", config.mount_point,
                                          "--json"]))


def retry(config: ClusterConfig, t: Target) -> tuple[dict[str, Any], Retried]:
    """Reset the failed keys' records and request a run that retries them.

    A `tasks run` reads the failure records when it starts, so a run still going would
    never pick the reset keys up: the new run follows it (on each VM it starts once that
    run's process there has ended), and a run that is over is simply run again, with the
    options it had. Nothing is requested when no key was reset.
    """
    report = _json_line(run_engine(config, ["failures", *t.spec_args, "--root", config.mount_point,
                                            "--json", "--retry"]))
    keys = list(report.get("retried") or [])
    if not keys:
        return report, Retried(keys, None, None)
    prev = t.request
    with Share.from_config(config) as share:
        going = prev is not None and runs.finished(share, prev.id) is None
    req = runs.submit(config, spec_args=t.spec_args, run_args=prev.run_args if prev else [],
                      workers_per_vm=prev.workers_per_vm if prev else None,
                      after=prev.id if going and prev else None)
    return report, Retried(keys, req, req.after)


def collect(config: ClusterConfig, t: Target, to: Path, *, skip_unreadable: bool = False,
            reader: str = "") -> Fetched:
    """Every output of the task in one table, written on a VM into the share, then
    downloaded to `to` (Parquet or pickle, by its suffix) and removed from the share."""
    from tasks.collect import table_format  # pandas: only for the commands that need it
    from tasks.errors import SpecError

    try:
        fmt = table_format(to)
    except SpecError as e:
        raise ConfigError(str(e)) from e
    to = to.resolve()
    if not to.parent.is_dir():
        raise ConfigError(f"cannot write {to}: its folder does not exist; create it first")
    rel = f"{COLLECT_DIR}/{secrets.token_hex(4)}{to.suffix}"
    args = ["collect", *t.spec_args, "--root", config.mount_point,
            "--to", posixpath.join(config.mount_point, rel), "--format", fmt]
    if skip_unreadable:
        args.append("--skip-unreadable")
    if reader:
        args += ["--reader", reader]
    with Share.from_config(config) as share:
        share.makedirs(COLLECT_DIR)
        try:
            info = _json_line(run_engine(config, args))
            share.download(rel, to)
        finally:
            share.remove(rel)
    return Fetched({**info, "to": str(to)}, [to])


def report(config: ClusterConfig, t: Target, to: Path) -> Fetched:
    """Draw the task's report on a VM (into the task's bookkeeping folder on the share),
    then download report.png and report.html to `to`/<task>/.

    The task's name comes from the VM's output (and before that from a run request on the
    share): it picks a folder under `to` only if it is one plain folder name, so neither a
    share writer nor a VM can make the laptop write outside `to`."""
    out = run_engine(config, ["report", *t.spec_args, "--root", config.mount_point])
    info = _json_line(out)
    task = info.get("task")
    why = name_problem(task) if isinstance(task, str) else "is not a string"
    if why is not None:
        raise ClusterError(f"{out.host} reported the task name {str(task)[:80]!r}, which {why}: "
                           f"refusing to use it as a folder under {to}. The run request on the "
                           f"share may be forged: check {runs.RUNS_DIR}/ on the share")
    folder = to / task
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with Share.from_config(config) as share:
        for name in ("report.png", "report.html"):
            share.download(f"{Layout(Path(), task).task_dir.as_posix()}/{name}", folder / name)
            paths.append((folder / name).resolve())
    return Fetched(info, paths)
