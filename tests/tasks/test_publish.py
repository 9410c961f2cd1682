"""Publishing outputs: the first outputs into a folder that does not exist yet."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tasks.publish import Fence, Publisher

ROUNDS = 30
THREADS = 8


@pytest.mark.parametrize("method", ["renameat2", "link", "rename"])
def test_workers_publishing_into_a_missing_folder_at_once_all_succeed(tmp_path: Path,
                                                                     method: str) -> None:
    """Every worker finds the folder missing, one makes it: the others' ENOENT was the
    folder's absence, not a fault of their key."""
    publisher = Publisher(tmp_path, method=method, share_tmp=None, fsync=False)  # type: ignore[arg-type]
    publisher.open()
    fence = Fence(str(tmp_path / "claims"), "0000", 0)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for r in range(ROUNDS):
        barrier = threading.Barrier(THREADS)
        results: dict[int, object] = {}

        def one(i: int) -> None:
            src = tmp / f"{r}-{i}"
            src.write_text(f"{r}-{i}")
            barrier.wait()
            try:
                results[i] = publisher.publish(src, f"r{r}/deep/{i}.txt", is_dir=False, fence=fence)
            except Exception as e:  # noqa: BLE001 - reported below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == {i: "ours" for i in range(THREADS)}, f"round {r}: {results}"
        assert sorted(p.name for p in (tmp_path / f"r{r}/deep").iterdir()) == \
            sorted(f"{i}.txt" for i in range(THREADS))
    publisher.close()
