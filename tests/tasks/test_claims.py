"""Claims: exclusive among live workers, taken over when stale, by one taker only."""
from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from tasks.claims import ClaimPlan, Claims, generation_path, live_claims
from tasks.layout import key_id

UNITS = [key_id(f"key {i}") for i in range(300)]


def _grab(claims_dir: str, barrier, queue) -> None:  # runs in a child process
    claims = Claims(Path(claims_dir), lease_s=60, pipelined=False)
    barrier.wait()
    won, _ = claims.acquire(UNITS)
    queue.put(won)


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
    assert sorted(all_won) == sorted(UNITS), "every unit won exactly once"


def _take_over(claims_dir: str, barrier, queue) -> None:
    claims = Claims(Path(claims_dir), lease_s=5, pipelined=False)
    barrier.wait()
    won, busy = claims.acquire(UNITS[:1])
    queue.put(len(won))


def test_stale_claim_is_taken_over_by_one_taker_only(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    for round_ in range(20):
        d = tmp_path / f"r{round_}"
        d.mkdir()
        stale = generation_path(d, UNITS[0], 0)
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
        assert generation_path(d, UNITS[0], 1).exists()


def test_live_claim_is_respected_and_release_frees_it(tmp_path: Path) -> None:
    a = Claims(tmp_path, lease_s=60, pipelined=False)
    b = Claims(tmp_path, lease_s=60, pipelined=True)
    won, _ = a.acquire(UNITS[:10])
    assert len(won) == 10
    won_b, busy_b = b.acquire(UNITS[:20])
    assert busy_b == UNITS[:10] and won_b == UNITS[10:20]
    assert len(live_claims(tmp_path, lease_s=60)) == 20
    a.release(UNITS[:10])
    won_b2, busy_b2 = b.acquire(UNITS[:10])
    assert won_b2 == UNITS[:10] and not busy_b2


def test_a_zombie_does_not_free_a_unit_someone_took_over(tmp_path: Path) -> None:
    zombie = Claims(tmp_path, lease_s=5, pipelined=False)
    zombie.acquire(UNITS[:1])
    path = generation_path(tmp_path, UNITS[0], 0)
    os.utime(path, (time.time() - 60, time.time() - 60))
    zombie._held[UNITS[0]].touched -= 60  # it was stopped for a minute: no heartbeat
    taker = Claims(tmp_path, lease_s=5, pipelined=False)
    won, _ = taker.acquire(UNITS[:1])
    assert won and generation_path(tmp_path, UNITS[0], 1).exists()
    zombie.release(UNITS[:1])  # wakes up and finishes
    assert path.exists(), "the zombie must not remove generation 0 while generation 1 lives"
    newcomer = Claims(tmp_path, lease_s=5, pipelined=False)
    won_n, busy_n = newcomer.acquire(UNITS[:1])
    assert not won_n and busy_n


def test_plan_groups_many_keys_and_is_the_same_for_every_runner(tmp_path: Path) -> None:
    small = ClaimPlan.for_total(100)
    assert small.unit("a") == key_id("a")  # few keys: one claim per key
    first = ClaimPlan.load_or_create(tmp_path, 100_000)
    assert first.prefix == 3 and len(first.unit("a")) == 3
    # a later runner that sees a different key count still uses the stored plan
    assert ClaimPlan.load_or_create(tmp_path, 10) == first
    units = {first.unit(f"k{i}") for i in range(100_000)}
    assert len(units) == 4096


def test_claim_of_a_dead_process_on_this_host_is_taken_back_at_once(tmp_path: Path) -> None:
    """A VM restarted after a preemption need not wait out the lease for its own claims."""
    import signal
    import subprocess
    import sys
    code = ("import sys, time; from pathlib import Path; from tasks.claims import Claims; "
            f"c = Claims(Path({str(tmp_path)!r}), lease_s=600, pipelined=False); "
            f"print(c.acquire({UNITS[:3]!r})[0], flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == repr(UNITS[:3])
        live = Claims(tmp_path, lease_s=600, pipelined=False)
        assert live.acquire(UNITS[:3]) == ([], UNITS[:3]), "a live holder keeps its claims"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taker = Claims(tmp_path, lease_s=600, pipelined=False)
    won, busy = taker.acquire(UNITS[:3])
    assert won == UNITS[:3] and not busy
    assert all(generation_path(tmp_path, u, 1).exists() for u in UNITS[:3])
