"""What is done and what is left: file-keyed, idempotent tasks.

The whole contract: a key is done if and only if its output exists at its final path,
and only a rename puts it there.

The names below are imported on first use (PEP 562), so a program that needs one small
module of the package (`tasks.keys`, `tasks.fs`: `fab push` does) does not pay for the
runner, the process pool and their libraries.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.runreport import RunReport
    from tasks.errors import (ClaimError, EnvironmentFault, OutputCollision, PublishError, RootError,
                              SpecError, TaskError, UnsafePath)
    from tasks.memo import MemoError, memo
    from tasks.progress import Snapshot
    from tasks.runner import run
    from tasks.spec import CmdTask, FileTask, KeySource, filetask, load_spec
    from tasks.status import TaskStatus, status

__all__ = ["filetask", "memo", "MemoError", "run", "status", "load_spec", "FileTask", "CmdTask", "KeySource",
           "RunReport", "Snapshot", "TaskStatus", "TaskError", "SpecError", "OutputCollision",
           "UnsafePath", "ClaimError", "PublishError", "RootError", "EnvironmentFault"]

_HOME = {  # each public name: the module that defines it
    **dict.fromkeys(["ClaimError", "EnvironmentFault", "OutputCollision", "PublishError", "RootError",
                     "SpecError", "TaskError", "UnsafePath"], "tasks.errors"),
    "RunReport": "tasks.runreport", "MemoError": "tasks.memo", "memo": "tasks.memo", "Snapshot": "tasks.progress",
    "run": "tasks.runner", "TaskStatus": "tasks.status", "status": "tasks.status",
    **dict.fromkeys(["CmdTask", "FileTask", "KeySource", "filetask", "load_spec"], "tasks.spec"),
}


def _load(name: str) -> Any:
    return getattr(importlib.import_module(_HOME[name]), name)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'tasks' has no attribute {name!r}")
    value = globals()[name] = _load(name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`tasks.memo` and `tasks.status` are the functions, as they were when this package imported
    everything at once, although importing the submodules of those names binds them to the modules."""

    memo = property(lambda self: _load("memo"), lambda self, _module: None)
    status = property(lambda self: _load("status"), lambda self, _module: None)


sys.modules[__name__].__class__ = _Package
