"""What is done and what is left: file-keyed, idempotent tasks.

The whole contract: a key is done if and only if its output exists at its final path,
and only a rename puts it there.
"""
from tasks.errors import (ClaimError, EnvironmentFault, OutputCollision, PublishError, RootError,
                          SpecError, TaskError, UnsafePath)
from tasks.runreport import RunReport
from tasks.memo import MemoError, memo
from tasks.progress import Snapshot
from tasks.runner import run
from tasks.spec import CmdTask, FileTask, KeySource, filetask, load_spec
from tasks.status import TaskStatus, status

__all__ = ["filetask", "memo", "MemoError", "run", "status", "load_spec", "FileTask", "CmdTask", "KeySource",
           "RunReport", "Snapshot", "TaskStatus", "TaskError", "SpecError", "OutputCollision",
           "UnsafePath", "ClaimError", "PublishError", "RootError", "EnvironmentFault"]
