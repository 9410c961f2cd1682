"""The demo's driver (scripts/demo.py) from a 0700 folder: it says what it does, and Ctrl-C mid-run stops it cleanly."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from cluster.procs import ProcRecord
from labs import REPO, lab_processes

DEMO = REPO / "scripts" / "demo.py"
STARTED_TIMEOUT_S = 240  # until the run has started (fab up of 2 VMs, 300 images, fab run): generous under load
STOP_TIMEOUT_S = 240  # from Ctrl-C to the driver's exit (stop the step, fab down)
GONE_TIMEOUT_S = 30


def _lines(stream, into: queue.Queue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _recorded(state: Path) -> list[ProcRecord]:
    """Every pid the lab recorded: each VM's PID 1 and the head's sshd."""
    found = []
    for path in [*state.glob("vms/*/vm.json"), state / "head" / "sshd.json"]:
        raw = json.loads(path.read_text())
        rec = raw.get("init", raw) if path.name == "vm.json" else raw
        if rec:
            found.append(ProcRecord(pid=int(rec["pid"]), started=float(rec["started"])))
    return found


def test_ctrl_c_mid_run_stops_the_demo_without_a_traceback_and_tears_down_its_lab(make_lab):
    lab = make_lab(workers=2, idle_timeout=120)
    # A clone in a 0700 folder (`mktemp -d` makes one): the jailed head user must still reach the share.
    os.chmod(lab.folder, 0o700)
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml"), "DEMO_IMAGES": "300",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, str(DEMO)], cwd=REPO, env=env, text=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: queue.Queue[str | None] = queue.Queue()
    errors: queue.Queue[str | None] = queue.Queue()
    readers = [threading.Thread(target=_lines, args=(p.stdout, lines), daemon=True),
               threading.Thread(target=_lines, args=(p.stderr, errors), daemon=True)]
    for r in readers:
        r.start()
    seen: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + STARTED_TIMEOUT_S
        while not any("started; `fab status` follows it" in s for _, s in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the demo ended before its run started:\n{''.join(s for _, s in seen)}"
            seen.append((time.monotonic() - t0, line))
        first = seen[0]
        assert first[0] < 5 and first[1].startswith("==> demo: starting"), f"silent at first: {first}"
        assert any("mount: ok (mounted)" in s for _, s in seen), "the VMs mounted the share from a 0700 folder"
        booting = [s for _, s in seen if s.startswith("==> up: booted ")]
        assert len(booting) == 2 and booting[1].startswith("==> up: booted 2/2 VMs ("), "fab up says each VM it booted"
        recorded = _recorded(lab.settings.state_dir)
        assert len(recorded) == 3 and all(r.process() is not None for r in recorded), "2 VMs and the head run"
        steps = psutil.Process(p.pid).children(recursive=True)  # the step that runs now, and its children
        p.send_signal(signal.SIGINT)  # what the terminal sends on Ctrl-C
        p.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for r in readers:
        r.join(timeout=GONE_TIMEOUT_S)
    after = "".join(iter(lines.get_nowait, None))
    err = "".join(iter(errors.get_nowait, None))
    assert p.returncode == 130, (p.returncode, after, err)
    assert "Traceback" not in err + after and "KeyboardInterrupt" not in err + after, err + after
    said = after.strip().splitlines()
    assert said and said[-1].startswith("==> demo: interrupted"), after
    assert sum("interrupted" in s for s in said) == 1, after
    assert "tore down what it started (down: deleted 2 VMs" in said[-1] and "none left" in said[-1], said[-1]
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline and (any(r.process() for r in recorded) or any(s.is_running() for s in steps)):
        time.sleep(0.2)
    assert [r.pid for r in recorded if r.process() is not None] == [], "a lab VM or the head is still running"
    assert [s.pid for s in steps if s.is_running() and s.status() != psutil.STATUS_ZOMBIE] == [], "a step outlived it"
    assert lab.statuses() == {} and lab_processes(lab.folder) == []
