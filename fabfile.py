"""spotfan's cluster commands (Fabric 3): up, run, status, logs, exec, heal, down, preempt, head-setup,
and for operators: failures, top, report, collect.

Each command is thin: it calls the `cluster` package, prints what happens, and turns
errors into exit codes (0 ok; 1 some VMs or keys failed; 2 bad config or usage;
3 a host key did not match). The config file is `--config FILE`, else $SPOTFAN_CONFIG,
else ./cluster.toml. Nothing here ever prompts, so every command works from scripts.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from invoke import task
from invoke.exceptions import Exit, ParseError
from invoke.program import Program

from cluster import bootstrap, diagnose, engine, runs
from cluster import top as cluster_top
from cluster import watch as watching
from cluster.config import ClusterConfig, config_path, load
from cluster.errors import ClusterError, ConfigError, GroupError, HostKeyError, UsageError

EXIT_FAILED, EXIT_USAGE, EXIT_HOST_KEY = 1, 2, 3
RESULT_EXIT = {"done": 0, "failed": EXIT_FAILED, "spec-error": EXIT_USAGE}
_JSON_MODE = {"on": False}  # with --json, stdout is JSON only: every progress line goes to stderr


def _say(msg: str) -> None:
    print(msg, flush=True, file=sys.stderr if _JSON_MODE["on"] else sys.stdout)


def _whole(value: Any, *, flag: str, example: str, minimum: int = 0) -> int:
    """An option that must be a whole number; a UsageError (exit 2) that says what to type."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise UsageError(f"{flag} {value!r} is not a whole number of at least {minimum}: type e.g. `{example}`")
    return n


def _seconds(value: Any, *, flag: str, example: str, minimum: float = 0.0) -> float:
    """An option that must be a number of seconds; a UsageError (exit 2) that says what to type."""
    try:
        x = float(str(value).strip())
    except ValueError:
        x = None
    if x is None or not x >= minimum or x != x or x == float("inf"):
        raise UsageError(f"{flag} {value!r} is not a number of seconds (at least {minimum:g}): type e.g. `{example}`")
    return x


def _usage_errors_exit_2() -> None:
    """invoke ends a parse error with exit 1, and takes `--help` after a task with a positional
    argument for that argument; spotfan's usage errors exit 2 with one line saying what to
    type, and `fab TASK --help` shows that task's help. (Fabric's `fab` program runs this
    file before it parses the task's arguments, so wrapping its parse step here is enough.)"""
    if getattr(Program.parse_tasks, "spotfan", False):
        return
    parse_tasks = Program.parse_tasks

    def parse(self: Program) -> None:
        args = self.core.unparsed
        if args and args[0] in self.collection.task_names and "--help" in args[1:]:
            self.core[0].args.help.value = self.collection.task_names[args[0]] or args[0]
            self.core.unparsed = []
        try:
            parse_tasks(self)
        except ParseError as e:
            raise Exit(f"error: {e}: `fab --list` shows the commands, `fab TASK --help` a command's options",
                       code=EXIT_USAGE) from e

    parse.spotfan = True  # type: ignore[attr-defined]
    Program.parse_tasks = parse  # type: ignore[method-assign]


_usage_errors_exit_2()


def _command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Load the config, run the command, map cluster errors to messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, config: str = "", **kwargs: Any) -> Any:
        _JSON_MODE["on"] = bool(kwargs.get("json"))
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        # paramiko logs each failed handshake with a traceback; our messages say it better.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        try:
            cfg = load(config_path(config or None))
            if cfg.provider == "gce":  # a head VM made by `fab up` is found where it left it
                from cluster.gce_head import with_saved_head

                cfg = with_saved_head(cfg)
            return fn(c, cfg, *args, **kwargs)
        except GroupError as e:
            if _JSON_MODE["on"]:
                print(json.dumps({n: asdict(r) if isinstance(r, bootstrap.VMReport) else
                                  {"name": n, "error": str(r)} if isinstance(r, BaseException) else {"name": n}
                                  for n, r in sorted(e.results.items())}, indent=1))
            else:
                for name, r in sorted(e.results.items()):
                    if isinstance(r, bootstrap.VMReport):
                        _print_reports([r], False)
                    else:
                        _say(f"{name}: {'FAILED: ' + str(r) if isinstance(r, BaseException) else 'ok'}")
            raise Exit(f"error: {str(e).splitlines()[0]}", code=_group_exit_code(e)) from e
        except HostKeyError as e:
            raise Exit(f"error: {e}", code=EXIT_HOST_KEY) from e
        except ConfigError as e:
            raise Exit(f"error: {e}", code=EXIT_USAGE) from e
        except ClusterError as e:
            raise Exit(f"error: {e}", code=EXIT_FAILED) from e

    # Invoke builds flags from the signature: show it without `cfg` and with `--config`.
    sig = inspect.signature(fn)
    params = [p for n, p in sig.parameters.items() if n != "cfg"]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=""))
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return wrapper


def _group_exit_code(e: GroupError) -> int:
    return EXIT_HOST_KEY if any(isinstance(r, HostKeyError) for r in e.failed.values()) else EXIT_FAILED


def _print_reports(reports: list[bootstrap.VMReport], as_json: bool) -> None:
    if as_json:
        print(json.dumps([asdict(r) for r in reports], indent=1))
        return
    for r in reports:
        _say(f"{r.name}: {r.action}" + (f" in {r.zone}" if r.zone else "")
             + (f"; {'; '.join(r.boot.splitlines())}" if r.boot else ""))


def _say_plan(cfg: ClusterConfig, plan: bootstrap.UpPlan) -> None:
    """What `up` will do and what the cluster will cost per hour, before anything is created."""
    def names(ns: tuple[str, ...]) -> str:
        return f" ({', '.join(ns)})" if ns else ""

    if plan.remembered is not None:
        _say(f"==> up: {plan.remembered} VMs, as the last `fab up --count {plan.remembered}` asked; "
             f"cluster.toml says workers = {plan.configured}: `fab up --count {plan.configured}` follows it "
             "(and `fab down` forgets the count)")
    _say(f"==> up: will create {len(plan.create)}{names(plan.create)}, start {len(plan.start)}"
         f"{names(plan.start)}, delete {len(plan.delete)}{names(plan.delete)}; "
         f"{len(plan.keep)} already there")
    estimate = getattr(bootstrap.provider_for(cfg), "cost_estimate", None)
    if estimate is not None:
        _say(f"==> up: cost: {estimate(plan.workers).describe()}")
    else:
        _say(f"==> up: cost: {plan.workers} {cfg.provider} VMs; no cost"
             + (" (they run on this machine)" if cfg.provider == "lab" else " estimate for this provider"))


@task(help={"count": "number of worker VMs (default: as last asked, else cluster.toml)",
            "config": "cluster.toml to use", "json": "print the result as JSON"})
@_command
def up(c, cfg: ClusterConfig, count=None, json=False):
    """Create the cluster's VMs, mount the share on each and start their agents (idempotent)."""
    n = _whole(count, flag="--count", example="fab up --count 3") if count is not None else None
    _say(f"==> up: cluster {cfg.name} ({cfg.provider}), "
         f"{'as many VMs as last time' if n is None else f'{n} VMs'}")
    t = time.monotonic()
    cfg = _up_head(cfg, workers=n)
    reports = bootstrap.up(cfg, count=n, on_plan=lambda plan: _say_plan(cfg, plan))
    _print_reports(reports, json)
    _say(f"==> up: {sum(r.action != 'deleted' for r in reports)} VMs working ({time.monotonic() - t:.1f}s)")


def _up_head(cfg: ClusterConfig, *, workers: int | None = None) -> ClusterConfig:
    """With `[gce.head] create = true`: create (or find) the head VM first, and point cfg at it."""
    provider = bootstrap.provider_for(cfg)
    head_cost = getattr(provider, "head_cost_estimate", lambda: None)()
    if head_cost is None:
        return cfg  # the head is an existing host
    from cluster import gce_head

    _say(f"==> up: head VM cost: {head_cost.describe()}")
    # The head's sshd is sized at its creation for this many VMs connecting at once.
    cfg, vm = gce_head.up_head(cfg, provider, jail_steps=bootstrap.head_setup(cfg, workers=workers))
    _say(f"==> up: head VM {vm.name} running in {vm.zone} at {vm.address} (host keys from guest attributes)")
    return cfg


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
    "wait_timeout": f"with --wait: give up waiting after this many seconds (default {runs.WAIT_TIMEOUT_S:g})",
    "config": "cluster.toml to use",
})
@_command
def run(c, cfg: ClusterConfig, spec, src="", keys="", out="", name="", workers_per_vm="", max_attempts="",
        lease="", limit="", retry_failed=False, fsync=False, ship="", timeout="", wait=False, wait_timeout=""):
    """Start a task on every VM (detached); with --wait, follow it to the end."""
    ex = "fab run SPEC"
    spec_args = runs.spec_arguments(spec, src=src, keys=keys, out=out, name=name, lease=_seconds(
        lease or 0, flag="--lease", example=f"{ex} --lease 30"))
    run_args = runs.run_arguments(
        max_attempts=_whole(max_attempts or 0, flag="--max-attempts", example=f"{ex} --max-attempts 3"),
        limit=_whole(limit or 0, flag="--limit", example=f"{ex} --limit 100"),
        retry_failed=retry_failed, fsync=fsync,
        timeout=_seconds(timeout or 0, flag="--timeout", example=f"{ex} --timeout 600"))
    per_vm = _whole(workers_per_vm or 0, flag="--workers-per-vm", example=f"{ex} --workers-per-vm 4")
    waiting = _seconds(wait_timeout or runs.WAIT_TIMEOUT_S, flag="--wait-timeout",
                       example=f"{ex} --wait --wait-timeout 7200", minimum=1)
    runs.check_wait_timeout(waiting)  # refused before any request reaches the share
    _say(f"==> run: {' '.join(spec_args)}")
    req = runs.submit(cfg, spec_args=spec_args, run_args=run_args,
                      workers_per_vm=per_vm or None, ship=[Path(ship)] if ship else [])
    _say(f"==> run {req.id} requested; making sure every VM is working")
    _print_reports(bootstrap.up(cfg), False)
    if not wait:
        _say(f"==> run {req.id} started; `fab status` follows it")
        return
    done = runs.wait(cfg, req.id, timeout=waiting, on_progress=lambda s: _say(
        f"    {s.id}: {s.done}/{s.total} done, {s.failed} failed, {s.running} running, {s.pending} pending"))
    st = done.get("status") or {}
    _say(f"==> run {req.id}: {done['result']} "
         f"({st.get('done')}/{st.get('total')} done, {st.get('failed')} failed)")
    if done["result"] != "done":
        raise Exit(code=RESULT_EXIT.get(str(done["result"]), EXIT_FAILED))


@task(help={"json": "print one JSON object", "config": "cluster.toml to use",
            "watch": "a live view, refreshed until every run is over (Ctrl-C stops watching)",
            "interval": f"with --watch: seconds between refreshes (default {watching.WATCH_INTERVAL_S:g})",
            "timeout": "with --watch: stop after this many seconds; exit 1 if a run still goes"})
@_command
def status(c, cfg: ClusterConfig, json=False, watch=False, interval="", timeout=""):
    """Per run: done/total/failed/running; per VM: state, agent, rate. --watch: live, with rates and ETAs."""
    if watch:
        if json:
            raise UsageError("--watch draws a view for people; scripts poll `fab status --json`")
        _watch(cfg, interval=_seconds(interval or watching.WATCH_INTERVAL_S, flag="--interval",
                                      example="fab status --watch --interval 5", minimum=watching.MIN_INTERVAL_S),
               timeout=_seconds(timeout or watching.WATCH_TIMEOUT_S, flag="--timeout",
                                example="fab status --watch --timeout 600", minimum=1))
        return
    st = runs.cluster_status(cfg)
    if json:
        print(st.to_json())
        return
    if not st.vms:
        _say(f"cluster {st.name} ({st.provider}): no VM is left (`fab up` creates them)"
             + ("; the head does not answer, so its runs are not shown" if st.head != "ok" else ""))
    else:
        _say(f"cluster {st.name} ({st.provider}): {sum(v.status == 'RUNNING' for v in st.vms)}/{len(st.vms)} "
             "VMs running")
    for v in st.vms:
        age = "never" if v.heartbeat_age is None else f"{v.heartbeat_age:.0f}s ago"
        if v.heartbeat_from == "vm" and v.heartbeat_age is not None:
            age += " (on the VM)"
        rate = "-" if v.rate is None or v.status != "RUNNING" else f"{v.rate:.1f}/s"
        agent = v.agent if v.status == "RUNNING" else f"(last: {v.agent})" if v.agent else "-"
        _say(f"  {v.name:<14} {v.address:<15} {v.status:<10}{' (preempted)' if v.preempted else '':<12} "
             f"agent {agent or '-':<20} heartbeat {age:<9} rate {rate}")
    for r in st.runs:
        unknown = ("counts unavailable (see `fab logs VM`)" if r.result
                   else "counts unknown (no VM running; `fab heal`)")
        counts = (unknown if r.total is None else
                  f"{r.done}/{r.total} done, {r.failed} failed, {r.running} running, {r.pending} pending")
        _say(f"  run {r.id}: {r.result or 'running'}: {counts}  [{r.spec}]  {_run_times(r)}")
    _say_bill(st)


def _run_times(r: runs.RunStatus) -> str:
    def at(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    took = f", took {_duration((r.ended or 0) - (r.started or r.requested or 0))}" if r.ended else ""
    return f"(requested {at(r.requested)}, started {at(r.started)}, ended {at(r.ended)}{took})"


def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _say_bill(st: runs.ClusterStatus) -> None:
    if st.provider == "lab":
        _say("  billing now: nothing (lab VMs run on this machine)")
        return
    if not st.billing.items:
        _say("  billing now: nothing")
        return
    for item in st.billing.items:
        price = item["per_hour"]
        _say(f"  billing now: {item['what']}: " + (f"{price:.4f}/h" if price is not None else
                                                   "price unknown (add it to [gce.prices] / [gce.disk_prices])"))
    total = st.billing.per_hour
    _say(f"  billing now: about {total:.2f} per hour in all" if total is not None else
         "  billing now: no total (some prices are unknown)")


@task(positional=["vm"], help={"vm": "VM name", "bytes": "how much of each log's end to show",
                               "config": "cluster.toml to use"})
@_command
def logs(c, cfg: ClusterConfig, vm, bytes=""):
    """Show the end of a VM's agent log and run logs (read from the share)."""
    n = _whole(bytes or runs.LOG_TAIL_BYTES, flag="--bytes", example=f"fab logs {vm} --bytes 20000", minimum=1)
    for name, text in runs.logs(cfg, vm, max_bytes=n).items():
        _say(f"==> {vm}/{name}")
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


@task(name="exec", positional=["command"], help={"command": "shell command to run on every VM",
                                                 "json": "print results as JSON", "config": "cluster.toml to use"})
@_command
def exec_(c, cfg: ClusterConfig, command, json=False):
    """Run a command on every running VM and print each VM's result."""
    try:
        results = bootstrap.exec_all(cfg, command)
    except GroupError as e:
        results = e.results
        if not json:
            _show_outputs(results)
        else:
            print(_outputs_json(results))
        raise Exit(f"error: {str(e).splitlines()[0]}", code=_group_exit_code(e)) from e
    if json:
        print(_outputs_json(results))
    else:
        _show_outputs(results)


def _show_outputs(results: dict[str, Any]) -> None:
    for name, r in sorted(results.items()):
        if isinstance(r, BaseException):
            out = getattr(r, "output", None)
            _say(f"==> {name}: FAILED: {r}")
            if out is not None and out.stdout:
                sys.stdout.write(out.stdout)
        else:
            _say(f"==> {name}: exit {r.exit_code}")
            sys.stdout.write(r.stdout)


def _outputs_json(results: dict[str, Any]) -> str:
    def one(r: Any) -> dict[str, Any]:
        if isinstance(r, BaseException):
            out = getattr(r, "output", None)
            return {"error": str(r), **({"exit_code": out.exit_code, "stdout": out.stdout} if out else {})}
        return {"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}

    return json.dumps({n: one(r) for n, r in sorted(results.items())}, indent=1)


@task(help={"json": "print the result as JSON", "config": "cluster.toml to use"})
@_command
def heal(c, cfg: ClusterConfig, json=False):
    """Start preempted/stopped VMs, remount dead mounts, restart dead agents."""
    _say(f"==> heal: cluster {cfg.name}")
    reports = bootstrap.up(cfg)
    _print_reports(reports, json)
    fixed = [r.name for r in reports if r.action != "running" or "remounted" in r.boot or "started" in r.boot]
    _say(f"==> heal: {len(fixed)} VMs needed help ({', '.join(fixed) or 'none'})")


@task(name="head-setup", help={"config": "cluster.toml to use",
                               "count": "size the head's sshd for this many VMs (default: cluster.toml's workers)"})
@_command
def head_setup(c, cfg: ClusterConfig, count=None):
    """Print the steps that jail this cluster's SFTP user and size sshd for the fleet on a real head."""
    n = _whole(count, flag="--count", example="fab head-setup --count 64") if count is not None else None
    sys.stdout.write(bootstrap.head_setup(cfg, workers=n))


@task(help={"config": "cluster.toml to use",
            "head": "GCE [gce.head]: also delete the head VM (its data disk is kept)"})
@_command
def down(c, cfg: ClusterConfig, head=False):
    """Delete every worker VM and verify none is left (lab: also its head, head user and jail)."""
    _say(f"==> down: cluster {cfg.name}")
    names = bootstrap.down(cfg)
    _say(f"==> down: deleted {len(names)} VMs ({', '.join(names) or 'none'}); none left")
    provider = bootstrap.provider_for(cfg)
    if getattr(provider, "head_cost_estimate", lambda: None)() is None:
        return  # no head VM: the head is an existing host (or the lab's, stopped above)
    vm = provider.head()
    if not head:
        _say(f"==> down: kept the head VM{' ' + vm.name if vm else ''} and its data disk; "
             "`fab down --head` deletes the VM too")
        return
    disk = provider.delete_head()
    zone = vm.zone if vm else provider.settings.head.zone
    _say(f"==> down: deleted the head VM{' ' + vm.name if vm else ' (none was there)'}; its data disk {disk} "
         f"is kept: `gcloud compute disks delete {disk} --zone {zone} --project {provider.settings.project}` "
         "deletes it (and the share) for good")


@task(help={"count": "how many running VMs to kill", "vm": "kill this VM instead of random ones",
            "config": "cluster.toml to use"})
@_command
def preempt(c, cfg: ClusterConfig, count="", vm=""):
    """Lab only: kill VMs the way a cloud preempts them."""
    n = _whole(count or 1, flag="--count", example="fab preempt --count 2", minimum=1)
    killed = bootstrap.preempt(cfg, count=n, names=[vm] if vm else [])
    _say(f"==> preempt: killed {', '.join(killed) or 'nothing (no VM running)'}")


def _watch(cfg: ClusterConfig, *, interval: float, timeout: float) -> None:
    """Rich tables redrawn in place on a terminal; stamped plain lines anywhere else."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    try:
        if console.is_terminal:
            with Live(console=console, auto_refresh=False) as live:
                last = watching.watch(
                    cfg, interval=interval, timeout=timeout,
                    on_view=lambda v: live.update(watching.rich_view(v), refresh=True),
                    on_error=lambda e: console.print(f"[yellow]status failed, retrying: {e}"))
        else:
            last = watching.watch(
                cfg, interval=interval, timeout=timeout,
                on_view=lambda v: [_say(line) for line in watching.plain_lines(v)],
                on_error=lambda e: _say(f"status failed, retrying: {e}"))
    except KeyboardInterrupt:
        _say("==> status: stopped watching; the runs go on")
        return
    if last is None or not last.over:
        raise Exit(f"error: runs still going after {timeout:g}s; `fab status --watch` follows them again",
                   code=EXIT_FAILED)
    _say("==> status: no run is going")


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
def failures(c, cfg: ClusterConfig, spec="", src="", keys="", out="", name="", retry=False, json=False):
    """A run's failed keys grouped by error, with the end of each traceback; --retry runs them again."""
    t = engine.target(cfg, spec, src=src, keys=keys, out=out, name=name)
    if not retry:
        _print_failures(engine.failures(cfg, t), as_json=json)
        return
    if not bootstrap.running_hosts(cfg):
        print("==> failures: no VM is running; bringing the cluster up to retry", file=sys.stderr, flush=True)
        bootstrap.up(cfg)
    rep, retried = engine.retry(cfg, t)
    if retried.run is not None:  # VMs may have stopped themselves since the run ended
        reports = bootstrap.up(cfg)
    _print_failures({**rep, "run": retried.run.id if retried.run else None, "follows": retried.follows},
                    as_json=json)
    if json:
        return
    if retried.run is None:
        _say("==> failures: nothing to retry")
        return
    follows = (f", after {retried.follows} (still going; its processes never pick reset keys up) "
               "ends on each VM" if retried.follows else "")
    _say(f"==> failures: reset {len(retried.keys)} key(s); run {retried.run.id} retries them{follows}")
    _print_reports(reports, False)
    _say(f"==> run {retried.run.id} requested; `fab status --watch` follows it")


def _print_failures(rep: dict[str, Any], *, as_json: bool) -> None:
    """What `python -m tasks failures` shows, from its JSON."""
    if as_json:
        print(json.dumps(rep, indent=1))
        return
    if not rep["failed"]:
        _say(f"{rep['task']}: no failed keys ({rep['total']} keys)")
        return
    retrying = rep["failed"] - rep["gave_up"]
    _say(f"{rep['task']}: {rep['failed']} of {rep['total']} keys failed ({rep['gave_up']} gave up"
         + (f", {retrying} will be retried" if retrying else "") + f"), {len(rep['groups'])} distinct error(s)")
    for i, g in enumerate(rep["groups"], 1):
        shown = ", ".join(repr(k) for k in g["keys"][:5])
        more = f" and {g['count'] - 5} more" if g["count"] > 5 else ""
        _say(f"\n[{i}] {g['count']} key(s): {g['signature']}\n    keys: {shown}{more}")
        if g["error"] != g["signature"]:
            _say(f"    e.g.: {g['error']}")
        for line in g["detail"].splitlines():
            _say(f"    | {line}")


@task(help={"seconds": f"how long to sample each VM (default {cluster_top.DEFAULT_SECONDS:g})",
            "json": "print one JSON object: per VM its sample and verdict, or its error",
            "config": "cluster.toml to use"})
@_command
def top(c, cfg: ClusterConfig, seconds="", json=False):
    """Per running VM, sampled at once: CPU, load, memory, disk, network, workers; a verdict and advice."""
    secs = _seconds(seconds or cluster_top.DEFAULT_SECONDS, flag="--seconds", example="fab top --seconds 3",
                    minimum=0.1)
    try:
        results = diagnose.top(cfg, seconds=secs)
        failed = None
    except GroupError as e:
        results, failed = e.results, e
    if json:
        print(_top_json(results))
    else:
        for name, r in sorted(results.items()):
            if isinstance(r, BaseException):
                _say(f"==> {name}: FAILED: {r}")
            else:
                _say(f"==> {name} (judged against {r.workers} worker process(es))")
                _say(cluster_top.describe(r.sample, r.verdict))
        _say("==> top: " + ", ".join(f"{n} {'FAILED' if isinstance(r, BaseException) else r.verdict.kind}"
                                     for n, r in sorted(results.items())))
    if failed is not None:
        raise Exit(f"error: {str(failed).splitlines()[0]}", code=_group_exit_code(failed))


def _top_json(results: dict[str, Any]) -> str:
    return json.dumps({n: {"error": str(r)} if isinstance(r, BaseException) else
                       {"workers": r.workers, "sample": r.sample.to_dict(), "verdict": r.verdict.to_dict()}
                       for n, r in sorted(results.items())}, indent=1)


@task(help={**SPEC_HELP, "to": "folder on this machine for report.png and "
                                                    "report.html (default ./reports; they land in TO/<task>/)"})
@_command
def report(c, cfg: ClusterConfig, spec="", src="", keys="", out="", name="", to="reports"):
    """Draw a run's report on a VM (tasks done over time per VM, CPU per VM) and download it."""
    t = engine.target(cfg, spec, src=src, keys=keys, out=out, name=name)
    got = engine.report(cfg, t, Path(to))
    i = got.info
    _say(f"==> report of {i['task']}: {i['tasks']} tasks, {i['failures']} failed executions, "
         f"{i['hosts']} host(s)")
    for p in got.paths:
        _say(f"    {p}")


@task(help={**SPEC_HELP, "to": "table to write on this machine: .parquet or .pkl",
                                 "skip_unreadable": "leave out outputs that cannot be read instead of failing",
                                 "reader": "module:function reading one output, for outputs with no built-in reader"})
@_command
def collect(c, cfg: ClusterConfig, spec="", to="", src="", keys="", out="", name="", skip_unreadable=False,
            reader=""):
    """Read every output of a run into one table on a VM, and download it here (Parquet or pickle)."""
    if not to:
        raise UsageError("give --to FILE: type e.g. `fab collect --to results.parquet` (or .pkl)")
    t = engine.target(cfg, spec, src=src, keys=keys, out=out, name=name)
    got = engine.collect(cfg, t, Path(to), skip_unreadable=skip_unreadable, reader=reader)
    i = got.info
    _say(f"==> collect {i['task']}: {i['rows']} rows x {i['columns']} columns from {i['outputs']} outputs; "
         f"{i['missing']} key(s) missing (not done)"
         + (f", {i['unreadable']} unreadable skipped" if i.get("unreadable") else "")
         + f" ({i['seconds']:.1f}s on the VM)")
    _say(f"    {got.paths[0]}")
