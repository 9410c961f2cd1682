"""Every rendering `fab` prints: reports of VMs brought up, status, bills, logs, exec outputs, failures,
samples, and the views of `fab status --watch` (rich tables on a terminal, stamped lines elsewhere).

With --json, stdout holds JSON only: every progress line goes to stderr instead. Text
that came from the share or a VM is shown escaped where a terminal would act on it.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cluster.errors import GroupError
from cluster.records import CONTROL
from cluster.ssh import RemoteCommandError

if TYPE_CHECKING:  # the renderings that need them import them: `fab push` loads none of these
    from rich.console import RenderableType

    from cluster.lifecycle import BucketLeft, UpPlan, VMReport
    from cluster.results import FailureReport
    from cluster.records import VmRun
    from cluster.status import ClusterStatus, RunStatus
    from cluster.top import VMTop
    from cluster.watch import RunView, View, VMView

EXAMPLE_KEYS = 5  # keys shown per failure group
MAX_NAMES_SHOWN = 8  # names under a bucket's prefix `fab down` lists
_JSON_MODE = {"on": False}


def json_mode(on: bool) -> None:
    """With --json, stdout is JSON only: `say` writes to stderr."""
    _JSON_MODE["on"] = on


def say(msg: str) -> None:
    print(msg, flush=True, file=sys.stderr if _JSON_MODE["on"] else sys.stdout)


def note(msg: str) -> None:
    """A line about what a command does, always on stderr."""
    print(msg, flush=True, file=sys.stderr)


def out(text: str) -> None:
    """Text a command prints as its result (a log's end, a command's output), as it is."""
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    sys.stdout.flush()


def dump(data: object) -> None:
    print(json.dumps(data, indent=1))


def safe(text: str) -> str:
    """Text from the share or a VM, with what a terminal would act on escaped."""
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# -- up, heal, down -------------------------------------------------------------------------


def reports(items: list[VMReport], *, as_json: bool = False) -> None:
    if as_json:
        dump([asdict(r) for r in items])
        return
    for r in items:
        say(f"{r.name}: {r.action}" + (f" in {r.zone}" if r.zone else "")
            + (f"; {'; '.join(r.boot.splitlines())}" if r.boot else ""))


def plan(p: UpPlan, *, cost: str) -> None:
    """What `up` will do and what the cluster will cost per hour, before anything is created."""
    def names(ns: tuple[str, ...]) -> str:
        return f" ({', '.join(ns)})" if ns else ""

    if p.remembered is not None:
        say(f"==> up: {p.remembered} VMs, as the last `fab up --count {p.remembered}` asked; "
            f"cluster.toml says workers = {p.configured}: `fab up --count {p.configured}` follows it "
            "(and `fab down` forgets the count)")
    say(f"==> up: will create {len(p.create)}{names(p.create)}, start {len(p.start)}"
        f"{names(p.start)}, delete {len(p.delete)}{names(p.delete)}; "
        f"{len(p.keep)} already there")
    say(f"==> up: cost: {cost}")


def bucket_left(left: BucketLeft) -> None:
    """What `fab down` left in a headless cluster's bucket: all of it, the user's data first."""
    root = left.url.rstrip("/")
    shown = ", ".join(safe(n) for n in left.names[:MAX_NAMES_SHOWN]) + (
        f" and {len(left.names) - MAX_NAMES_SHOWN} more" if len(left.names) > MAX_NAMES_SHOWN else "")
    say(f"==> down: left everything in {root}: " + (f"your inputs and outputs ({shown}) are never deleted"
                                                      if left.names else "no input or output is there"))
    if left.records:
        say(f"==> down: and spotfan's records under {root}/.spotfan/ (claims, done markers, run requests, "
            "heartbeats, logs); the next run reuses them. To drop the cluster's own: "
            + (f"`aws s3 rm --recursive {root}/.spotfan/cluster/`" if root.startswith("s3://")
               else f"`gcloud storage rm --recursive {root}/.spotfan/cluster/`"))


def booted(name: str, n: int, of: int) -> None:
    """One VM's boot script returned (fab up says so as each does: a cloud VM takes a minute)."""
    say(f"==> up: booted {n}/{of} VMs ({name})"
        + ("; waiting for each agent's first heartbeat on the share" if n == of else ""))


def waiting_for(command: str) -> Callable[[list[str], float, float], None]:
    """What `fab COMMAND` says of agents that have not written a first heartbeat yet, while it
    waits for them (lifecycle.up's on_waiting)."""
    def still_waiting(names: list[str], waited: float, timeout: float) -> None:
        shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (
            f" and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else "")
        say(f"==> {command}: still waiting for {len(names)} agent(s) to report ({shown}): {waited:.0f} s of {timeout:.0f} s; "
            "one that does not is named with its log and stopped")

    return still_waiting


def group_error(e: GroupError) -> None:
    """Each host's part of a failed fan-out: its report, its error, or ok."""
    from cluster.lifecycle import VMReport

    if _JSON_MODE["on"]:
        dump({n: asdict(r) if isinstance(r, VMReport) else
              {"name": n, "error": str(r)} if isinstance(r, BaseException) else {"name": n}
              for n, r in sorted(e.results.items())})
        return
    for name, r in sorted(e.results.items()):
        if isinstance(r, VMReport):
            reports([r])
        else:
            say(f"{name}: {'FAILED: ' + str(r) if isinstance(r, BaseException) else 'ok'}")


# -- status -----------------------------------------------------------------------------------


RECENT_RUNS = 5  # `fab status` shows every going run and this many ended ones (--all: every one)


def shown_runs(runs: Sequence[RunStatus], *, every: bool) -> tuple[list[RunStatus], int]:
    """The runs `fab status` lists (every going one, then the latest ended ones, oldest
    first) and how many older ended runs it leaves out."""
    if every:
        return list(runs), 0
    ended = sorted((r for r in runs if r.result), key=lambda r: r.ended or r.requested or 0.0)
    keep = {id(r) for r in ended[-RECENT_RUNS:]}
    shown = [r for r in runs if not r.result or id(r) in keep]
    return shown, len(runs) - len(shown)


def status(st: ClusterStatus, *, every: bool = False) -> None:
    if not st.vms:
        say(f"cluster {st.name} ({st.provider}): no VM is left (`fab up` creates them)"
            + ("; the head does not answer, so its runs are not shown" if st.head != "ok" else ""))
    else:
        say(f"cluster {st.name} ({st.provider}): {sum(v.status == 'RUNNING' for v in st.vms)}/{len(st.vms)} "
            "VMs running")
    for v in st.vms:
        age = "never" if v.heartbeat_age is None else f"{v.heartbeat_age:.0f}s ago"
        if v.heartbeat_from == "vm" and v.heartbeat_age is not None:
            age += " (on the VM)"
        rate = "-" if v.rate is None or v.status != "RUNNING" else f"{v.rate:.1f}/s"
        agent = v.agent if v.status == "RUNNING" else f"(last: {v.agent})" if v.agent else "-"
        say(f"  {v.name:<14} {v.address:<15} {v.status:<10}{' (preempted)' if v.preempted else '':<12} "
            f"agent {agent or '-':<20} heartbeat {age:<9} rate {rate}")
        if v.problem:
            say(f"    {v.name}: {safe(v.problem)}")
    runs, older = shown_runs(st.runs, every=every)
    for r in runs:
        unknown = ("counts unavailable (see `fab logs VM`)" if r.result
                   else "counts unknown (no VM running; `fab heal`)")
        counts = (unknown if r.total is None else
                  f"{r.done}/{r.total} done, {r.failed} failed, {r.running} running, {r.pending} pending")
        state = r.result or ("stuck (every VM gave up on it)" if r.stuck else "running")
        say(f"  run {r.id}: {state}: {counts}  [{safe(r.spec)}]  {_run_times(r)}")
        for line in trouble_lines(r):
            say(f"    {safe(line)}")
        if r.stuck:
            say("    fix what the error says, then `fab run` the same task again: finished keys are "
                "skipped (`fab logs VM` shows each attempt)")
    if older:
        say(f"  ({older} older ended run(s) not shown: `fab status --all` lists every run)")
    for message in st.refused:
        say(f"  {safe(message)}")
    bill(st)


def trouble_lines(r: RunStatus) -> list[str]:
    """The VMs whose `tasks run` keeps exiting with work left, one line per distinct error
    (forty VMs with one full disk make one line): which VMs, restarting or given up, and why."""
    groups: dict[tuple[int | None, str], list[tuple[str, VmRun]]] = {}  # (exit code, error) -> VMs
    for vm, part in r.troubles.items():
        groups.setdefault((part.exit_code, part.error), []).append((vm, part))
    lines = []
    for (code, error), members in groups.items():
        gave_up = [vm for vm, p in members if p.state == "gave-up"]
        restarting = [(vm, p.restarts) for vm, p in members if p.state != "gave-up"]
        how = []
        if gave_up:
            how.append(f"{_names(gave_up)} gave up")
        if restarting:
            counts = sorted({n for _, n in restarting})
            how.append(f"{_names([vm for vm, _ in restarting])} restarting "
                       f"({'-'.join(map(str, (counts[0], counts[-1]))) if len(counts) > 1 else counts[0]} so far)")
        lines.append(f"{'; '.join(how)}: `tasks run` exited {code}" + (f": {error}" if error else
                                                                         " (`fab logs VM` shows why)"))
    return lines


def _names(vms: list[str], shown: int = 5) -> str:
    return ", ".join(vms[:shown]) + (f" and {len(vms) - shown} more" if len(vms) > shown else "")


def run_progress(s: RunStatus | None) -> None:
    """One line of `fab run --wait`'s progress."""
    if s is not None:
        say(f"    {s.id}: {s.done}/{s.total} done, {s.failed} failed, {s.running} running, {s.pending} pending")
        for line in trouble_lines(s):
            say(f"      {safe(line)}")


def _run_times(r: RunStatus) -> str:
    def at(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"

    took = f", took {_duration((r.ended or 0) - (r.started or r.requested or 0))}" if r.ended else ""
    return f"(requested {at(r.requested)}, started {at(r.started)}, ended {at(r.ended)}{took})"


def _duration(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def bill(st: ClusterStatus) -> None:
    b = st.billing
    if st.prices != "known":
        say(f"  billing now: nothing ({st.provider} VMs run on this machine)" if st.prices == "local" else
            f"  billing now: unknown ({st.provider} reports no prices)")
        return
    if not b.items:
        say("  billing now: nothing")
        return
    for item in b.items:
        price = item["per_hour"]
        say(f"  billing now: {item['what']}: " + (f"{price:.4f}/h" if isinstance(price, float) else
                                                  "price unknown (add it to [gce.prices] / [gce.disk_prices])"))
    say(f"  billing now: about {b.per_hour:.2f} per hour in all" if b.per_hour is not None else
        "  billing now: no total (some prices are unknown)")


# -- exec, logs, failures, top --------------------------------------------------------------------


def logs(vm: str, tails: Mapping[str, str]) -> None:
    for name, text in tails.items():
        say(f"==> {vm}/{name}")
        out(text)


def outputs(results: Mapping[str, Any], *, as_json: bool) -> None:
    """What a command printed on each VM (an Output), or the error it got."""
    if as_json:
        def one(r: Any) -> dict[str, Any]:
            if isinstance(r, BaseException):
                o = r.output if isinstance(r, RemoteCommandError) else None
                return {"error": str(r), **({"exit_code": o.exit_code, "stdout": o.stdout} if o else {})}
            return {"exit_code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr}

        dump({n: one(r) for n, r in sorted(results.items())})
        return
    for name, r in sorted(results.items()):
        if isinstance(r, BaseException):
            say(f"==> {name}: FAILED: {r}")
            if isinstance(r, RemoteCommandError) and r.output.stdout:
                sys.stdout.write(r.output.stdout)
        else:
            say(f"==> {name}: exit {r.exit_code}")
            sys.stdout.write(r.stdout)


def failures(rep: FailureReport, *, as_json: bool, extra: Mapping[str, object] | None = None) -> None:
    """What `python -m tasks failures` shows, from its (checked) result."""
    if as_json:
        dump({**rep.to_dict(), **(extra or {})})
        return
    if not rep.failed:
        say(f"{rep.task}: no failed keys ({rep.total} keys)")
        return
    retrying = rep.failed - rep.gave_up
    say(f"{rep.task}: {rep.failed} of {rep.total} keys failed ({rep.gave_up} gave up"
        + (f", {retrying} will be retried" if retrying else "") + f"), {len(rep.groups)} distinct error(s)")
    for i, g in enumerate(rep.groups, 1):
        shown = ", ".join(repr(k) for k in g.keys[:EXAMPLE_KEYS])
        more = f" and {g.count - EXAMPLE_KEYS} more" if g.count > EXAMPLE_KEYS else ""
        say(f"\n[{i}] {g.count} key(s): {safe(g.signature)}\n    keys: {shown}{more}")
        if g.error != g.signature:
            say(f"    e.g.: {safe(g.error)}")
        for line in g.detail.splitlines():
            say(f"    | {safe(line)}")


def top(results: Mapping[str, VMTop | BaseException], *, as_json: bool) -> None:
    from cluster.vm.verdict import describe

    if as_json:
        dump({n: {"error": str(r)} if isinstance(r, BaseException) else
              {"workers": r.workers, "sample": r.sample.to_dict(), "verdict": r.verdict.to_dict()}
              for n, r in sorted(results.items())})
        return
    for name, r in sorted(results.items()):
        if isinstance(r, BaseException):
            say(f"==> {name}: FAILED: {r}")
        else:
            say(f"==> {name} (judged against {r.workers} worker process(es))")
            say(safe(describe(r.sample, r.verdict)))
    say("==> top: " + ", ".join(f"{n} {'FAILED' if isinstance(r, BaseException) else r.verdict.kind}"
                                for n, r in sorted(results.items())))


# -- fab status --watch -------------------------------------------------------------------------------


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}/s" if rate >= 1 or rate == 0 else f"{60 * rate:.1f}/min"


def fmt_age(v: VMView) -> str:
    if v.heartbeat_age is None:
        return "never"
    return f"{v.heartbeat_age:.0f}s ago" + (" (stale)" if v.stale else "")


def counts(rv: RunView) -> str:
    s = rv.status
    if s.total is None:
        return ("counts unavailable (see `fab logs VM`)" if s.result
                else "counts unknown (no VM running; `fab heal`)")
    pct = 100.0 * (s.done or 0) / s.total if s.total else 100.0
    return f"{s.done}/{s.total} done ({pct:.0f}%), {s.failed} failed, {s.running} running"


def plain_lines(view: View) -> list[str]:
    """One line per run and one for the VMs, stamped: for logs and pipes."""
    stamp = time.strftime("%H:%M:%S", time.localtime(view.time))
    lines = []
    for rv in view.runs:
        s = rv.status
        lines.append(f"{stamp} run {s.id}: {s.result or ('stuck' if s.stuck else 'running')}: {counts(rv)}, "
                     f"rate {fmt_rate(rv.rate)}, ETA {fmt_eta(rv.eta)}")
    if not view.runs:
        lines.append(f"{stamp} no runs on cluster {view.cluster}")
    vms = ", ".join(f"{v.name} {v.state}" + (f" {fmt_rate(v.rate)}" if v.state == "running" else "")
                    for v in view.vms)
    lines.append(f"{stamp} vms {view.running_vms}/{len(view.vms)} up: {vms or 'none'}")
    return lines


STATE_STYLE = {"running": "green", "idle": "cyan", "preempted": "red", "stopped": "dim",
               "stopping": "yellow", "starting": "yellow", "mount-dead": "bold red", "waiting": "cyan",
               "no-agent": "bold red", "unreachable": "bold red"}


def rich_view(view: View) -> RenderableType:
    """One table per run and one of the VMs, for a terminal."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    parts: list[RenderableType] = [Text.assemble(
        (f"cluster {view.cluster}", "bold"), f" ({view.provider}): {view.running_vms}/"
        f"{len(view.vms)} VMs up, {time.strftime('%H:%M:%S', time.localtime(view.time))}")]
    for rv in view.runs:
        s = rv.status
        result = s.result or ("stuck" if s.stuck else "running")
        t = Table(title=Text(f"run {s.id}  [{safe(s.spec)}]", style="bold"), title_justify="left")
        for col in ("progress", "done", "failed", "running", "pending", "rate", "ETA", "state"):
            t.add_column(col, justify="left" if col in ("progress", "state") else "right")
        if s.total is None:
            t.add_row(Text(counts(rv), style="yellow"), "-", "-", "-", "-", fmt_rate(rv.rate), "?", result)
        else:
            bar = ProgressBar(total=max(s.total, 1), completed=s.done or 0, width=30,
                              complete_style="green" if not s.failed else "yellow")
            t.add_row(bar, f"{s.done}/{s.total}", Text(str(s.failed), style="red" if s.failed else ""),
                      str(s.running), str(s.pending), fmt_rate(rv.rate), fmt_eta(rv.eta),
                      Text(result, style={"done": "green", "running": "bold"}.get(result, "red")))
        parts.append(t)
        for line in trouble_lines(s):
            parts.append(Text(safe(line), style="red"))
    if not view.runs:
        parts.append(Text("no runs yet: `fab run SPEC` starts one", style="dim"))
    if view.earlier:
        parts.append(Text(f"{view.earlier} earlier run(s) over; `fab status` lists them", style="dim"))
    vt = Table(title=Text("VMs", style="bold"), title_justify="left")
    for col in ("VM", "state", "worker rate", "heartbeat"):
        vt.add_column(col, justify="right" if col == "worker rate" else "left")
    for v in view.vms:
        vt.add_row(v.name, Text(v.state, style=STATE_STYLE.get(v.state, "")),
                   fmt_rate(v.rate) if v.state == "running" else "-",
                   Text(fmt_age(v), style="red" if v.stale else ""))
    parts.append(vt)
    return Group(*parts)
