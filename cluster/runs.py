"""Runs on a cluster: the requests `fab run` writes to the share, their ends, the wait for one, the VMs' logs.

`submit` writes a run request (cluster.records.RunRequest) under the share's runs/;
every VM's agent picks it up and starts `python -m tasks run` against the mounted share.
The end of a run is the done record the first agent to see it finish writes. Every file
read back is validated: a refused one is named, and skipped where the rest can go on.
"""
from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cluster.errors import ClusterError, ConfigError, RecordError
from cluster.records import (
    LOGS_DIR,
    MAX_WORKERS_PER_VM,
    RUNS_DIR,
    RunDone,
    RunRequest,
    done_file,
    is_request,
    log_dir,
    plain_name,
    request_file,
)
from cluster.session import Cluster
from tasks import bounds
from tasks.keys import name_problem

logger = logging.getLogger(__name__)

WAIT_POLL_S = 2.0
WAIT_TIMEOUT_S = 3600.0  # `fab run --wait`: how long to follow a run before giving up (--wait-timeout)
LOG_TAIL_BYTES = 8000
MAX_WAIT_S = 30 * 86400.0  # `fab run --wait --wait-timeout`
MAX_KEY_TIMEOUT_S = 7 * 86400.0  # `fab run --timeout`: one key may run this long at most
MAX_LOG_NAMES = 10_000  # files listed in one VM's log folder


@dataclass(frozen=True)
class Requests:
    """The run requests on the share, oldest first, and the files refused among them."""

    requests: list[RunRequest]
    refused: list[str] = field(default_factory=list)  # one message per refused file, naming it


def spec_arguments(spec: str, *, src: str = "", keys: str = "", out: str = "", name: str = "",
                   lease: float = 0.0) -> list[str]:
    """`tasks` arguments that pick the task: SPEC is module:function, or a command line.

    A module:function never holds a space or a brace, so a SPEC that does is a command
    (`tasks run --cmd SPEC`) and needs --src or --keys, and --out.
    """
    spec = spec.strip()
    is_cmd = any(ch in spec for ch in " {")
    if is_cmd:
        if not out or bool(src) == bool(keys):
            raise ConfigError(
                f"command task {spec!r} needs --out TEMPLATE and exactly one of --src GLOB or --keys FILE"
            )
        args = ["--cmd", spec, *(["--src", src] if src else ["--keys", keys]), "--out", out]
    else:
        if ":" not in spec or src or keys or out:
            raise ConfigError(
                f"SPEC {spec!r}: give module:function (a @filetask), or a command line with "
                "{src}/{out} placeholders plus --src/--keys and --out"
            )
        args = [spec]
    if name:
        _check(f"--name {name[:80]!r}", name_problem(name))
        args += ["--name", name]
    if lease:
        _check("--lease", bounds.seconds_problem(lease, bounds.MIN_LEASE_S, bounds.MAX_LEASE_S))
        args += ["--lease", f"{lease:g}"]
    return args


def check_wait_timeout(timeout: float) -> None:
    """`fab run --wait --wait-timeout`: a finite number of seconds, at most MAX_WAIT_S."""
    _check("--wait-timeout", bounds.seconds_problem(timeout, 1, MAX_WAIT_S))


def _check(option: str, why: str | None) -> None:
    """Refuse a `fab run` number here, before a request reaches the VMs (the same bounds
    as `tasks run`, tasks.bounds)."""
    if why is not None:
        raise ConfigError(f"{option} {why}")


def run_arguments(*, max_attempts: int = 0, limit: int = 0, retry_failed: bool = False,
                  fsync: bool = False, timeout: float = 0.0, keep_output: bool = False,
                  fetch: bool = False) -> list[str]:
    """Options only `tasks run` takes (not `tasks status`); 0 leaves one at its default.
    `timeout`: `tasks run --timeout`, the seconds after which a key's worker is stopped and
    the attempt counts as failed."""
    args = []
    if timeout:
        _check("--timeout", bounds.seconds_problem(timeout, 0.1, MAX_KEY_TIMEOUT_S))
        args += ["--timeout", f"{timeout:g}"]
    if max_attempts:
        _check("--max-attempts", bounds.count_problem(max_attempts, 1, bounds.MAX_ATTEMPTS_LIMIT))
        args += ["--max-attempts", str(max_attempts)]
    if limit:
        _check("--limit", bounds.count_problem(limit, 1, bounds.MAX_LIMIT))
        args += ["--limit", str(limit)]
    if retry_failed:
        args.append("--retry-failed")
    if fsync:
        args.append("--fsync")
    if keep_output:
        args.append("--keep-output")
    if fetch:
        args.append("--fetch")
    return args


def new_run_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def submit(cluster: Cluster, *, spec_args: Sequence[str], run_args: Sequence[str] = (),
           workers_per_vm: int | None = None, ship: Sequence[Path] = (),
           after: str | None = None) -> RunRequest:
    """Ship code to the share (optional) and write a run request the agents will pick up."""
    if not spec_args:
        raise ClusterError("nothing to run: give SPEC (module:function) or --cmd with --src/--keys and --out")
    if workers_per_vm is not None:
        _check("--workers-per-vm", bounds.count_problem(workers_per_vm, 1, MAX_WORKERS_PER_VM))
    req = RunRequest(id=new_run_id(), spec_args=list(spec_args), run_args=list(run_args),
                     workers_per_vm=workers_per_vm, created=time.time(), after=after)
    share = cluster.board
    for path in ship:
        n = share.ship(path)
        logger.info("shipped %s (%d files) to the share", path, n)
    share.write_text(request_file(req.id), req.to_json())
    return req


def requests(cluster: Cluster) -> Requests:
    """Every run request on the share, oldest first; a forged or broken one is refused, not used."""
    found, refused = [], []
    for n in cluster.board.listdir(RUNS_DIR):
        if not is_request(n):
            continue
        rel = f"{RUNS_DIR}/{n}"
        try:
            text = cluster.board.read_text(rel)
            if text:
                found.append(RunRequest.from_json(text, source=rel, run_id=n[: -len(".json")]))
        except RecordError as e:
            refused.append(str(e))
    return Requests(sorted(found, key=lambda r: r.created), refused)


def finished(cluster: Cluster, run_id: str) -> RunDone | None:
    """The run's done record, validated; None while the run goes on."""
    rel = done_file(run_id)
    text = cluster.board.read_text(rel)
    return RunDone.from_json(text, source=rel, run_id=run_id) if text else None


def wait(cluster: Cluster, run_id: str, *, timeout: float,
         on_tick: Callable[[], None] | None = None, tick_every: float = 10.0) -> RunDone:
    """Block until the run is over (its done record exists); return that record.

    `on_tick` is called every `tick_every` seconds meanwhile (to show progress). A done
    record that is refused ends the wait with its RecordError: it would never be replaced.
    """
    check_wait_timeout(timeout)
    deadline = time.monotonic() + timeout
    last_tick = 0.0
    for _ in range(int(timeout / WAIT_POLL_S) + 2):
        done = finished(cluster, run_id)
        if done is not None:
            return done
        if on_tick is not None and time.monotonic() - last_tick >= tick_every:
            last_tick = time.monotonic()
            on_tick()
        if time.monotonic() > deadline:
            break
        time.sleep(WAIT_POLL_S)
    raise ClusterError(
        f"run {run_id} not finished after {timeout:g}s; `fab status` shows where it is, "
        "`fab heal` restarts stopped VMs"
    )


def logs(cluster: Cluster, vm: str, *, max_bytes: int = LOG_TAIL_BYTES) -> dict[str, str]:
    """The tail of each log this VM wrote to the share: its agent's and one per run."""
    why = name_problem(vm)
    if why is not None:
        raise ConfigError(f"VM {vm[:80]!r} {why}: give a VM name as `fab status` lists them")
    share = cluster.board
    names = [n for n in share.listdir(log_dir(vm))[:MAX_LOG_NAMES] if plain_name(n)]
    if not names:
        known = [n for n in share.listdir(LOGS_DIR)[:MAX_LOG_NAMES] if plain_name(n)]
        raise ClusterError(f"no logs for {vm!r} on the share; VMs with logs: {', '.join(known) or 'none'}")
    return {n: share.tail(f"{log_dir(vm)}/{n}", max_bytes=max_bytes) or "" for n in names}
