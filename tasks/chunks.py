"""How many keys go to a worker at once: chunks sized from the measured time per key."""
from __future__ import annotations

import math

TARGET_CHUNK_S = 0.5  # aim for chunks that take about this long on one worker
MAX_CHUNK = 1000  # never more keys than this in one chunk
BALANCE_CHUNKS_PER_WORKER = 4  # keep at least this many chunks per worker of what is left
EMA_ALPHA = 0.3  # weight of the newest chunk in the per-task time estimate


class ChunkSizer:
    """Chunk size from the measured time per task: big for tiny tasks, 1 for slow ones."""

    def __init__(self, workers: int, fixed: int | None) -> None:
        self.workers = workers
        self.fixed = fixed
        self.per_task: float | None = None

    def observe(self, seconds: list[float]) -> None:
        if not seconds:
            return
        mean = sum(seconds) / len(seconds)
        self.per_task = mean if self.per_task is None else (
            EMA_ALPHA * mean + (1 - EMA_ALPHA) * self.per_task)

    def size(self, remaining: int) -> int:
        if self.fixed:
            return self.fixed
        if self.per_task is None:
            return 1  # probe: measure before committing many keys to one worker
        ideal = TARGET_CHUNK_S / max(self.per_task, 1e-6)
        balance = math.ceil(remaining / (self.workers * BALANCE_CHUNKS_PER_WORKER))
        return max(1, min(int(ideal), balance, MAX_CHUNK))
