"""The cluster layer's files on the share in one place: the layout of `.spotfan/cluster/` and the typed
records the laptop and the VMs write there, each read back by a validating reader.

    ROOT/.spotfan/cluster/
        cluster.json              DesiredCount: the worker count `fab up` last asked for (the laptop)
        runs/<id>.json            RunRequest: one run, as `fab run` asked for it (the laptop)
        runs/<id>.done.json       RunDone: the run is over, with the engine's counts (the first agent)
        vms/<name>.json           Heartbeat: one VM's agent, every few seconds (that agent)
        logs/<name>/<id>.log      output of that VM's `tasks run` for the run; agent.log
        collect/                  tables `fab collect` has a VM write, downloaded, then removed
    SPOTFAN_HOME/heartbeat.json   the same Heartbeat on the VM's own disk, written even while the share is dead

The share is untrusted input for the laptop: any VM (or anyone with the worker key) can
write it. So every record is read with its types, sizes, names and enums checked; a file
that fails is refused with a RecordError naming it, and nothing read here ever decides
a path on the laptop. Standard library only: the VMs' agents use this module too.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import ClusterError, RecordError
from tasks.keys import name_problem
from tasks.layout import METRICS_DIR

CLUSTER_DIR = ".spotfan/cluster"
RUNS_DIR = f"{CLUSTER_DIR}/runs"
VMS_DIR = f"{CLUSTER_DIR}/vms"
LOGS_DIR = f"{CLUSTER_DIR}/logs"
COLLECT_DIR = f"{CLUSTER_DIR}/collect"
DESIRED_FILE = f"{CLUSTER_DIR}/cluster.json"
LOCAL_HEARTBEAT = "heartbeat.json"  # in SPOTFAN_HOME on the VM's own disk

HEARTBEAT_INTERVAL_S = 2.0  # an agent writes its heartbeat this often
STALE_S = HEARTBEAT_INTERVAL_S + 1.0  # a share heartbeat older than this: ask the VM itself
MAX_RECORD_BYTES = 1 << 20  # a record bigger than this is refused unread
MAX_ARGS = 64  # arguments of a run request's spec or run options
MAX_ARG_CHARS = 16384  # one argument (a --cmd template, a glob)
MAX_RUNS_PER_BEAT = 10_000  # runs one heartbeat may describe
MAX_TEXT = 256  # any other string of a record
MAX_PROBLEM = 600  # a heartbeat's `problem`: one message with its fix
MAX_COUNT = 10**12  # keys, executions, sequence numbers
MAX_EPOCH_S = 1e11  # about the year 5138: a time beyond is no time
MAX_WORKERS_PER_VM = 1024  # `tasks run --workers` on one VM; the VM caps it further, per core
SHARE_HINT = ("Files on the share can be written by any VM (or anyone with the worker key): if no spotfan "
              "command wrote it, delete it")
RUN_ID = re.compile(r"r\d{8}-\d{6}-[0-9a-f]{4}")
AGENT_ID = re.compile(r"[0-9a-f]{0,32}")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # what a terminal would act on (tab, newline pass)

BEAT_STATES = ("working", "waiting", "idle", "mount-dead", "stopped-idle", "stopped", "no-gpu-driver")
MOUNT_STATES = ("ok", "dead", "absent", "unknown")
RUN_STATES = ("starting", "running", "waiting", "queued", "done", "failed", "spec-error", "gave-up")
RUNNER_PHASES = ("starting", "working", "waiting", "finished")
RESULTS = ("done", "failed", "spec-error")  # how a run ends (`tasks run` exits 0, 1, 2)


def request_file(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}.json"


def done_file(run_id: str) -> str:
    return f"{RUNS_DIR}/{run_id}.done.json"


def heartbeat_file(vm: str) -> str:
    return f"{VMS_DIR}/{vm}.json"


def log_dir(vm: str) -> str:
    return f"{LOGS_DIR}/{vm}"


def metrics_file(host: str) -> str:
    return f"{METRICS_DIR}/{host}.jsonl"


def plain_name(name: str) -> bool:
    """Whether a name listed on the share can be one folder entry and be shown as it is."""
    return name_problem(name) is None and not CONTROL.search(name)


def is_request(name: str) -> bool:
    """Whether a name in runs/ is a run request (not a done record, not a temporary)."""
    return name.endswith(".json") and not name.endswith(".done.json") and not name.startswith(".")


def is_heartbeat(name: str) -> bool:
    return name.endswith(".json") and not name.startswith(".")


def read_bounded(path: Path, *, source: str, max_bytes: int = MAX_RECORD_BYTES) -> str | None:
    """A local record's text (on a VM: from the mounted share or its own disk); None if missing.
    `source` names it in a refusal (its path under the run root)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:
        raise RecordError(f"refused {source}: more than {max_bytes} bytes. {SHARE_HINT}")
    return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class DesiredCount:
    """How many workers the cluster should have, as the last `fab up --count` asked (cluster.json)."""

    workers: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, *, source: str) -> DesiredCount:
        f = Fields(_load(text, source), source)
        return cls(workers=f.whole("workers", 0, 100_000))


@dataclass(frozen=True)
class RunRequest:
    """One run, as `fab run` asked for it (runs/<id>.json)."""

    id: str  # e.g. "r20250101-120000-ab12"
    spec_args: list[str]  # what picks the task: SPEC or --cmd/--src/--out/--keys (+ --name, --lease)
    run_args: list[str]  # options only `tasks run` takes (--max-attempts, --limit, ...)
    workers_per_vm: int | None  # `tasks run --workers` on each VM; None: the VM's default
    created: float  # epoch seconds
    after: str | None = None  # a run this one follows: on each VM it starts once that run's
    # process there has ended (`fab failures --retry` while the run it retries still goes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str, run_id: str | None = None) -> RunRequest:
        """A run request, validated; `run_id`: the id its file name says, which it must carry."""
        f = Fields(_load(text, source), source)
        rid = f.text("id", pattern=RUN_ID)
        if run_id is not None and rid != run_id:
            raise f.refused("id", f"is {rid!r}, but the file is named for {run_id!r}")
        spec_args = f.strings("spec_args", min_items=1)
        name = _option(spec_args, "--name")
        if name is not None and (why := name_problem(name)) is not None:
            raise RecordError(f"refused {source}: --name {name[:80]!r} {why}. {SHARE_HINT}")
        return cls(id=rid, spec_args=spec_args, run_args=f.strings("run_args"),
                   workers_per_vm=f.whole("workers_per_vm", 1, MAX_WORKERS_PER_VM, optional=True),
                   created=f.number("created", 0, MAX_EPOCH_S),
                   after=f.text("after", pattern=RUN_ID, optional=True))


@dataclass(frozen=True)
class EngineCounts:
    """A task's key counts, as `python -m tasks status --json` prints them."""

    total: int
    done: int  # output exists
    failed: int  # gave up, not done
    running: int  # held by a live claim
    pending: int  # everything else

    @classmethod
    def from_fields(cls, f: Fields) -> EngineCounts:
        return cls(**{k: f.whole(k, 0, MAX_COUNT) for k in ("total", "done", "failed", "running", "pending")})


@dataclass(frozen=True)
class RunDone:
    """A run is over (runs/<id>.done.json), written by the first agent that saw its `tasks run` end."""

    id: str  # the run
    result: str  # one of RESULTS
    exit_code: int | None  # of that `tasks run`
    vm: str  # the VM whose agent wrote it
    time: float  # epoch seconds, on that VM's clock
    status: EngineCounts | None  # the engine's counts then; None if it could not be asked

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str, run_id: str | None = None) -> RunDone:
        f = Fields(_load(text, source), source)
        rid = f.text("id", pattern=RUN_ID)
        if run_id is not None and rid != run_id:
            raise f.refused("id", f"is {rid!r}, but the file is named for {run_id!r}")
        status = f.raw.get("status")
        return cls(id=rid, result=f.choice("result", RESULTS), exit_code=f.whole("exit_code", -255, 255, optional=True),
                   vm=f.name("vm"), time=f.number("time", 0, MAX_EPOCH_S),
                   status=None if status is None else EngineCounts.from_fields(Fields(status, f"{source}: status")))


@dataclass(frozen=True)
class VmRun:
    """One VM's part in one run, as its heartbeat says."""

    state: str  # one of RUN_STATES
    pid: int | None = None  # of its `tasks run`, while one runs
    restarts: int = 0
    exit_code: int | None = None
    started: float | None = None  # epoch seconds of its last start
    phase: str | None = None  # what its runner's state file last said (RUNNER_PHASES)
    useful: bool = False  # a key of this VM runs for it
    error: str = ""  # the last `error: ...` line of its `tasks run` that exited with work left

    @classmethod
    def from_mapping(cls, raw: object, *, source: str) -> VmRun:
        f = Fields(raw, source)
        return cls(state=f.choice("state", RUN_STATES), pid=f.whole("pid", 1, 1 << 32, optional=True),
                   restarts=f.whole("restarts", 0, MAX_COUNT, optional=True) or 0,
                   exit_code=f.whole("exit_code", -255, 255, optional=True),
                   started=f.number("started", 0, MAX_EPOCH_S, optional=True),
                   phase=f.choice("phase", RUNNER_PHASES, optional=True), useful=f.flag("useful"),
                   error=f.text("error", max_len=MAX_PROBLEM, optional=True) or "")


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat of a VM's agent (vms/<name>.json on the share, heartbeat.json on its disk).

    `agent_id` names one agent process (boot.sh makes it up) and `seq` counts its
    heartbeats, so a heartbeat proves an agent alive without comparing the VM's clock
    with the laptop's.
    """

    name: str  # the VM
    state: str  # one of BEAT_STATES
    time: float  # epoch seconds, on the VM's clock
    agent_id: str  # which agent process wrote it
    seq: int  # heartbeats this agent has written
    mount: str  # one of MOUNT_STATES: the share as the agent last checked it
    agent_pid: int | None = None
    idle_for: float | None = None  # seconds since a key of this VM last ran
    idle_timeout: float | None = None  # the idle guard's
    rate: float | None = None  # task executions per second on this VM (last 30 s)
    executions: int | None = None  # task executions it has counted since it started
    runs: dict[str, VmRun] = field(default_factory=dict)  # run id -> this VM's part
    problem: str = ""  # why the VM cannot work (state "no-gpu-driver": what the driver check said)

    def age(self, now: float) -> float:
        return max(0.0, now - self.time)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, *, source: str, vm: str | None = None) -> Heartbeat:
        """A heartbeat, validated; `vm`: the VM its file is named for, which it must name."""
        f = Fields(_load(text, source), source)
        name = f.name("name")
        if vm is not None and name != vm:
            raise f.refused("name", f"is {name!r}, but the file is {vm!r}'s")
        runs = f.table("runs", max_items=MAX_RUNS_PER_BEAT)
        for rid in runs:
            if not RUN_ID.fullmatch(rid):
                raise f.refused("runs", f"names a run {rid[:40]!r}, not a run id")
        return cls(
            name=name, state=f.choice("state", BEAT_STATES), time=f.number("time", 0, MAX_EPOCH_S),
            agent_id=f.text("agent_id", pattern=AGENT_ID, optional=True) or "",
            seq=f.whole("seq", 0, MAX_COUNT, optional=True) or 0,
            mount=f.choice("mount", MOUNT_STATES, optional=True) or "unknown",
            agent_pid=f.whole("agent_pid", 1, 1 << 32, optional=True),
            idle_for=f.number("idle_for", 0, MAX_EPOCH_S, optional=True),
            idle_timeout=f.number("idle_timeout", 0, MAX_EPOCH_S, optional=True),
            rate=f.number("rate", 0, 1e9, optional=True), executions=f.whole("executions", 0, MAX_COUNT, optional=True),
            runs={rid: VmRun.from_mapping(r, source=f"{source}: runs[{rid}]") for rid, r in runs.items()},
            problem=f.text("problem", max_len=MAX_PROBLEM, optional=True) or "",
        )


def _option(args: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in an argument list (the last one wins, as argparse has it)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def _load(text: str, source: str) -> Any:
    if len(text) > MAX_RECORD_BYTES:
        raise RecordError(f"refused {source}: more than {MAX_RECORD_BYTES} bytes. {SHARE_HINT}")
    try:
        return json.loads(text)
    except ValueError as e:
        raise RecordError(f"refused {source}: not JSON ({e}). {SHARE_HINT}") from e


class Fields:
    """Typed, bounded access to one JSON object of a record; every refusal names the file and the key.

    `error` is the exception a refusal raises (RecordError for a file on the share), and
    `hint` what the message ends with.
    """

    def __init__(self, raw: object, source: str, *, error: type[ClusterError] = RecordError,
                 hint: str = SHARE_HINT) -> None:
        self.source, self.error, self.hint = source, error, hint
        if not isinstance(raw, dict):
            raise error(f"refused {source}: not a JSON object. {hint}")
        self.raw: Mapping[str, Any] = raw

    def refused(self, key: str, why: str) -> ClusterError:
        return self.error(f"refused {self.source}: `{key}` {why}. {self.hint}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.raw or self.raw[key] is None:
            if optional:
                return None
            raise self.refused(key, "is missing")
        return self.raw[key]

    def text(self, key: str, *, pattern: re.Pattern[str] | None = None, max_len: int = MAX_TEXT,
             optional: bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if not isinstance(v, str) or len(v) > max_len or CONTROL.search(v):
            raise self.refused(key, f"must be a string of at most {max_len} printable characters")
        if pattern is not None and not pattern.fullmatch(v):
            raise self.refused(key, f"= {v[:40]!r} is not of the form {pattern.pattern}")
        return v

    def name(self, key: str) -> str:
        v = self.text(key)
        why = name_problem(v)
        if why is not None:
            raise self.refused(key, f"= {v[:40]!r} {why}")
        return v  # type: ignore[no-any-return]

    def choice(self, key: str, choices: Sequence[str], *, optional: bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if v not in choices:
            raise self.refused(key, f"= {str(v)[:40]!r} is not one of {', '.join(choices)}")
        return v

    def number(self, key: str, low: float, high: float, *, optional: bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
            raise self.refused(key, f"= {str(v)[:40]!r} is not a number from {low:g} to {high:g}")
        return float(v)

    def whole(self, key: str, low: int, high: int, *, optional: bool = False) -> Any:
        v = self._get(key, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise self.refused(key, f"= {str(v)[:40]!r} is not a whole number from {low} to {high}")
        return v

    def flag(self, key: str) -> bool:
        v = self.raw.get(key, False)
        if not isinstance(v, bool):
            raise self.refused(key, "must be true or false")
        return v

    def strings(self, key: str, *, min_items: int = 0) -> list[str]:
        v = self._get(key, False)
        if (not isinstance(v, list) or not min_items <= len(v) <= MAX_ARGS
                or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS and "\0" not in a for a in v)):
            raise self.refused(key, f"must be a list of {min_items} to {MAX_ARGS} strings of at most "
                                    f"{MAX_ARG_CHARS} characters")
        return list(v)

    def table(self, key: str, *, max_items: int) -> dict[str, Any]:
        v = self.raw.get(key) or {}
        if not isinstance(v, dict) or len(v) > max_items:
            raise self.refused(key, f"must be an object of at most {max_items} entries")
        return v
