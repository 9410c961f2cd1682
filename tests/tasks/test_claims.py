"""Claims: exclusive among live workers, taken over when stale, by one taker only."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import pytest

from tasks.claims import Claims, generation_path, live_claims
from tasks.errors import EnvironmentFault
from tasks.fs import FsClock

UNITS = [f"{i:04x}" for i in range(300)]


def _claims(d: Path, lease_s: float, pipelined: bool = False) -> Claims:
    (d / "done").mkdir(exist_ok=True)
    return Claims(d, d / "done", lease_s=lease_s, clock=FsClock(), pipelined=pipelined)


def _units(won) -> list[str]:
    return [w.unit for w in won]


def _grab(claims_dir: str, barrier, queue) -> None:  # runs in a child process
    claims = _claims(Path(claims_dir), 60)
    barrier.wait()
    won, _ = claims.acquire(UNITS)
    queue.put(_units(won))
    # Stay alive until every taker is done: a holder that has exited (a zombie until it is
    # joined) is gone, and a peer on its host rightly takes its claims over at once.
    barrier.wait()


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
    claims = _claims(Path(claims_dir), 5)
    barrier.wait()
    won, busy = claims.acquire(UNITS[:1])
    queue.put(len(won))
    barrier.wait()  # alive until every taker has tried (see _grab)


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
    a = _claims(tmp_path, 60)
    b = _claims(tmp_path, 60, pipelined=True)
    won, _ = a.acquire(UNITS[:10])
    assert len(won) == 10
    won_b, busy_b = b.acquire(UNITS[:20])
    assert busy_b == UNITS[:10] and _units(won_b) == UNITS[10:20]
    assert len(live_claims(tmp_path, lease_s=60, clock=FsClock())) == 20
    a.release(UNITS[:10], done=True)
    assert sorted(os.listdir(tmp_path / "done")) == UNITS[:10], "finished units are marked"
    won_b2, busy_b2 = b.acquire(UNITS[:10])
    assert _units(won_b2) == UNITS[:10] and not busy_b2
    assert all(w.marked_done for w in won_b2), "the winner sees the marker"


def test_a_zombie_does_not_free_a_unit_someone_took_over(tmp_path: Path) -> None:
    zombie = _claims(tmp_path, 5)
    zombie.acquire(UNITS[:1])
    path = generation_path(tmp_path, UNITS[0], 0)
    os.utime(path, (time.time() - 60, time.time() - 60))
    zombie._held[UNITS[0]].touched -= 60  # it was stopped for a minute: no heartbeat
    taker = _claims(tmp_path, 5)
    won, _ = taker.acquire(UNITS[:1])
    assert won and won[0].generation == 1 and generation_path(tmp_path, UNITS[0], 1).exists()
    assert not zombie.held(UNITS[0]), "the zombie knows its claim may be gone"
    assert zombie.take_lost() == UNITS[:1]
    zombie.release(UNITS[:1], done=False)  # wakes up and finishes
    assert path.exists(), "the zombie must not remove generation 0 while generation 1 lives"
    newcomer = _claims(tmp_path, 5)
    won_n, busy_n = newcomer.acquire(UNITS[:1])
    assert not won_n and busy_n


def test_claim_of_a_dead_process_on_this_host_is_taken_back_at_once(tmp_path: Path) -> None:
    """A VM restarted after a preemption need not wait out the lease for its own claims."""
    import signal
    import subprocess
    import sys
    (tmp_path / "done").mkdir()
    code = ("import sys, time; from pathlib import Path; from tasks.claims import Claims; "
            "from tasks.fs import FsClock; "
            f"c = Claims(Path({str(tmp_path)!r}), Path({str(tmp_path / 'done')!r}), lease_s=600, "
            "clock=FsClock(), pipelined=False); "
            f"print([w.unit for w in c.acquire({UNITS[:3]!r})[0]], flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == repr(UNITS[:3])
        live = _claims(tmp_path, 600)
        assert live.acquire(UNITS[:3]) == ([], UNITS[:3]), "a live holder keeps its claims"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taker = _claims(tmp_path, 600)
    won, busy = taker.acquire(UNITS[:3])
    assert _units(won) == UNITS[:3] and not busy
    assert all(generation_path(tmp_path, u, 1).exists() for u in UNITS[:3])


def test_a_runner_that_meets_a_held_unit_jumps_to_the_middle_of_the_longest_free_stretch() -> None:
    import random

    from tasks.units import UnitRing

    ring = UnitRing([f"{i:04x}" for i in range(20)], random.Random(7))
    ring.pos = 2
    held = {"0002", "000a"}  # two peers work at units 2 and 10
    picked, skipped = ring.take(3, held)
    assert skipped == ["0002"], "the held unit is left for the end"
    assert picked == ["0010", "0011", "0012"], "the longest free stretch is 11..1; its middle 16"
    ring.jump({"0003", "0013"})
    assert ring.pos == 10  # the stretch after 3 is 4..15 (16-18 are taken): its middle


def test_a_claim_the_full_disk_cannot_hold_is_not_left_behind(tmp_path: Path) -> None:
    """On a full disk the exclusive create succeeds (an inode) and the write of the claim's
    body fails: the empty file must go, or every runner takes it for a live peer's claim."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], check=True)
    try:
        claims = _claims(disk, 60)
        fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # every block, nothing left for a body
            while os.write(fd, b"\0" * 4096):
                pass
        os.close(fd)
        with pytest.raises(EnvironmentFault, match="no space left"):
            claims.acquire(["0001"])
        assert not (disk / "0001").exists()
        (disk / "ballast").unlink()
        won, busy = claims.acquire(["0001"])
        assert _units(won) == ["0001"] and busy == []
        claims.release_all()
        claims.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_chunks_shrink_with_the_fleets_free_keys_not_this_runners_share() -> None:
    """Guided chunk sizes: ~0.5 s of work while much is left, then a share of what nobody
    holds over every worker of the root, so the last chunks are short on every VM."""
    from tasks.chunks import ChunkSizer

    sizer = ChunkSizer(workers=2, fixed=None)
    assert sizer.size(0, 2000, 8) == 1  # no time measured yet: one key, to measure
    sizer.observe([0.05])
    assert sizer.size(0, 2000, 8) == 10  # 0.5 s of 50 ms keys
    assert sizer.size(0, 160, 2) == 10  # alone: its own 2 workers share what is left
    assert sizer.size(0, 160, 8) == 5  # 160 keys over 8 workers x 4 chunks each
    assert sizer.size(0, 10, 8) == 2  # never under 0.1 s of work
    assert sizer.size(40, 0, 8) == 5  # keys it holds are only its own workers' to share
    assert sizer.size(0, 20, 1) == 3  # a small run alone: as before, never above its own share
    assert ChunkSizer(workers=2, fixed=7).size(0, 10, 8) == 7  # --chunk-size wins


def test_the_unit_view_counts_the_roots_runners(tmp_path: Path) -> None:
    from tasks.claims import Folder
    from tasks.units import UnitView

    owners = tmp_path / "owners"
    owners.mkdir()
    for name in ("a.json", "b.json", "c.json.tmp"):
        (owners / name).write_text("{}")
    (tmp_path / "claims").mkdir()
    (tmp_path / "done").mkdir()
    view = UnitView(Folder(tmp_path / "done"), Folder(tmp_path / "claims"), set(), owners=owners)
    assert view.owners == 1  # before its first look: itself
    view.refresh(force=True)
    assert view.owners == 2
