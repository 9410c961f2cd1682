"""The `fab` commands (Fabric 3; `spotfan` when installed): up, run, status, logs, exec, heal, down,
preempt, head-setup, push and pull (cluster.cli_files), and for operators: failures, top, report, collect.

Each command builds one Cluster from cluster.toml, calls one function of the package,
renders with cluster.show, and turns errors into exit codes (0 ok; 1 some VMs or keys
failed; 2 bad config, usage or a file refused on the share; 3 a host key did not match).
The config file is `--config FILE`, else $SPOTFAN_CONFIG, else ./cluster.toml. Nothing
here ever prompts, so every command works from scripts. Each command imports the modules only
it needs (lifecycle, status, ...) when it runs: `fab push` starts without loading them.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from invoke import Collection, task
from invoke.exceptions import Exit
from invoke.program import Program

from cluster import follow as following, runs, show, watch as watching
from cluster.cli_files import pull, push  # noqa: F401  (in `spotfan`'s commands)
from cluster.command import EXIT_FAILED, EXIT_USAGE, command as _command, group_exit_code as _group_exit_code
from cluster.command import group_line as _group_line
from cluster.command import seconds as _seconds, whole as _whole
from cluster.errors import ClusterError, GroupError, UsageError
from cluster.providers.base import LocalHead, Priced
from cluster.session import Cluster
from cluster.share import ship_files
from cluster.vm.sample import DEFAULT_SECONDS as TOP_SECONDS

if TYPE_CHECKING:
    from cluster.remote_tasks import Target

__all__ = ["collect", "down", "exec_", "failures", "head_setup", "heal", "logs", "main", "preempt", "pull",
           "push", "report", "run", "status", "top", "up"]

RESULT_EXIT = {"done": 0, "failed": EXIT_FAILED, "spec-error": EXIT_USAGE}


def _cost(cluster: Cluster, workers: int) -> str:
    provider, name = cluster.provider, cluster.config.provider
    if isinstance(provider, Priced):
        return provider.describe_cost(workers)
    return f"{workers} {name} VMs; no cost" + (" (they run on this machine)" if isinstance(provider, LocalHead)
                                              else " estimate for this provider")


@task(help={"count": "number of worker VMs (default: as last asked, else cluster.toml)",
            "config": "cluster.toml to use", "json": "print the result as JSON"})
@_command
def up(c, cluster: Cluster, count=None, json=False):
    """Create the cluster's VMs, mount the share on each and start their agents (idempotent)."""
    from cluster import lifecycle

    n = _whole(count, flag="--count", example="fab up --count 3") if count is not None else None
    cfg = cluster.config
    show.say(f"==> up: cluster {cfg.name} ({cfg.provider}), {'as many VMs as last time' if n is None else f'{n} VMs'}")
    t = time.monotonic()
    head_cost = lifecycle.head_vm_cost(cluster)
    if head_cost is not None:  # said before the head VM is created
        show.say(f"==> up: head VM cost: {head_cost}")
        head = lifecycle.up_head(cluster, workers=n)
        assert head is not None
        show.say(f"==> up: head VM {head.name} running in {head.zone} at {head.address} (host keys from the provider, not a first connection)")
    reports = lifecycle.up(cluster, count=n, on_plan=lambda p: show.plan(p, cost=_cost(cluster, p.workers)),
                           on_booted=show.booted, on_waiting=show.waiting_for("up"))
    show.reports(reports, as_json=json)
    show.say(f"==> up: {sum(r.action != 'deleted' for r in reports)} VMs working ({time.monotonic() - t:.1f}s)")


@task(positional=["spec"], auto_shortflags=False, help={
    "spec": "module:function, or a command line with {src}/{out} placeholders (then --src or --keys, and --out)",
    "src": "for a command: glob of inputs under the root", "keys": "for a command: file of keys",
    "out": "for a command: output template", "name": "task name", "workers_per_vm": "tasks run --workers on each VM",
    "max_attempts": "tries per key", "lease": "claim lease in seconds", "limit": "run at most N keys per VM",
    "retry_failed": "retry keys that failed permanently before", "fsync": "fsync outputs before publishing",
    "ship": "local file or folder of code to copy to the share root first",
    "timeout": "stop a key that runs longer than this many seconds (a failed attempt, retried up to "
               "--max-attempts): `tasks run --timeout` on every VM",
    "wait": "follow progress until the run is over",
    "keep_output": "for --cmd: keep each key's stdout and stderr on the share (`tasks logs SPEC KEY` prints them)",
    "fetch": "the task reads only its own input: each VM's runner fetches small inputs in batches "
             "(`tasks run --fetch`)",
    "dry_run": "say what the run would do (asked of one running VM): counts, first keys, command lines, "
               "chunking; nothing is shipped, requested, claimed or written",
    "wait_timeout": f"with --wait: give up waiting after this many seconds (default {runs.WAIT_TIMEOUT_S:g})",
    "config": "cluster.toml to use",
})
@_command
def run(c, cluster: Cluster, spec, src="", keys="", out="", name="", workers_per_vm="", max_attempts="",
        lease="", limit="", retry_failed=False, fsync=False, ship="", timeout="", wait=False, wait_timeout="",
        dry_run=False, keep_output=False, fetch=False):
    """Start a task on every VM (detached); with --wait, follow it to the end."""
    from cluster import lifecycle, remote_tasks, status as cluster_status

    ex = "fab run SPEC"
    spec_args = runs.spec_arguments(spec, src=src, keys=keys, out=out, name=name, lease=_seconds(
        lease or 0, flag="--lease", example=f"{ex} --lease 30"))
    run_args = runs.run_arguments(
        max_attempts=_whole(max_attempts or 0, flag="--max-attempts", example=f"{ex} --max-attempts 3"),
        limit=_whole(limit or 0, flag="--limit", example=f"{ex} --limit 100"),
        retry_failed=retry_failed, fsync=fsync, keep_output=keep_output, fetch=fetch,
        timeout=_seconds(timeout or 0, flag="--timeout", example=f"{ex} --timeout 600"))
    per_vm = _whole(workers_per_vm or 0, flag="--workers-per-vm", example=f"{ex} --workers-per-vm 4")
    waiting = _seconds(wait_timeout or runs.WAIT_TIMEOUT_S, flag="--wait-timeout",
                       example=f"{ex} --wait --wait-timeout 7200", minimum=1)
    runs.check_wait_timeout(waiting)  # refused before any request reaches the share
    show.say(f"==> run: {shlex.join([*spec_args, *run_args])}" + (f" (--workers-per-vm {per_vm})" if per_vm else ""))
    if dry_run:
        if ship:
            files = ship_files(Path(ship))
            show.say(f"==> run: would ship {ship} ({len(files)} file(s)) to the share root (not in a dry run)")
        show.out(remote_tasks.dry_run(cluster, spec_args=spec_args, run_args=run_args,
                                      workers_per_vm=per_vm or None).rstrip("\n"))
        show.say("==> run: dry run; nothing was requested")
        return
    if ship:
        n = cluster.board.ship(Path(ship))
        show.say(f"==> run: shipped {ship} ({n} file(s)) to the share as {Path(ship).name}")
    req = runs.submit(cluster, spec_args=spec_args, run_args=run_args, workers_per_vm=per_vm or None)
    show.say(f"==> run {req.id} requested; making sure every VM is working")
    show.reports(lifecycle.up(cluster, on_waiting=show.waiting_for("run")))
    if not wait:
        show.say(f"==> run {req.id} started; `fab status` follows it")
        return
    def progress() -> None:
        s = cluster_status.run_status(cluster, req.id)
        show.run_progress(s)
        if s is not None and s.stuck:  # no agent will start it again: waiting on would only burn time
            raise ClusterError(f"run {req.id} is stuck: {'; '.join(show.trouble_lines(s))}. Fix "
                               "what the error says, then `fab run` the same task again: finished keys "
                               "are skipped")

    done = runs.wait(cluster, req.id, timeout=waiting, on_tick=progress)
    st = done.status
    show.say(f"==> run {req.id}: {done.result} ({st.done if st else None}/{st.total if st else None} done, "
             f"{st.failed if st else None} failed)")
    if done.result != "done":
        raise Exit(code=RESULT_EXIT.get(done.result, EXIT_FAILED))


@task(help={"json": "print one JSON object", "config": "cluster.toml to use",
            "watch": "a live view, refreshed until every run is over (Ctrl-C stops watching)",
            "interval": f"with --watch: seconds between refreshes (default {watching.WATCH_INTERVAL_S:g})",
            "timeout": "with --watch: stop after this many seconds; exit 1 if a run still goes",
            "all": f"list every run the share holds (default: the going ones and the last "
                   f"{show.RECENT_RUNS} ended; --json always has every run)"})
@_command
def status(c, cluster: Cluster, json=False, watch=False, interval="", timeout="", all=False):
    """Per run: done/total/failed/running; per VM: state, agent, rate. --watch: live, with rates and ETAs."""
    from cluster import status as cluster_status

    if watch:
        if json:
            raise UsageError("--watch draws a view for people; scripts poll `fab status --json`")
        _watch(cluster, interval=_seconds(interval or watching.WATCH_INTERVAL_S, flag="--interval",
                                          example="fab status --watch --interval 5", minimum=watching.MIN_INTERVAL_S),
               timeout=_seconds(timeout or watching.WATCH_TIMEOUT_S, flag="--timeout",
                                example="fab status --watch --timeout 600", minimum=1))
        return
    st = cluster_status.cluster_status(cluster)
    if json:
        print(st.to_json())
    else:
        show.status(st, every=all)


def _watch(cluster: Cluster, *, interval: float, timeout: float) -> None:
    """Rich tables redrawn in place on a terminal; stamped plain lines anywhere else."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False) as live:
                last = watching.watch(
                    cluster, interval=interval, timeout=timeout,
                    on_view=lambda v: live.update(show.rich_view(v), refresh=True),
                    on_error=lambda e: console.print(f"[yellow]status failed, retrying: {e}"))
        else:
            last = watching.watch(
                cluster, interval=interval, timeout=timeout,
                on_view=lambda v: [show.say(line) for line in show.plain_lines(v)],
                on_error=lambda e: show.say(f"status failed, retrying: {e}"))
    except KeyboardInterrupt:
        show.say("==> status: stopped watching; the runs go on")
        return
    if last is None or not last.over:
        raise Exit(f"error: runs still going after {timeout:g}s; `fab status --watch` follows them again",
                   code=EXIT_FAILED)
    show.say("==> status: no run is going")


@task(positional=["vm"], help={"vm": "VM name, or `all` (with --follow: every VM)",
                               "bytes": "how much of each log's end to show",
                               "follow": "show new lines as they come, prefixed by VM and run, until every run "
                                         "is over or Ctrl-C",
                               "timeout": "with --follow: stop after this many seconds (default a day)",
                               "config": "cluster.toml to use"})
@_command
def logs(c, cluster: Cluster, vm, bytes="", follow=False, timeout=""):
    """Show the end of a VM's agent log and run logs (read from the share); --follow: as they grow."""
    if follow:
        limit = _seconds(timeout or following.FOLLOW_TIMEOUT_S, flag="--timeout",
                         example="fab logs all --follow --timeout 600", minimum=1)
        one = None if vm == "all" else vm
        if one is not None:
            runs.logs(cluster, one, max_bytes=1)  # an unknown VM is refused by name, with those that have logs
        show.say(f"==> logs: following {'every VM' if one is None else one} (Ctrl-C stops; the runs go on)")
        try:
            over = following.follow(cluster, one, emit=lambda line: show.out(show.safe(line)), timeout=limit)
        except KeyboardInterrupt:
            show.say("==> logs: stopped following; the runs go on")
            return
        if not over:
            raise Exit(f"error: runs still going after {limit:g}s; `fab logs {vm} --follow` follows them again",
                       code=EXIT_FAILED)
        show.say("==> logs: every run is over")
        return
    if vm == "all":
        raise UsageError("`fab logs all` goes with --follow; without it give one VM: `fab logs VM`")
    n = _whole(bytes or runs.LOG_TAIL_BYTES, flag="--bytes", example=f"fab logs {vm} --bytes 20000", minimum=1)
    show.logs(vm, runs.logs(cluster, vm, max_bytes=n))


@task(name="exec", positional=["command"], help={"command": "shell command to run on every VM",
                                                 "json": "print results as JSON", "config": "cluster.toml to use"})
@_command
def exec_(c, cluster: Cluster, command, json=False):
    """Run a command on every running VM and print each VM's result."""
    from cluster import lifecycle

    try:
        results = lifecycle.exec_all(cluster, command)
    except GroupError as e:
        show.outputs(e.results, as_json=json)
        raise Exit(_group_line(e), code=_group_exit_code(e)) from e
    show.outputs(results, as_json=json)


@task(help={"json": "print the result as JSON", "config": "cluster.toml to use"})
@_command
def heal(c, cluster: Cluster, json=False):
    """Start preempted/stopped VMs, remount dead mounts, restart dead agents."""
    from cluster import lifecycle

    show.say(f"==> heal: cluster {cluster.config.name}")
    reports = lifecycle.up(cluster, on_waiting=show.waiting_for("heal"))
    show.reports(reports, as_json=json)
    fixed = [r.name for r in reports if r.action != "running" or "remounted" in r.boot or "started" in r.boot]
    show.say(f"==> heal: {len(fixed)} VMs needed help ({', '.join(fixed) or 'none'})")


@task(name="head-setup", help={"config": "cluster.toml to use",
                               "count": "size the head's sshd for this many VMs (default: cluster.toml's workers)"})
@_command
def head_setup(c, cluster: Cluster, count=None):
    """Print the steps that jail this cluster's SFTP user and size sshd for the fleet on a real head."""
    from cluster import lifecycle

    n = _whole(count, flag="--count", example="fab head-setup --count 64") if count is not None else None
    show.out(lifecycle.head_setup(cluster, workers=n))


@task(help={"config": "cluster.toml to use",
            "head": "[gce.head] or [aws.head]: also delete the head VM (its data disk or volume is kept)"})
@_command
def down(c, cluster: Cluster, head=False):
    """Delete every worker VM and verify none is left (lab: also its head, head user and jail)."""
    from cluster import lifecycle

    show.say(f"==> down: cluster {cluster.config.name}")
    names = lifecycle.down(cluster)
    show.say(f"==> down: deleted {len(names)} VMs ({', '.join(names) or 'none'}); none left")
    left = lifecycle.left_in_bucket(cluster)
    if left is not None:
        show.bucket_left(left)
    if not head:
        kept = lifecycle.kept_head(cluster)
        if kept is not None:
            show.say(f"==> down: kept the head VM{' ' + kept if kept else ''} and its data disk; "
                     "`fab down --head` deletes the VM too")
        return
    deleted = lifecycle.down_head(cluster)
    if deleted is not None:
        show.say(f"==> down: deleted the head VM{' ' + deleted.vm if deleted.vm else ' (none was there)'}; "
                 f"{deleted.kept} is kept: `{deleted.how_to_delete}` deletes it (and the share) for good")


@task(help={"count": "how many running VMs to kill", "vm": "kill this VM instead of random ones",
            "config": "cluster.toml to use"})
@_command
def preempt(c, cluster: Cluster, count="", vm=""):
    """Lab only: kill VMs the way a cloud preempts them."""
    from cluster import lifecycle

    n = _whole(count or 1, flag="--count", example="fab preempt --count 2", minimum=1)
    killed = lifecycle.preempt(cluster, count=n, names=[vm] if vm else [])
    show.say(f"==> preempt: killed {', '.join(killed) or 'nothing (no VM running)'}")


# SPEC is a flag, not a positional argument, because invoke's positional arguments are
# always required, and "the latest run" is what one wants most of the time.
SPEC_HELP = {
    "spec": "a run id, module:function, or a command line as given to `fab run` (default: the latest run)",
    "src": "for a command: glob of inputs under the root", "keys": "for a command: file of keys",
    "out": "for a command: output template", "name": "task name", "config": "cluster.toml to use",
}


@task(help={**SPEC_HELP, "json": "print one JSON object",
            "retry": "send the failed keys back and make sure a run retries them"})
@_command
def failures(c, cluster: Cluster, spec="", src="", keys="", out="", name="", retry=False, json=False):
    """A run's failed keys grouped by error, with the end of each traceback; --retry runs them again."""
    from cluster import lifecycle, remote_tasks

    t = remote_tasks.target(cluster, spec, src=src, keys=keys, out=out, name=name)
    if not retry:
        show.failures(remote_tasks.failures(cluster, t), as_json=json)
        return
    if not lifecycle.running_hosts(cluster):
        show.note("==> failures: no VM is running; bringing the cluster up to retry")
        lifecycle.up(cluster, on_waiting=show.waiting_for("failures"))
    retried = remote_tasks.retry(cluster, t)
    reports = lifecycle.up(cluster, on_waiting=show.waiting_for("failures")) if retried.run is not None else []  # VMs may have stopped themselves
    show.failures(retried.report, as_json=json,
                  extra={"run": retried.run.id if retried.run else None, "follows": retried.follows})
    if json:
        return
    if retried.run is None:
        show.say("==> failures: nothing to retry")
        return
    follows = (f", after {retried.follows} (still going; its processes never pick reset keys up) "
               "ends on each VM" if retried.follows else "")
    show.say(f"==> failures: reset {len(retried.keys)} key(s); run {retried.run.id} retries them{follows}")
    show.reports(reports)
    show.say(f"==> run {retried.run.id} requested; `fab status --watch` follows it")


@task(help={"seconds": f"how long to sample each VM (default {TOP_SECONDS:g})",
            "json": "print one JSON object: per VM its sample and verdict, or its error",
            "config": "cluster.toml to use"})
@_command
def top(c, cluster: Cluster, seconds="", json=False):
    """Per running VM, sampled at once: CPU, load, memory, disk, network, workers; a verdict and advice."""
    from cluster import top as cluster_top

    secs = _seconds(seconds or TOP_SECONDS, flag="--seconds", example="fab top --seconds 3", minimum=0.1)
    try:
        results: dict[str, Any] = dict(cluster_top.top(cluster, seconds=secs))
        failed = None
    except GroupError as e:
        results, failed = e.results, e
    show.top(results, as_json=json)
    if failed is not None:
        raise Exit(_group_line(failed), code=_group_exit_code(failed))


@task(help={**SPEC_HELP, "to": "folder on this machine for report.png and "
                               "report.html (default ./reports; they land in TO/<task>/)"})
@_command
def report(c, cluster: Cluster, spec="", src="", keys="", out="", name="", to="reports"):
    """Draw a run's report on a VM (tasks done over time per VM, CPU per VM) and download it."""
    from cluster import remote_tasks

    t = remote_tasks.target(cluster, spec, src=src, keys=keys, out=out, name=name)
    show.say(f"==> report: drawing the report of {_what(t)} on a running VM, then downloading it into {to}/")
    got, paths = remote_tasks.report(cluster, t, Path(to))
    show.say(f"==> report of {got.task}: {got.tasks} tasks logged, {got.failures} failed executions, {got.hosts} host(s)")
    for p in paths:
        show.say(f"    {p}")


@task(help={**SPEC_HELP, "to": "table to write on this machine: .parquet or .pkl",
            "skip_unreadable": "leave out outputs that cannot be read instead of failing",
            "reader": "module:function reading one output, for outputs with no built-in reader"})
@_command
def collect(c, cluster: Cluster, spec="", to="", src="", keys="", out="", name="", skip_unreadable=False,
            reader=""):
    """Read every output of a run into one table on a VM, and download it here (Parquet or pickle)."""
    from cluster import remote_tasks

    if not to:
        raise UsageError("give --to FILE: type e.g. `fab collect --to results.parquet` (or .pkl)")
    t = remote_tasks.target(cluster, spec, src=src, keys=keys, out=out, name=name)
    show.say(f"==> collect: reading every output of {_what(t)} into one table on a running VM (for many outputs "
             f"this takes a while), then downloading it to {to}")
    got, path = remote_tasks.collect(cluster, t, Path(to), skip_unreadable=skip_unreadable, reader=reader)
    show.say(f"==> collect {got.task}: {got.rows} rows x {got.columns} columns from {got.outputs} outputs; "
             f"{got.missing} key(s) missing (not done)"
             + (f", {got.unreadable} unreadable skipped" if got.unreadable else "")
             + f" ({got.seconds:.1f}s on the VM)")
    show.say(f"    {path}")


def _what(t: Target) -> str:
    """The task a command is about, as its messages name it (a long --cmd cut short; from a run
    request on the share, so nothing but printable characters)."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in shlex.join(t.spec_args))
    return shown if len(shown) <= 100 else shown[:97] + "..."


def main() -> None:
    """`spotfan COMMAND`: the `fab` commands of an installed spotfan, without a fabfile."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("spotfan")
    except PackageNotFoundError:
        v = "unknown"
    Program(name="spotfan", binary="spotfan", version=v,
            namespace=Collection.from_module(sys.modules[__name__])).run()
