"""Failure records and the per-execution log, both plain files under `.spotfan/tasks/<task>/`.

A failure record (`failed/<id>.json`) holds a key's latest error, its traceback or
stderr, and how many attempts failed; `gave_up` marks a key that reached
--max-attempts. The execution log (`log/<owner>.jsonl`) has one line per execution,
so anyone can count how many keys ran twice, and reports can plot progress over time.
"""
from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from tasks.layout import key_id


@dataclass(frozen=True)
class Failure:
    """The latest failure of one key."""

    key: str  # the key that failed
    attempts: int  # failed attempts so far, across every run and machine
    gave_up: bool  # reached --max-attempts: reported as failed, skipped until retried
    error: str  # one line: exception type and message, or exit status
    detail: str  # traceback, or the command's stderr tail
    host: str  # machine of the last attempt
    owner: str  # `run` process of the last attempt
    time: float  # seconds since the epoch


class FailureStore:
    """Read and write failure records; each write is a temp file renamed into place."""

    def __init__(self, failed_dir: Path, tmp_dir: Path) -> None:
        self.dir = failed_dir
        self.tmp_dir = tmp_dir

    def load(self, keys: Iterable[str] | None = None) -> dict[str, Failure]:
        """Failure records by key: all of them, or only those of `keys` (one listing, then
        one read per record that exists)."""
        found: dict[str, Failure] = {}
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return found
        wanted = None if keys is None else {f"{key_id(k)}.json" for k in keys}
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            if wanted is not None and name not in wanted:
                continue
            try:
                data = json.loads((self.dir / name).read_text(encoding="utf-8"))
                found[data["key"]] = Failure(**data)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # vanished or unreadable: treat as no record
        return found

    def record(self, failure: Failure) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"failure-{key_id(failure.key)}.json"
        tmp.write_text(json.dumps(asdict(failure)), encoding="utf-8")
        os.rename(tmp, self.dir / f"{key_id(failure.key)}.json")

    def clear(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                (self.dir / f"{key_id(key)}.json").unlink()
            except FileNotFoundError:
                pass


class ExecLog:
    """This process's execution log: opened once, appended per chunk."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self.host = socket.gethostname()
        self._f: IO[str] | None = None

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        if self._f is None:
            # one writer per file: "x" so two owners can never share one log
            self._f = open(self.path, "x", encoding="utf-8")
        lines = [json.dumps({**row, "owner": self.owner, "host": self.host}) for row in rows]
        if lines:
            self._f.write("\n".join(lines) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_jsonl(folder: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, row) for every line of every `*.jsonl` file in a folder, in name order.
    A torn line (its writer was killed mid-line) or one that is not an object is skipped."""
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".jsonl"):
            continue
        try:
            text = (folder / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield name, row


def read_logs(log_dir: Path) -> Iterator[dict[str, Any]]:
    """Every execution row of every owner."""
    return (row for _, row in read_jsonl(log_dir))


def now() -> float:
    return time.time()
