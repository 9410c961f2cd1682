"""A recorded process is recognised by its pid, its start tick since boot and the boot (tasks.procs),
so that a wall-clock step never makes a live process look gone, nor a reused pid look alive."""
from __future__ import annotations

import subprocess
import sys

import psutil

from tasks import procs
from tasks.records import Stamp


def _child() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_live_process_is_found_and_a_dead_one_is_not() -> None:
    p = _child()
    try:
        started = procs.start_time(p.pid)
        assert 0 < started < procs.EPOCH_FLOOR, "a start since boot, not an epoch"
        assert procs.find_process(p.pid, started, procs.boot_id()) is not None
        assert procs.find_process(p.pid, started + 0.5, procs.boot_id()) is None, "another process's start"
    finally:
        p.kill()
        p.wait()
    assert procs.find_process(p.pid, started, procs.boot_id()) is None


def test_a_clock_step_does_not_make_a_live_process_look_gone(monkeypatch) -> None:
    """Linux derives /proc/stat's btime, and so psutil's create_time, from the wall clock: after
    a step of 11 s every create_time moves by 11 s. The start tick does not."""
    p = _child()
    try:
        started = procs.start_time(p.pid)
        real = psutil.boot_time()
        monkeypatch.setattr(psutil, "boot_time", lambda: real + 11.0)
        assert procs.find_process(p.pid, started, procs.boot_id()) is not None
    finally:
        p.kill()
        p.wait()


def test_a_record_of_another_boot_is_gone_and_an_old_epoch_record_still_works() -> None:
    p = _child()
    try:
        started = procs.start_time(p.pid)
        assert procs.find_process(p.pid, started, "another-boot") is None, "pids and ticks repeat after a reboot"
        assert procs.find_process(p.pid, started, "") is not None, "a record that names no boot"
        epoch = psutil.Process(p.pid).create_time()  # what spotfan recorded before start ticks
        assert procs.find_process(p.pid, epoch) is not None
        assert procs.find_process(p.pid, epoch - 5) is None
    finally:
        p.kill()
        p.wait()


def test_a_stamp_names_its_boot_and_is_judged_by_it() -> None:
    me = Stamp.mine()
    assert me.boot == procs.boot_id() and me.boot
    back = Stamp.from_json(me.to_json())
    assert back == me and not back.gone()
    assert Stamp(me.host, me.pid, me.started, "another-boot").gone()
    assert Stamp.from_json('{"host": "h", "pid": 1, "started": 2.0}') == Stamp("h", 1, 2.0, ""), \
        "a stamp written before boots were recorded still reads"
