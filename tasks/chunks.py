"""How many keys go to a worker at once: chunks sized from the measured time per key."""
from __future__ import annotations

import math

TARGET_CHUNK_S = 0.5  # aim for chunks that take about this long on one worker
MAX_CHUNK = 1000  # never more keys than this in one chunk
BALANCE_CHUNKS_PER_WORKER = 4  # keep at least this many chunks per worker of what is left
MIN_FLEET_CHUNK_S = 0.1  # ... but a share of the fleet's work no shorter than this: smaller
#                          chunks claim units more often, and meet a peer's just finished ones
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

    def size(self, mine: int, free: int, fleet_workers: int) -> int:
        """Keys for the next chunk, with `mine` keys claimed and waiting here and `free` keys
        nobody holds, which this runner's `workers` share with `fleet_workers` in all.

        Guided self-scheduling: chunks shrink as the work left shrinks, so the last ones are
        short on every worker of the fleet; a chunk sized by this runner's share of the free
        keys alone would leave its workers running whole chunks while a peer's sit idle."""
        if self.fixed:
            return self.fixed
        if self.per_task is None:
            return 1  # probe: measure before committing many keys to one worker
        ideal = TARGET_CHUNK_S / max(self.per_task, 1e-6)
        fleet = max(self.workers, fleet_workers)
        own = math.ceil((mine + free) / (self.workers * BALANCE_CHUNKS_PER_WORKER))  # alone
        floor = math.ceil(MIN_FLEET_CHUNK_S / max(self.per_task, 1e-6))
        share = max(math.ceil(mine / (self.workers * BALANCE_CHUNKS_PER_WORKER)),
                    math.ceil((mine + free) / (fleet * BALANCE_CHUNKS_PER_WORKER)), floor)
        balance = min(own, share)  # the fleet only ever makes chunks smaller, to the floor
        return max(1, min(int(ideal), balance, MAX_CHUNK))
