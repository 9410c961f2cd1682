"""The note `tasks run` ends with when keys failed: which, after how many attempts, and where their records are."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import TaskError
from tasks.layout import Layout
from tasks.records import Failure, FailureStore
from tasks.runreport import RunReport

if TYPE_CHECKING:
    from tasks.store.root import BucketRoot

SHOWN_FAILED = 5  # failed keys named in the message after a run


def failed_note(report: RunReport, root: str) -> str:
    """The failed keys of `report` (a run on `root`, as given), where their errors are, and
    what to do next."""
    return (f"{failed_after(report)}. Errors are in {failed_where(report, root)}; rerun with "
            "--retry-failed after fixing the cause")


def failed_after(report: RunReport) -> str:
    """The failed keys, each with the attempts its failure record counts (earlier runs and
    other machines included, not this run's --max-attempts)."""
    keys = report.failed[:SHOWN_FAILED]
    try:
        records = _records(report, keys)
    except (OSError, TaskError):
        records = {}  # the message names the keys without their counts
    counts = {records[k].attempts for k in keys if k in records}
    more = " ..." if len(report.failed) > SHOWN_FAILED else ""
    if len(counts) == 1 and len(records) == len(keys):
        shown = ", ".join(repr(k) for k in keys)
        return f"{len(report.failed)} key(s) failed after {counts.pop()} attempt(s): {shown}{more}"
    shown = ", ".join(f"{k!r} ({records[k].attempts} attempt(s))" if k in records else repr(k)
                      for k in keys)
    return f"{len(report.failed)} key(s) failed: {shown}{more}"


def failed_where(report: RunReport, root: str) -> str:
    """Where the failure records are: the folder under the root, or the prefix's URL."""
    if isinstance(report.root, Path):
        return f"{root}/.spotfan/tasks/{report.task}/failed/"
    bucket: BucketRoot = report.root  # type: ignore[assignment]  # run_on_bucket's report
    return f"{bucket.where(bucket.layout(report.task).failed)}/"


def _records(report: RunReport, keys: list[str]) -> dict[str, Failure]:
    if isinstance(report.root, Path):
        layout = Layout(report.root, report.task)
        return FailureStore(layout.failed, layout.tmp).load(keys)
    from tasks.store.records import BucketFailures  # an object-store root: the SDKs are loaded

    bucket: BucketRoot = report.root  # type: ignore[assignment]  # run_on_bucket's report
    try:
        return BucketFailures(bucket, bucket.layout(report.task)).load(keys)
    finally:
        bucket.close()
