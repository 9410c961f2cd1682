"""Claims: exclusive among live workers, taken over when stale, by one taker only."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from tasks.claims import Claims, generation_path, live_claims
from tasks.keys import Item
from tasks.layout import key_id

ITEMS = [Item(f"key {i}", None, f"out/{i}") for i in range(300)]


def _grab(claims_dir: str, barrier, queue) -> None:  # runs in a child process
    claims = Claims(Path(claims_dir), lease_s=60, pipelined=False)
    barrier.wait()
    won, _, _ = claims.acquire(ITEMS)
    queue.put([it.key for it in won])


def test_each_key_is_won_by_exactly_one_of_many_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_grab, args=(str(tmp_path), barrier, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    won = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    all_won = [k for w in won for k in w]
    assert sorted(all_won) == sorted(it.key for it in ITEMS), "every key won exactly once"


def _take_over(claims_dir: str, barrier, queue) -> None:
    claims = Claims(Path(claims_dir), lease_s=5, pipelined=False)
    barrier.wait()
    won, busy, _ = claims.acquire(ITEMS[:1])
    queue.put(len(won))


def test_stale_claim_is_taken_over_by_one_taker_only(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        d = tmp_path / f"r{round_}"
        d.mkdir()
        stale = generation_path(d, key_id(ITEMS[0].key), 0)
        stale.touch()
        os.utime(stale, (time.time() - 600, time.time() - 600))  # its owner died long ago
        barrier, queue = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_take_over, args=(str(d), barrier, queue)) for _ in range(3)]
        for p in procs:
            p.start()
        wins = [queue.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sorted(wins) == [0, 0, 1], f"round {round_}: {wins}"
        assert generation_path(d, key_id(ITEMS[0].key), 1).exists()


def test_live_claim_is_respected_and_release_frees_it(tmp_path: Path) -> None:
    a = Claims(tmp_path, lease_s=60, pipelined=False)
    b = Claims(tmp_path, lease_s=60, pipelined=True)
    won, _, _ = a.acquire(ITEMS[:10])
    assert len(won) == 10
    won_b, busy_b, _ = b.acquire(ITEMS[:20])
    assert [it.key for it in busy_b] == [it.key for it in ITEMS[:10]] and len(won_b) == 10
    assert len(live_claims(tmp_path, lease_s=60)) == 20
    a.release([it.key for it in ITEMS[:10]])
    won_b2, busy_b2, _ = b.acquire(ITEMS[:10])
    assert len(won_b2) == 10 and not busy_b2


def test_published_key_is_released_at_once(tmp_path: Path) -> None:
    c = Claims(tmp_path, lease_s=60, pipelined=False)
    won, busy, published = c.acquire(ITEMS[:3], published=lambda it: it.key == "key 1")
    assert [it.key for it in published] == ["key 1"] and len(won) == 2
    assert not generation_path(tmp_path, key_id("key 1"), 0).exists()


def test_a_zombie_does_not_free_a_key_someone_took_over(tmp_path: Path) -> None:
    zombie = Claims(tmp_path, lease_s=5, pipelined=False)
    zombie.acquire(ITEMS[:1])
    path = generation_path(tmp_path, key_id(ITEMS[0].key), 0)
    os.utime(path, (time.time() - 60, time.time() - 60))
    zombie._held[ITEMS[0].key].touched -= 60  # it was stopped for a minute: no heartbeat
    taker = Claims(tmp_path, lease_s=5, pipelined=False)
    won, _, _ = taker.acquire(ITEMS[:1])
    assert won and generation_path(tmp_path, key_id(ITEMS[0].key), 1).exists()
    zombie.release([ITEMS[0].key])  # wakes up and finishes
    assert path.exists(), "the zombie must not remove generation 0 while generation 1 lives"
    newcomer = Claims(tmp_path, lease_s=5, pipelined=False)
    won_n, busy_n, _ = newcomer.acquire(ITEMS[:1])
    assert not won_n and busy_n
