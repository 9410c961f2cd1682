"""What a `--cmd` command prints: read as it comes, bounded, and kept per key when asked.

A command may print gigabytes; only the end of each stream is held (in memory, then on
disk), so neither the worker nor the root fills up. With `tasks run --keep-output` each
key's stdout and stderr are written, whole or as their last KEEP_BYTES, to
`.spotfan/tasks/<task>/output/<key id>.stdout|.stderr` (after every attempt, so a failed
key shows its last one); `python -m tasks logs SPEC KEY` prints them.
"""
from __future__ import annotations

import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.deathsig import die_with_parent
from tasks.fs import atomic_write
from tasks.layout import Layout, key_id

KEEP_BYTES = 1 << 20  # per stream and key: the last this many bytes are kept
ERR_TAIL_BYTES = 64 * 1024  # without --keep-output: stderr's end, for the failure record
READ_BLOCK = 64 * 1024
TRUNCATED = b"[... earlier output dropped: only the last %d bytes are kept]\n"


@dataclass(frozen=True)
class Finished:
    """How a command ended, with the ends of what it printed."""

    returncode: int
    stdout: bytes  # empty unless kept
    stderr: bytes


class _Tail:
    """The last `limit` bytes of a stream, read in a thread."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = False
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        with stream:
            while block := stream.read(READ_BLOCK):
                self.data += block
                if len(self.data) > self.limit:
                    del self.data[: len(self.data) - self.limit]
                    self.dropped = True

    def value(self) -> bytes:
        self.thread.join()
        return (TRUNCATED % self.limit if self.dropped else b"") + bytes(self.data)


def run_command(line: str, *, root: Path, keep: bool) -> Finished:
    """Run `line` with /bin/sh in `root`; stdout is read only when `keep`."""
    proc = subprocess.Popen(["/bin/sh", "-c", line], cwd=root, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if keep else subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            preexec_fn=die_with_parent)  # no command outlives its worker
    assert proc.stderr is not None
    out = _Tail(proc.stdout, KEEP_BYTES) if keep and proc.stdout is not None else None
    err = _Tail(proc.stderr, KEEP_BYTES if keep else ERR_TAIL_BYTES)
    rc = proc.wait()
    return Finished(rc, out.value() if out is not None else b"", err.value())


def output_paths(root: Path, task: str, key: str) -> tuple[Path, Path]:
    base = Layout(root, task).task_dir / "output" / key_id(key)
    return base.with_suffix(".stdout"), base.with_suffix(".stderr")


def keep_output(root: Path, task: str, key: str, done: Finished) -> None:
    """Write a key's kept output (its last attempt's) whole, beside the task's bookkeeping."""
    out, err = output_paths(root, task, key)
    atomic_write(out, done.stdout, make_parents=True)
    atomic_write(err, done.stderr, make_parents=True)
