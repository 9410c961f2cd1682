"""The exceptions of the tasks package, one small tree.

    TaskError                  anything the task engine cannot do
     +-- SpecError             the task spec is wrong; found before any work starts
     |    +-- OutputCollision  two keys map to one output path
     |    +-- UnsafePath       a key or template would read or write outside the root
     +-- RootError             the run root cannot be used: exit 3, fix it and run again
     |    +-- ClaimError       the claim directory cannot be used (permissions, dead mount)
     |    +-- PlanError        plan.json is damaged while a live runner holds the task
     |    +-- EnvironmentFault out of space, read-only, dead mount, I/O error, lost temp folder
     |    |    +-- StoreUnreachable  an object store's endpoint does not answer, or kept failing
     |    +-- StoreAccessError no credentials for an object store, or a permission it denied
     |    +-- NoSuchBucket     the bucket of an s3:// or gs:// root does not exist
     +-- PublishError          a finished temporary could not be moved to its final path
     +-- CollectError          outputs could not be read into one table, or it could not be written
     +-- ReportError           a run report cannot be drawn (nothing logged yet)

Every message says what happened and how to fix it. The command line (tasks/cli.py)
decides how errors look and which exit code they carry (2 for SpecError, 3 for RootError).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class TaskError(Exception):
    """Base of every error raised by the tasks package."""


class SpecError(TaskError):
    """The task spec is wrong: raised before any work starts."""


class OutputCollision(SpecError):
    """Two or more keys map to one output path."""


class UnsafePath(SpecError):
    """A key, source or output template would reach outside the run root."""


class RootError(TaskError):
    """The run root (or the disk under it) cannot be used; no key is charged for it."""


class ClaimError(RootError):
    """The claim directory under the root cannot be used."""


class PlanError(RootError):
    """A task's plan.json is damaged and a live runner may still rely on it."""


class EnvironmentFault(RootError):
    """The environment failed under a key (full disk, read-only folder, dead mount, I/O
    error, a vanished temporary folder): the run stops and the key is not charged."""


class StoreUnreachable(EnvironmentFault):
    """An object store's endpoint did not answer (refused, reset, timed out) or kept
    answering 5xx past the bounded retries: nothing was changed by the failed call."""


class StoreAccessError(RootError):
    """An object store refused us: no credentials were found or they were rejected, or it
    denied a permission. `permission` names the IAM permission (`s3:PutObject`,
    `storage.objects.create`) when one was denied, else None."""

    def __init__(self, message: str, *, permission: str | None = None) -> None:
        super().__init__(message)
        self.permission = permission


class NoSuchBucket(RootError):
    """The bucket of an object-store root does not exist (or is not visible to us)."""


class PublishError(TaskError):
    """A finished temporary could not be moved to its final path."""


@dataclass(frozen=True)
class Unreadable:
    """One output that could not be read by `collect`."""

    key: str  # the task's key
    path: str  # the output's path, relative to the run root
    reason: str  # one line: exception type and message


class CollectError(TaskError):
    """Outputs could not be read into one table, or the table could not be written.

    `unreadable` lists every output that failed, so one bad file never hides the others.
    """

    def __init__(self, message: str, unreadable: Sequence[Unreadable] = ()) -> None:
        super().__init__(message)
        self.unreadable = list(unreadable)


class ReportError(TaskError):
    """A run report cannot be drawn, e.g. because nothing was logged yet."""


def misspelled_option(e: BaseException, options: Mapping[str, Sequence[str]]) -> str:
    """For `@filetask(outt=...)`: the options the decorator takes (`options`, by its name), and the closest."""
    m = re.fullmatch(r"(\w+)\(\) got an unexpected keyword argument '(\w+)'", str(e))
    if not isinstance(e, TypeError) or m is None or m.group(1) not in options:
        return ""
    takes = options[m.group(1)]
    close = difflib.get_close_matches(m.group(2), takes, n=1)
    return (f"; did you mean {close[0]}=?" if close else "") + f" @{m.group(1)} takes {', '.join(takes)}"
