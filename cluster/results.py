"""What `python -m tasks` prints on a VM for the laptop, parsed as untrusted input into typed results.

The engine's commands end with one JSON line (`status --json`, `failures --json`,
`collect`, `report`); a VM someone controls can print anything there, so each result is
checked for its types, sizes and names before the laptop uses it, and a bad one is a
ResultError that names the VM.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cluster.errors import ResultError
from cluster.records import MAX_COUNT, EngineCounts, Fields
from tasks.keys import name_problem

VM_HINT = "A VM (or whoever controls it) can print anything: check that VM (`fab logs VM`, `fab exec`)"
MAX_RESULT_BYTES = 256 << 20  # the last line of an engine command (failures lists every failed key)
MAX_KEY_CHARS = 65536  # one key as a failure group lists it
MAX_DETAIL_CHARS = 65536  # an error or a traceback's end
MAX_GROUP_KEYS = 10**7


def json_line(stdout: str, *, host: str, command: str) -> dict[str, Any]:
    """The engine's result: the last line of stdout, one JSON object."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    source = f"what `python -m tasks {command}` printed on {host}"
    if not lines:
        raise ResultError(f"{host}: `python -m tasks {command}` printed no JSON result")
    if len(lines[-1]) > MAX_RESULT_BYTES:
        raise ResultError(f"refused {source}: more than {MAX_RESULT_BYTES} bytes")
    try:
        data = json.loads(lines[-1])
    except ValueError as e:
        raise ResultError(f"{host}: `python -m tasks {command}` printed no JSON result: "
                          f"{stdout.strip()[-300:]!r}") from e
    if not isinstance(data, dict):
        raise ResultError(f"refused {source}: {str(data)[:80]!r}, not a JSON object")
    return data


def counts(stdout: str, *, host: str) -> EngineCounts:
    """`tasks status --json`: the task's key counts."""
    return EngineCounts.from_fields(_fields(json_line(stdout, host=host, command="status"),
                                            f"what `python -m tasks status` printed on {host}"))


@dataclass(frozen=True)
class FailureGroup:
    """Failed keys that share one error signature (tasks.failures.FailureGroup, as JSON)."""

    signature: str  # the error with literals masked: what the keys share
    keys: tuple[str, ...]  # every key of the group
    count: int
    gave_up: int  # keys that reached --max-attempts
    error: str  # the error line of the group's first key
    detail: str  # the end of that key's traceback or stderr


@dataclass(frozen=True)
class FailureReport:
    """`tasks failures --json`: a task's failed keys grouped by error."""

    task: str
    total: int
    failed: int
    gave_up: int
    groups: tuple[FailureGroup, ...]
    retried: tuple[str, ...] | None  # with --retry: the keys whose records were reset

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "total": self.total, "failed": self.failed, "gave_up": self.gave_up,
                "groups": [{"signature": g.signature, "keys": list(g.keys), "count": g.count,
                            "gave_up": g.gave_up, "error": g.error, "detail": g.detail} for g in self.groups],
                **({"retried": list(self.retried)} if self.retried is not None else {})}


def failures(stdout: str, *, host: str) -> FailureReport:
    source = f"what `python -m tasks failures` printed on {host}"
    f = _fields(json_line(stdout, host=host, command="failures"), source)
    groups = []
    raw_groups = f.raw.get("groups")
    if not isinstance(raw_groups, list):
        raise f.refused("groups", "must be a list")
    for i, g in enumerate(raw_groups):
        gf = _fields(g, f"{source}: groups[{i}]")
        keys = _keys(gf, "keys")
        groups.append(FailureGroup(
            signature=gf.text("signature", max_len=MAX_DETAIL_CHARS), keys=keys,
            count=gf.whole("count", 0, MAX_GROUP_KEYS, optional=True) or len(keys),
            gave_up=gf.whole("gave_up", 0, MAX_GROUP_KEYS, optional=True) or 0,
            error=_multiline(gf, "error"), detail=_multiline(gf, "detail")))
    retried = _keys(f, "retried") if "retried" in f.raw else None
    return FailureReport(task=f.name("task"), total=f.whole("total", 0, MAX_COUNT),
                         failed=f.whole("failed", 0, MAX_COUNT), gave_up=f.whole("gave_up", 0, MAX_COUNT),
                         groups=tuple(groups), retried=retried)


@dataclass(frozen=True)
class Collected:
    """`tasks collect`: the table it wrote (on the share) and what went into it."""

    task: str
    rows: int
    columns: int
    outputs: int  # outputs read
    missing: int  # keys not done
    unreadable: int  # outputs skipped as unreadable
    seconds: float  # how long the VM took


def collected(stdout: str, *, host: str) -> Collected:
    f = _fields(json_line(stdout, host=host, command="collect"), f"what `python -m tasks collect` printed on {host}")
    return Collected(task=f.name("task"), rows=f.whole("rows", 0, MAX_COUNT), columns=f.whole("columns", 0, MAX_COUNT),
                     outputs=f.whole("outputs", 0, MAX_COUNT), missing=f.whole("missing", 0, MAX_COUNT),
                     unreadable=f.whole("unreadable", 0, MAX_COUNT, optional=True) or 0,
                     seconds=f.number("seconds", 0, 1e9))


@dataclass(frozen=True)
class Reported:
    """`tasks report`: the report drawn into the task's bookkeeping folder on the share."""

    task: str  # a plain folder name (checked): it picks the laptop's folder under --to
    tasks: int  # executions that succeeded
    failures: int  # executions that failed
    hosts: int


def reported(stdout: str, *, host: str, to: str) -> Reported:
    """The report's result; a task name that is not one plain folder name is refused, naming `to`."""
    data = json_line(stdout, host=host, command="report")
    task = data.get("task")
    why = _name_problem(task)
    if why is not None:
        raise ResultError(f"{host} reported the task name {str(task)[:80]!r}, which {why}: refusing to use "
                          f"it as a folder under {to}. The run request on the share may be forged: check "
                          ".spotfan/cluster/runs/ on the share")
    f = _fields(data, f"what `python -m tasks report` printed on {host}")
    return Reported(task=task, tasks=f.whole("tasks", 0, MAX_COUNT), failures=f.whole("failures", 0, MAX_COUNT),
                    hosts=f.whole("hosts", 0, MAX_COUNT))


def _fields(raw: object, source: str) -> Fields:
    return Fields(raw, source, error=ResultError, hint=VM_HINT)


def _name_problem(task: object) -> str | None:
    if not isinstance(task, str):
        return "is not a string"
    return name_problem(task)


def _keys(f: Fields, key: str) -> tuple[str, ...]:
    v = f.raw.get(key)
    if not isinstance(v, list) or len(v) > MAX_GROUP_KEYS or not all(
            isinstance(k, str) and len(k) <= MAX_KEY_CHARS for k in v):
        raise f.refused(key, f"must be a list of at most {MAX_GROUP_KEYS} keys")
    return tuple(v)


_SHOWN_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _multiline(f: Fields, key: str) -> str:
    """An error or traceback: newlines kept, anything else a terminal would act on escaped."""
    v = f.raw.get(key, "")
    if not isinstance(v, str) or len(v) > MAX_DETAIL_CHARS:
        raise f.refused(key, f"must be a string of at most {MAX_DETAIL_CHARS} characters")
    return _SHOWN_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", v)
