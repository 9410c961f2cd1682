"""Runs of `python -m tasks` on an object-store root, as a user starts them, and what the
test server holds afterwards (read on the server's side, not through our adaptor)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .backends import Backend

DEADLINE_S = 180  # every wait in these tests ends by then


@dataclass(frozen=True)
class BucketRun:
    """A task module in `cwd`, run on `url` (a prefix of the test bucket)."""

    backend: Backend
    cwd: Path
    prefix: str  # "runs/<test>/", the root's prefix in the bucket

    @property
    def url(self) -> str:
        return f"{self.backend.scheme}://{self.backend.bucket_name}/{self.prefix}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.backend.env}

    def write(self, source: str, name: str = "t") -> None:
        (self.cwd / f"{name}.py").write_text(textwrap.dedent(source))

    def cli(self, *args: str, timeout: float = DEADLINE_S, **kw: Any) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tasks", *args], cwd=self.cwd, env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=timeout, **kw)

    def start(self, *args: str, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        """`tasks run ARGS --root URL`, in its own process group (a whole "VM" to freeze or kill)."""
        return subprocess.Popen([*prefix, sys.executable, "-m", "tasks", "run", *args, "--root", self.url], cwd=self.cwd,
                                env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    def names(self, under: str = "") -> list[str]:
        """Object names under the root's prefix + `under`, relative to the root, sorted."""
        full = self.prefix + under
        if self.backend.scheme == "gs":
            found = self.backend.server.names(self.backend.bucket_name, full)
        else:
            from moto.core.models import DEFAULT_ACCOUNT_ID
            from moto.s3.models import s3_backends

            keys = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[self.backend.bucket_name].keys
            found = [k for k in list(keys.keys()) if k.startswith(full)]
        return sorted(n[len(self.prefix):] for n in found)

    def outputs(self, folder: str = "out/") -> dict[str, bytes]:
        """Every object under `folder`, by name relative to the root, with its bytes."""
        return {n: self.backend.body(self.prefix + n) or b"" for n in self.names(folder)}

    def executions(self, task: str) -> Counter:
        """Successful executions per key, from the run logs the runners wrote in the bucket."""
        runs: Counter = Counter()
        for name in self.names(f".spotfan/tasks/{task}/log/"):
            for line in (self.backend.body(self.prefix + name) or b"").decode().splitlines():
                row = json.loads(line)
                if row["ok"]:
                    runs[row["key"]] += 1
        return runs

    def seed(self, rel: str, data: bytes) -> None:
        self.backend.seed(self.prefix + rel, data)


def finish(p: subprocess.Popen) -> tuple[int, dict, str]:
    out, err = p.communicate(timeout=DEADLINE_S)
    lines = out.strip().splitlines()
    return p.returncode, (json.loads(lines[-1]) if lines else {}), err

