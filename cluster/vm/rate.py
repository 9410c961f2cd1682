"""Task executions per second on this VM, counted from the lines the engine appends to its logs."""
from __future__ import annotations

import time
from pathlib import Path

RATE_WINDOW_S = 30.0


class ExecutionRate:
    """Reads only what each `.spotfan/tasks/*/log/HOST-*.jsonl` grew by since the last look."""

    def __init__(self, root: Path, hostname: str) -> None:
        self.root = root
        self.hostname = hostname
        self.offsets: dict[Path, int] = {}
        self.samples: list[tuple[float, int]] = []  # (time, cumulative executions)
        self.total = 0

    def now(self) -> float | None:
        """Executions per second over the last RATE_WINDOW_S; None until two looks apart in time."""
        for path in (self.root / ".spotfan" / "tasks").glob(f"*/log/{self.hostname}-*.jsonl"):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue
            self.offsets[path] = self.offsets.get(path, 0) + len(chunk)
            self.total += chunk.count(b"\n")
        t = time.monotonic()
        self.samples.append((t, self.total))
        self.samples = [(ts, n) for ts, n in self.samples if t - ts <= RATE_WINDOW_S]
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None
