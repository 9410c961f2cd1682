"""Which of a push's files goes by which engine, and the options that decide it.

Where OpenSSH's client is installed (`--engine auto`): files under 1 MB through a few pipelined
SFTP sessions (cluster.sftp_pipeline), files of 1 MB to 64 MB through several `sftp -b`
processes (cluster.sftp_batch), files of 64 MB or more in ranges over several sessions at once
(cluster.sftp_ranges); the rest, and every pull, through paramiko (cluster.transfer). Each
helper here makes its engine's plan (part names, resume offsets) without sending a byte.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from cluster import leftovers, sftp_batch, sftp_pipeline, sftp_ranges
from cluster.errors import UsageError
from cluster.share import Share
from cluster.sides import Entry, LocalSide, RemoteSide, Tree, part_name

OPENSSH_JOBS = max(4, min(8, os.cpu_count() or 2))  # sftp processes of a push (4 measured best on 2 cores)
RESUME_MIN_BYTES = leftovers.RESUME_MIN_BYTES  # a part file at least this big is continued, a smaller one restarted

Plan = tuple[Entry, PurePosixPath, PurePosixPath]  # a file to copy: its entry, source and destination paths
Engine = Literal["auto", "openssh", "paramiko"]
ENGINES: tuple[Engine, ...] = ("auto", "openssh", "paramiko")


@dataclass(frozen=True, kw_only=True)
class Options:
    jobs: int = 0  # copies at once (0: OPENSSH_JOBS sftp processes and sftp_pipeline.SESSIONS, or DEFAULT_JOBS)
    engine: Engine = "auto"  # who sends a push's bytes: OpenSSH's sftp where installed, else paramiko
    checksum: bool = False  # compare content, not size and mtime
    bwlimit: float = 0.0  # bytes per second per file at most; 0: no limit


def openssh(opts: Options) -> bool:
    """Whether a push's bytes go through OpenSSH's sftp client."""
    if opts.engine == "openssh" and not sftp_batch.available():
        raise UsageError("--engine openssh needs OpenSSH's sftp client: apt-get install openssh-client, "
                         "or --engine paramiko")
    return opts.engine != "paramiko" and sftp_batch.available()


def pipeline_for(share: Share, found: Tree | Entry | None, opts: Options) -> sftp_pipeline.Pipeline | None:
    """The pipelined SFTP sessions of a push with small files to send (cluster.sftp_pipeline),
    not started; None where OpenSSH's clients are not used (or --bwlimit, which only sftp keeps)."""
    files = found.files if isinstance(found, Tree) else [found] if found is not None else []
    small = sum(1 for e in files if e.size < sftp_pipeline.MAX_BYTES)
    if not small or opts.bwlimit or not openssh(opts) or not sftp_pipeline.available():
        return None
    n = min(opts.jobs or sftp_pipeline.SESSIONS, -(-small // sftp_pipeline.WINDOW_FILES))
    return sftp_pipeline.Pipeline(share.login(), sessions=n)


def ranges_for(share: Share, found: Tree | Entry | None, opts: Options) -> sftp_ranges.Ranges | None:
    """The sessions that write a push's very big files in ranges (cluster.sftp_ranges), not
    started; None if it has none, or where OpenSSH's clients are not used (or --bwlimit,
    which only sftp keeps)."""
    files = found.files if isinstance(found, Tree) else [found] if found is not None else []
    if not any(e.size >= sftp_ranges.RANGE_MIN_BYTES for e in files) or opts.bwlimit or not openssh(opts) \
            or not sftp_pipeline.available():
        return None
    return sftp_ranges.Ranges(share.login(), sessions=opts.jobs or sftp_ranges.SESSIONS)


def early_batches(share: Share, found: Tree | Entry, opts: Options, *, piped: bool,
                   ranged: bool) -> list[sftp_batch.Batch]:
    """The `sftp -b` processes a push will need (at most one per file neither the pipelined
    sessions nor the ranges take), not started; none where OpenSSH's client is not used."""
    files = found.files if isinstance(found, Tree) else [found]
    n = sum(1 for e in files if (not piped or e.size >= sftp_pipeline.MAX_BYTES)
            and not (ranged and e.size >= sftp_ranges.RANGE_MIN_BYTES))
    if not n or not openssh(opts):
        return []
    return [sftp_batch.Batch(share.login(), bwlimit=opts.bwlimit) for _ in range(min(n, opts.jobs or OPENSSH_JOBS))]


def piped_sends(local: LocalSide, remote: RemoteSide, plans: list[Plan], *,
                staged: bool) -> tuple[list[sftp_pipeline.Send], list[Plan]]:
    """The small files of a push, each to its part file and renamed into place (in a `staged`
    folder straight to its name); and the rest."""
    sends, rest = [], []
    for e, s, d in plans:
        if e.size >= sftp_pipeline.MAX_BYTES:
            rest.append((e, s, d))
            continue
        final = remote.path(d)
        part = final if staged else remote.path(part_name(d, e.size, e.mtime))
        sends.append(sftp_pipeline.Send(e.rel, local.path(s), part, final, e.size, e.mtime, e.mode))
    return sends, rest


def ranged(local: LocalSide, remote: RemoteSide, plans: list[Plan]) -> tuple[list[sftp_ranges.Big], list[Plan]]:
    """The very big files of a push, each in ranges to its part file and renamed into place; and the rest."""
    bigs, rest = [], []
    for e, s, d in plans:
        if e.size >= sftp_ranges.RANGE_MIN_BYTES:
            bigs.append(sftp_ranges.Big(e.rel, local.path(s), remote.path(d), e.size, e.mtime, e.mode))
        else:
            rest.append((e, s, d))
    return bigs, rest


def batched(local: LocalSide, remote: RemoteSide, plans: list[Plan], opts: Options, *,
            staged: bool) -> tuple[list[sftp_batch.Put], list[Plan]]:
    """The files of a push that OpenSSH's sftp client copies, each with its part file and resume
    decided here as for `_copy` (a small file of a `staged` folder goes straight to its name);
    and the rest."""
    if not plans or not openssh(opts):
        return [], plans
    puts, rest = [], []
    for e, s, d in plans:
        part = part_name(d, e.size, e.mtime)
        lp, rp, rf = local.path(s), remote.path(part), remote.path(d)
        if not sftp_batch.fits(str(lp), rp, rf):
            rest.append((e, s, d))  # a line break in a name: paramiko copies it
            continue
        try:
            have = remote.stat(part) if e.size >= RESUME_MIN_BYTES else None
        except OSError:
            have = None
        offset = (have.st_size or 0) if have is not None else 0
        resume = RESUME_MIN_BYTES <= offset < e.size
        direct = staged and e.size < RESUME_MIN_BYTES and lp.name == d.name
        puts.append(sftp_batch.Put(e.rel, lp, rf if direct else rp, rf, e.size - offset if resume else e.size, resume))
    return puts, rest
