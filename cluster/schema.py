"""The one strict reader of cluster.toml tables: typed fields, and unknown tables or keys
refused with the closest valid name, every problem reported in file order.

A table is a dict of key -> `Field`, one line per key (`whole(2, 0, 250)`, `text("lab",
choices=...)`, ...). `problems()` walks the parsed TOML in document order (tomllib keeps
it) and returns every problem it finds; `values()` gives each table's values with the
defaults filled in, once there are none. A default of None means "worked out by the
caller" (from other fields); `REQUIRED` means the key must be there.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
CLOSE_MATCH_CUTOFF = 0.6  # difflib ratio above which a name is offered as "did you mean"


@dataclass(frozen=True)
class Field:
    """One key of a table: its kind, default and bounds."""

    kind: str  # str | int | float | bool | strs (list of strings) | table | map
    default: Any = REQUIRED  # REQUIRED, None (the caller works it out), or the value
    low: float | None = None  # numbers: the smallest value allowed
    high: float | None = None  # numbers: the largest value allowed
    choices: tuple[str, ...] = ()  # str: the only values allowed (compared case-insensitively)
    fields: Mapping[str, Field] | None = None  # table: its keys
    value: Field | None = None  # map (free keys, e.g. labels): the field every value must fit
    check: Callable[[Any], str | None] | None = None  # more checks of a well-typed value: a problem or None

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` for this field ("must be ..."), or None."""
        kind = self.kind
        if kind == "str":
            if not isinstance(value, str) or (self.default is REQUIRED and not value):
                return "must be a non-empty string" if self.default is REQUIRED else "must be a string"
            if self.choices and value.lower() not in [c.lower() for c in self.choices]:
                near = _closest(value, self.choices)
                return (f"must be one of {', '.join(repr(c) for c in self.choices)}"
                        + (f"; did you mean {near!r}?" if near else ""))
        elif kind == "bool":
            if not isinstance(value, bool):
                return "must be true or false"
        elif kind in ("int", "float"):
            # bool is an int in Python: a `true` where a number belongs is still an error.
            ok = (int,) if kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok) or (
                    self.low is not None and value < self.low) or (self.high is not None and value > self.high):
                return "must be " + _number_phrase(self)
        elif kind == "strs":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                return 'must be a list of strings, e.g. ["a", "b"]'
        elif kind in ("table", "map"):
            if not isinstance(value, dict):
                return "must be a table"
        if self.check is not None:
            return self.check(value)
        return None


def text(default: Any = REQUIRED, *, choices: tuple[str, ...] = (),
         check: Callable[[Any], str | None] | None = None) -> Field:
    return Field("str", default, choices=choices, check=check)


def whole(default: Any, low: int | None = None, high: int | None = None, *,
          check: Callable[[Any], str | None] | None = None) -> Field:
    return Field("int", default, low=low, high=high, check=check)


def number(default: Any, low: float | None = None, high: float | None = None) -> Field:
    return Field("float", default, low=low, high=high)


def flag(default: Any) -> Field:
    return Field("bool", default)


def strings(default: Any = (), *, check: Callable[[Any], str | None] | None = None) -> Field:
    return Field("strs", list(default) if isinstance(default, (list, tuple)) else default, check=check)


def table(fields: Mapping[str, Field]) -> Field:
    return Field("table", None, fields=fields)


def mapping(value: Field, *, check: Callable[[Any], str | None] | None = None) -> Field:
    return Field("map", {}, value=value, check=check)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in cluster.toml, located by table and key."""

    table: str  # e.g. "cluster", "gce.head"; "" for the top level of the file
    key: str | None  # None when the table itself is the problem
    text: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        where = f"[{self.table}]" if self.table else "at the top of the file,"
        # texts read on from the name: "= 3: must be ...", "is required: ...", "is not a known key; ..."
        return f"{where} {self.key} {self.text}" if self.key is not None else f"{where} {self.text}"


@dataclass
class _Walk:
    problems: list[Problem] = field(default_factory=list)

    def table(self, name: str, raw: Mapping[str, Any], fields: Mapping[str, Field], *,
              require: bool) -> None:
        for key, value in raw.items():
            spec = fields.get(key)
            if spec is None:
                near = _closest(key, fields)
                self.problems.append(Problem(name, key, "is not a known key; " + (
                    f"did you mean {near}?" if near else f"[{name}] takes {', '.join(fields)}")))
                continue
            self.value(name, key, value, spec, require=require)
        if require:
            for key, spec in fields.items():
                if spec.default is REQUIRED and key not in raw:
                    self.problems.append(Problem(name, key, f"is required: add `{key} = ...` under [{name}]"))

    def value(self, name: str, key: str, value: Any, spec: Field, *, require: bool) -> None:
        wrong = spec.problem(value)
        if wrong is not None:
            self.problems.append(Problem(name, key, f"= {_show(value)}: {wrong}"))
            return
        if spec.kind == "table" and spec.fields is not None:
            self.table(f"{name}.{key}", value, spec.fields, require=require)
        elif spec.kind == "map" and spec.value is not None:
            for k, v in value.items():
                self.value(f"{name}.{key}", k, v, spec.value, require=require)


def problems(raw: Mapping[str, Any], tables: Mapping[str, Mapping[str, Field]], *,
             required: Mapping[str, bool] | None = None) -> list[Problem]:
    """Every problem of a parsed cluster.toml against `tables`, in file order.

    `required[name]` false skips the REQUIRED keys of that table (a table the chosen
    provider does not use is checked for typos and types only).
    """
    walk = _Walk()
    misspelled = set()  # tables the file seems to mean under another name: no "missing" for them
    for name, value in raw.items():
        fields = tables.get(name)
        if fields is None:
            if not isinstance(value, dict):
                owner = [t for t, f in tables.items() if name in f]
                walk.problems.append(Problem("", name, "is outside any table; " + (
                    f"did you mean {name} under [{owner[0]}]?" if owner else
                    f"the tables are {', '.join(f'[{t}]' for t in tables)}")))
            else:
                near = _closest(name, tables)
                misspelled.add(near)
                walk.problems.append(Problem(name, None, "is not a known table; " + (
                    f"did you mean [{near}]?" if near else
                    f"the tables are {', '.join(f'[{t}]' for t in tables)}")))
            continue
        if not isinstance(value, dict):
            walk.problems.append(Problem("", name, f"= {_show(value)}: must be a table, [{name}]"))
            continue
        walk.table(name, value, fields, require=(required or {}).get(name, True))
    for name, fields in tables.items():  # a table left out entirely: its required keys
        if name not in raw and name not in misspelled and (required or {}).get(name, True):
            keys = [k for k, spec in fields.items() if spec.default is REQUIRED]
            if keys:
                walk.problems.append(Problem(name, None, "is required: add the table with "
                                             + ", ".join(f"`{k} = ...`" for k in keys)))
    return walk.problems


def values(raw: Mapping[str, Any], fields: Mapping[str, Field]) -> dict[str, Any]:
    """One checked table's values, the defaults filled in (None: the caller works it out)."""
    out = {}
    for key, spec in fields.items():
        if key in raw:
            out[key] = raw[key]
        elif spec.default is REQUIRED:
            out[key] = None
        elif isinstance(spec.default, (list, dict)):
            out[key] = type(spec.default)(spec.default)
        else:
            out[key] = spec.default
    return out


def error(path: Path | str, found: list[Problem]) -> ConfigError:
    """One ConfigError for the problems: one line, or a numbered list in file order."""
    if len(found) == 1:
        return ConfigError(f"{path}: {found[0]}", found)
    lines = "\n".join(f"  {i}. {p}" for i, p in enumerate(found, 1))
    return ConfigError(f"{path}: {len(found)} problems, in file order:\n{lines}", found)


def _closest(name: str, known: Mapping[str, Any] | tuple[str, ...]) -> str | None:
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=CLOSE_MATCH_CUTOFF)
    if not near:  # case or separator slips: "Idle-Timeout" for idle_timeout
        folded = {k.lower().replace("-", "_"): k for k in known}
        near = [folded[f] for f in [name.lower().replace("-", "_")] if f in folded]
    return near[0] if near else None


def _number_phrase(spec: Field) -> str:
    what = "a whole number" if spec.kind == "int" else "a number"
    low, high = spec.low, spec.high
    if low is not None and high is not None:
        return f"{what} from {low:g} to {high:g}"
    if low is not None:
        return f"{what} of at least {low:g}"
    if high is not None:
        return f"{what} of at most {high:g}"
    return what


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "a table"
