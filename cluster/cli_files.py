"""The `fab` commands that move data between the laptop and the share: push and pull (see docs/fab.md);
on a headless cluster, between the laptop and the bucket (cluster.bucket_transfer)."""
from __future__ import annotations

from pathlib import Path

from invoke import task
from invoke.exceptions import Exit

from cluster import bucket_transfer, sftp_pipeline, sftp_ranges, show, show_transfer, transfer
from cluster.command import EXIT_FAILED, command, seconds, whole
from cluster.bucket_share import BucketShare
from cluster.errors import UsageError
from cluster.session import Cluster

EXIT_INTERRUPTED = 130

HELP = {
    "jobs": f"copies at once: a push's sftp processes for files of 1 MB or more (default {transfer.OPENSSH_JOBS} "
            f"here), at most this many pipelined sessions for smaller ones (default {sftp_pipeline.SESSIONS}) "
            f"and the sessions of a file of 64 MB or more, one per range (default {sftp_ranges.SESSIONS}); "
            f"else SFTP sessions (default {transfer.DEFAULT_JOBS})",
    "checksum": "compare files by content (reads both sides), not by size and mtime",
    "bwlimit": "at most this many KB/s per file (default: no limit)",
    "json": "print one JSON summary", "config": "cluster.toml to use",
}


def _options(jobs: str, checksum: bool, bwlimit: str, engine: str = "auto", *, ex: str) -> transfer.Options:
    if engine not in transfer.ENGINES:
        raise UsageError(f"--engine {engine!r} must be one of {', '.join(transfer.ENGINES)}: type e.g. "
                         f"`{ex} --engine paramiko`")
    return transfer.Options(
        jobs=whole(jobs, flag="--jobs", example=f"{ex} --jobs 8", minimum=1) if jobs else 0,
        engine=engine, checksum=checksum,  # type: ignore[arg-type]
        bwlimit=1000 * seconds(bwlimit or 0, flag="--bwlimit", example=f"{ex} --bwlimit 5000"))


def _end(report: transfer.TransferReport, *, json: bool) -> None:
    if json:
        print(report.to_json())
    show_transfer.summary(report)
    if report.interrupted:
        raise Exit(code=EXIT_INTERRUPTED)
    if report.failed and report.disk_free is not None:
        raise Exit(f"error: the head's disk is full ({show_transfer.size(report.disk_free)} free on the share's disk, "
                   f"{len(report.failed)} file(s) not copied): free space on the head (`df -h` there shows the disk; "
                   "delete what is no longer needed, or give the head a bigger disk), then run the same command "
                   "again: the files already whole are skipped" + (", the part files kept are continued"
                                                                   if report.kept else ""), code=EXIT_FAILED)
    if report.failed:
        raise Exit(f"error: {len(report.failed)} file(s) not copied; run the same command again to retry them",
                   code=EXIT_FAILED)


# DEST and LOCAL are --to, not positional: invoke's positional arguments are always required.
@task(positional=["local"], help={
    "local": "file or folder on this machine",
    "to": "where on the share (a path below its root; default: LOCAL's name at the root)",
    "engine": "who sends the bytes: openssh (the sftp client: C crypto), paramiko, or auto (default: openssh "
              "where installed)", **HELP})
@command
def push(c, cluster: Cluster, local, to="", jobs="", checksum=False, bwlimit="", engine="auto", json=False):
    """Copy a file or folder to the share: each file appears whole (part file, then rename); resumable."""
    opts = _options(jobs, checksum, bwlimit, engine, ex=f"fab push {local}")
    show.say(f"==> push: {local} to the share's {to or Path(local).name}")
    with show_transfer.progress("push", quiet=json) as on_progress:
        try:
            report = (bucket_transfer.push(cluster.board, Path(local), to, opts=opts, on_progress=on_progress)
                      if isinstance(cluster.board, BucketShare) else
                      transfer.push(cluster.share, Path(local), to, opts=opts, on_progress=on_progress))
        except KeyboardInterrupt:  # before the copies started (listing, comparing)
            show.say("==> push: interrupted before copying; nothing is half-written")
            raise Exit(code=EXIT_INTERRUPTED) from None
    _end(report, json=json)


@task(positional=["src"], help={
    "src": "file or folder of the share (a path below its root)",
    "to": "where on this machine (default: SRC's name in the current folder)", **HELP})
@command
def pull(c, cluster: Cluster, src, to="", jobs="", checksum=False, bwlimit="", json=False):
    """Copy a file or folder of the share here: each file appears whole; resumable; nothing deleted."""
    opts = _options(jobs, checksum, bwlimit, ex=f"fab pull {src}")
    show.say(f"==> pull: the share's {src} to {to or Path(src).name}")
    with show_transfer.progress("pull", quiet=json) as on_progress:
        try:
            board, dest = cluster.board, Path(to) if to else None
            report = (bucket_transfer.pull(board, src, dest, opts=opts, on_progress=on_progress)
                      if isinstance(board, BucketShare) else
                      transfer.pull(cluster.share, src, dest, opts=opts, on_progress=on_progress))
        except KeyboardInterrupt:
            show.say("==> pull: interrupted before copying; nothing is half-written")
            raise Exit(code=EXIT_INTERRUPTED) from None
    _end(report, json=json)
