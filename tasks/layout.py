"""Where the engine's bookkeeping lives: one hidden directory, `.spotfan/`, under the run root.

    ROOT/.spotfan/
        owners/<owner>.json          one per live `run` process; its mtime is the heartbeat
        tmp/<owner>/                 temporaries being published by that process's workers
        tasks/<task>/plan.json       claim units and the lease, fixed by the first runner
        tasks/<task>/claims/<unit>[.n]  a claim on one unit of keys (exclusive create)
        tasks/<task>/done/<unit>     a unit some runner finished (every key settled)
        tasks/<task>/failed/<id>.json  the last failure of a key: attempts, error, traceback
        tasks/<task>/log/<owner>.jsonl  one line per execution, for audits and reports
        metrics/<host>.jsonl         one MetricSample per line, if hosts record them (on a
                                     cluster each VM's agent does); `tasks report` draws them

Nothing else outside the outputs themselves is ever written; deleting `.spotfan/` loses
only bookkeeping (claims, failure history, logs), never an output.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

BOOKKEEPING_DIR = ".spotfan"
METRICS_DIR = f"{BOOKKEEPING_DIR}/metrics"  # relative to the run root: <host>.jsonl per host


def is_object_url(text: str) -> bool:
    """Whether a root names an object store (has a `scheme://`), right or wrong: checked by
    tasks.store.url.parse_root, which only a run on such a root imports."""
    return "://" in text


def key_id(key: str) -> str:
    """A file-name-safe, fixed-length id for a key (keys may hold any character)."""
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_owner_id() -> str:
    """A unique name for one `run` process: host, pid and a random suffix."""
    host = socket.gethostname().replace("/", "_")[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Layout:
    """Paths of the bookkeeping of one task under one root."""

    root: Path  # the run root; outputs are relative to it
    task: str  # the task's name, used as a folder name

    @property
    def base(self) -> Path:
        return self.root / BOOKKEEPING_DIR

    @property
    def owners(self) -> Path:
        return self.base / "owners"

    @property
    def tmp(self) -> Path:
        return self.base / "tmp"

    @property
    def task_dir(self) -> Path:
        return self.base / "tasks" / self.task

    @property
    def claims(self) -> Path:
        return self.task_dir / "claims"

    @property
    def done(self) -> Path:
        return self.task_dir / "done"

    @property
    def plan(self) -> Path:
        return self.task_dir / "plan.json"

    @property
    def failed(self) -> Path:
        return self.task_dir / "failed"

    @property
    def log(self) -> Path:
        return self.task_dir / "log"

    def owner_file(self, owner: str) -> Path:
        return self.owners / f"{owner}.json"

    def owner_tmp(self, owner: str) -> Path:
        return self.tmp / owner

    def ensure(self) -> None:
        for d in (self.owners, self.tmp, self.claims, self.done, self.failed, self.log):
            d.mkdir(parents=True, exist_ok=True)
