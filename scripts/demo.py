"""The demo's driver, run by scripts/demo.sh once set up: the lab flow step by step, said as it goes; Ctrl-C stops it cleanly.

Each step is a `fab` (or python) command run in a session of its own, so the terminal's
Ctrl-C reaches this driver only: it stops the step that is running (SIGTERM to its process
group, SIGKILL after CHILD_STOP_S), tears the lab down with `fab down` (which kills the lab's
VMs and head by their recorded pids), prints one line and exits 130. The config is
$SPOTFAN_CONFIG (default: the repository's cluster.toml); DEMO_IMAGES images (default 6000).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXIT_INTERRUPTED = 130
CHILD_STOP_S = 20  # a step told to stop gets this long before SIGKILL
DOWN_TIMEOUT_S = 300  # `fab down` of the demo's lab
START_TIMEOUT_S = 300  # the run gets this long to get a tenth of the way in
PREEMPT_AT = 10  # preempt once 1/PREEMPT_AT of the keys are done: early, so the healed VM has work left
POLL_S = 1.0  # `fab status --json` while waiting for that
SAY_EVERY_S = 5.0  # a progress line at most this often while waiting
WATCH_TIMEOUT_S = 600
STEP_TIMEOUT_S = 900  # any one step
SPEC = "examples.images:features"


class Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    """Ctrl-C (SIGINT) or SIGTERM reached the driver."""


def say(text: str) -> None:
    print(text, flush=True)


class Demo:
    """The demo's steps; `child` is the step running now, the one a Ctrl-C stops."""

    def __init__(self, *, config: Path, images: int) -> None:
        self.config, self.images = config, images
        self.env = {**os.environ, "SPOTFAN_CONFIG": str(config)}
        self.fab_bin = str(Path(sys.executable).parent / "fab")
        self.child: subprocess.Popen[str] | None = None
        self.started_lab = False

    def run(self, argv: list[str], *, capture: bool = False,
            timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """One step in its own session (so the terminal's Ctrl-C does not reach it); raises on a non-zero exit."""
        self.child = subprocess.Popen(argv, cwd=REPO, env=self.env, text=True, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE if capture else None, start_new_session=True)
        try:
            out, _ = self.child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop_child()
            raise SystemExit(f"error: `{' '.join(argv)}` took more than {timeout:g}s; stopped it") from None
        rc, self.child = self.child.returncode, None  # on Ctrl-C it stays: stop_child stops it
        if rc != 0:
            raise SystemExit(f"error: `{' '.join(argv)}` exited {rc}; `fab logs VM` shows what each VM printed")
        return subprocess.CompletedProcess(argv, rc, out or "", "")

    def fab(self, *args: str, capture: bool = False, timeout: float = STEP_TIMEOUT_S) -> str:
        return self.run([self.fab_bin, *args], capture=capture, timeout=timeout).stdout

    def stop_child(self) -> str:
        """Stop the running step and its process group, by pid; what it was ("" if none)."""
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return ""
        from cluster.procs import stop_group
        stop_group(child, wait_s=CHILD_STOP_S)
        return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(child.args))

    def steps(self) -> None:
        from cluster.config import load  # after the first line: importing the package takes a moment

        say(f"==> demo: reading {self.config}")
        share = load(self.config).head.share
        if (share / "features").exists() or (share / ".spotfan").exists():
            # Without this a second demo finds every key done and skips the lot.
            say(f"==> demo: removing an earlier demo's outputs and bookkeeping from {share}")
            self.run(["rm", "-rf", "--", str(share / "features"), str(share / ".spotfan")])
        say("==> demo: bringing up the lab cluster: keys, the jailed head, then each VM boots and mounts the share")
        self.started_lab = True
        self.fab("up")
        say(f"==> demo: generating {self.images} images on the head's share ({share / 'images'})")
        self.run([sys.executable, "-m", "examples.images", "prepare", "--root", str(share), "--n", str(self.images)])
        say(f"==> demo: fab run {SPEC} (shipping examples/ to the share; 2 worker processes per VM)")
        self.fab("run", SPEC, "--ship", "examples", "--workers-per-vm", "2", "--lease", "30")
        self.wait_for_a_tenth()
        self.fab("preempt", "--count", "1")
        self.fab("status")
        say("==> demo: fab heal: start the preempted VM again; its boot script remounts and resumes")
        self.fab("heal")
        say("==> demo: following the run to the end: fab status --watch")
        self.fab("status", "--watch", "--interval", "5", "--timeout", str(WATCH_TIMEOUT_S))
        if (result := self.last_run()["result"]) != "done":
            raise SystemExit(f"error: the run ended {result!r}; `fab failures` shows why, "
                             "`fab logs VM` what each VM printed")
        self.fab("status")
        say("==> demo: results: every feature vector in one table, fetched to the laptop")
        table = REPO / ".demo" / "features.parquet"
        table.parent.mkdir(exist_ok=True)
        self.fab("collect", "--to", str(table))
        import pandas as pd

        df = pd.read_parquet(table)
        say(f"{len(df)} images x {df.shape[1] - 1} features; first rows:")
        say(df.iloc[:5, :6].to_string(index=False))
        say("==> demo: the run as a picture: tasks over time per VM, CPU per VM")
        self.fab("report", "--to", str(REPO / ".demo" / "reports"))

    def last_run(self) -> dict[str, object]:
        import json

        runs = json.loads(self.fab("status", "--json", capture=True))["runs"]
        return runs[-1] if runs else {}

    def wait_for_a_tenth(self) -> None:
        """Until a tenth of the keys are done (bounded), saying how far it got; then it is time to preempt.

        Early on purpose: each look is a `fab status` (seconds on a busy lab), and on a quick
        machine the run is over in seconds; preempting later leaves the healed VM nothing to do.
        """
        deadline = time.monotonic() + START_TIMEOUT_S
        said = 0.0
        while time.monotonic() < deadline:
            run = self.last_run()
            done, total = int(run.get("done") or 0), int(run.get("total") or 0)
            if total and done >= max(1, total // PREEMPT_AT):
                say(f"==> demo: {done}/{total} done: time for a preemption")
                return
            if time.monotonic() - said >= SAY_EVERY_S:
                said = time.monotonic()
                say(f"==> demo: waiting for a tenth of the keys to be done: {done}/{total or '?'}")
            time.sleep(POLL_S)
        raise SystemExit(f"error: the run did not get a tenth of the way in {START_TIMEOUT_S}s; see `fab logs all`")

    def down(self) -> str:
        """`fab down`; its last line, or raises with what it printed."""
        r = subprocess.run([self.fab_bin, "down"], cwd=REPO, env=self.env, text=True, capture_output=True,
                           stdin=subprocess.DEVNULL, timeout=DOWN_TIMEOUT_S, start_new_session=True)
        lines = (r.stdout.strip() or r.stderr.strip()).splitlines()
        if r.returncode != 0:
            raise SystemExit(f"error: `fab down` exited {r.returncode}: {r.stdout}{r.stderr}"
                             "run `fab down` again: lab VMs may be left")
        return lines[-1] if lines else ""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _still_tearing_down(signum: int, frame: object) -> None:
    say("==> demo: still tearing down; it ends by itself in a moment")


def main() -> int:
    say("==> demo: starting: the lab flow on this machine, step by step (Ctrl-C stops it and tears it down)")
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    config = Path(os.environ.get("SPOTFAN_CONFIG") or REPO / "cluster.toml").resolve()
    raw = os.environ.get("DEMO_IMAGES") or "6000"
    if not raw.isdigit() or int(raw) < 1:
        say(f"error: DEMO_IMAGES={raw!r} is not a number of images: give a whole number, at least 1 "
            "(e.g. DEMO_IMAGES=300 ./scripts/demo.sh)")
        return 2
    demo = Demo(config=config, images=int(raw))
    interrupted = False
    try:
        demo.steps()
    except Interrupted:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, _still_tearing_down)
        signal.signal(signal.SIGTERM, _still_tearing_down)
        stopped = demo.stop_child()
        if demo.started_lab:
            if not interrupted:
                say("==> demo: tearing the cluster down")
            last = demo.down()
            if not interrupted:
                say(last)
        else:
            last = "nothing was started yet"
    if interrupted:
        say(f"==> demo: interrupted{f' during `{stopped}`' if stopped else ''}; "
            f"tore down what it started ({last.removeprefix('==> ')})")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
