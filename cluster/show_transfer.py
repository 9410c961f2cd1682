"""How `fab push` and `fab pull` look: a progress bar on a terminal, a plain line every few seconds elsewhere, a summary."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cluster.show import fmt_eta, safe, say
from cluster.transfer import Progress, TransferReport

PLAIN_EVERY_S = 5.0  # a plain progress line at most this often
SHOWN_FAILED = 10  # failed and not-copied files named in the summary


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def line(p: Progress) -> str:
    rate = p.bytes_done / p.seconds if p.seconds > 0 else 0.0
    eta = (p.bytes - p.bytes_done) / rate if rate > 0 else None
    return (f"{p.files_done}/{p.files} files, {size(p.bytes_done)}/{size(p.bytes)}, "
            f"{size(rate)}/s, ETA {fmt_eta(eta)}")


@contextmanager
def progress(what: str, *, quiet: bool) -> Iterator[Callable[[Progress], None]]:
    """A callback that draws progress: a rich bar on a terminal, else plain stamped lines (none if quiet)."""
    if quiet:
        yield lambda p: None
        return
    if not sys.stdout.isatty():
        last = [0.0]

        def plain(p: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= PLAIN_EVERY_S and p.files:
                last[0] = now
                say(f"{time.strftime('%H:%M:%S')} {what}: {line(p)}")

        yield plain
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    with Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
             TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def draw(p: Progress) -> None:
            bar.update(task, total=p.bytes, completed=p.bytes_done,
                       description=f"{what} {p.files_done}/{p.files} files")

        yield draw


def summary(r: TransferReport) -> None:
    verb = "pushed" if r.direction == "push" else "pulled"
    say(f"==> {r.direction}: {verb} {r.copied} file(s) ({size(r.bytes)} in {r.seconds:.1f}s, {size(r.rate)}/s)"
        + (f", {r.resumed} continued from an interrupted copy" if r.resumed else "")
        + f"; {r.skipped} already there; {len(r.failed)} failed; {r.files} in {safe(r.source)} -> {safe(r.dest)}")
    if r.not_files:
        shown = ", ".join(safe(n) for n in r.not_files[:SHOWN_FAILED])
        say(f"    not copied (links, special files, refused names): {shown}"
            + (" ..." if len(r.not_files) > SHOWN_FAILED else ""))
    for rel, why in list(r.failed.items())[:SHOWN_FAILED]:
        say(f"    failed: {safe(rel)}: {safe(why)}")
    where = "the share's " if r.direction == "push" else ""
    for k in r.kept:
        say(f"    kept for the same command to continue from: {where}{safe(k)}"
            + (" (delete it to free its space if you will not push it again)" if r.direction == "push" else ""))
    if r.interrupted:
        say(f"==> {r.direction}: interrupted; run the same command again to copy the rest (whole files "
            "are kept, a big file continues where it stopped)")
