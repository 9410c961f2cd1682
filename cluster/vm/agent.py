"""The worker agent on one VM: runs the requested `tasks run` processes, reports, marks useful work.

Started by boot.sh after the idle guard (cluster/vm/watchdog.sh) and the mount. It reads
run requests that `fab run` writes under ROOT/.spotfan/cluster/runs/, keeps one
`python -m tasks run` per unfinished run going (restarting it, a bounded number of
times, if it dies while work remains), and writes this VM's heartbeat every
HEARTBEAT_INTERVAL_S: to SPOTFAN_HOME/heartbeat.json on the VM's own disk always, and to
ROOT/.spotfan/cluster/vms/NAME.json while the share is alive (so `fab status` can tell a
dead mount from a dead agent). ROOT is the mounted share or, on a headless cluster, the
bucket (s3://BUCKET/PREFIX, gs://...): cluster.vm.books keeps the records in either. It
does not stop the VM itself: it touches the guard's mark (cluster.vm.busy) while a key of
this VM runs, and the guard stops an idle VM. A
dead or missing mount is mounted again with jittered, bounded backoff (cluster.vm.mount),
and a guard that died is started again. SIGTERM (the guard powering off) ends it after
a last heartbeat. It records this VM's CPU, memory, disk and network while it runs tasks
(cluster.vm.recorder; `fab report` draws them). A GPU VM (--gpus N) checks its driver first
(cluster.vm.gpus): without one it runs nothing, says no-gpu-driver in every heartbeat and has
the guard stop it; else `tasks run` gets --gpus N --gpus-per-worker K (environment: vm.env).

The files it reads and writes on the share are cluster.records' (runs/, vms/, logs/,
metrics/), each through its typed record; on the VM's own disk, SPOTFAN_HOME/:
    heartbeat.json        the same heartbeat, written even while the share is dead
    busy                  touched while a key of this VM runs: the idle guard's clock (cluster.vm.busy)
    runs/<id>.state.json  the state file of this VM's `tasks run --state-file` for that run
    agent.log             everything it logs (the share's copy misses what happened while it was down)
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster import records
from cluster.errors import ClusterError, RecordError, StoreError
from tasks.fs import atomic_write
from cluster.procs import running
from cluster.records import HEARTBEAT_INTERVAL_S, Heartbeat, RunDone, RunRequest, VmRun
from cluster.results import counts
from cluster.vm import busy as useful_work
from cluster.vm.env import run_env
from cluster.vm.gpus import boot_check
from cluster.vm.books import books_for, last_error
from cluster.vm.rate import ExecutionRate
from cluster.vm.recorder import METRICS_INTERVAL_S, Recorder

logger = logging.getLogger("cluster.agent")

POLL_INTERVAL_S = 1.0
MOUNT_CHECK_INTERVAL_S = HEARTBEAT_INTERVAL_S  # a dead mount shows in the next heartbeat
GUARD_CHECK_INTERVAL_S = 30.0  # how often the agent makes sure the idle guard still runs
STATUS_TIMEOUT_S = 120.0
MAX_RESTARTS = 5  # per run and boot: a run that keeps dying needs a human
RESTART_BACKOFF_S = 2.0
MAX_LIFETIME_S = 7 * 24 * 3600.0  # the loop's outer bound; the idle guard ends the VM far sooner
FINAL_EXITS = dict(enumerate(records.RESULTS))  # `tasks run` exit codes that end a run: done, failed, spec-error


@dataclass
class RunState:
    """This VM's part in one run."""

    id: str
    state: str = "starting"  # running | waiting | queued | done | failed | spec-error | gave-up
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    started: float | None = None
    next_start: float = 0.0  # not before this time (backoff after a crash)
    spawned: float = 0.0  # monotonic time of the last start of its `tasks run`
    phase: str | None = None  # what its runner's state file last said (starting, working, waiting, ...)
    useful: bool = False  # a key of this VM runs for it (see cluster.vm.busy)
    error: str = ""  # the last error line of a `tasks run` that exited with work left
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def public(self) -> VmRun:
        return VmRun(state=self.state, pid=self.pid, restarts=self.restarts, exit_code=self.exit_code,
                     started=self.started, phase=self.phase, useful=self.useful, error=self.error)


@dataclass(frozen=True)
class Settings:
    name: str  # the VM's name
    root: str  # the run root: the share's mount point, or the bucket's URL (a headless cluster)
    home: Path  # SPOTFAN_HOME on the VM's own disk
    python: str
    python_path: str
    idle_timeout: float  # the guard's; here: how long a starting runner counts as busy
    workers_per_vm: int
    agent_id: str = ""  # boot.sh's name for this agent: `fab up` waits for a heartbeat carrying it
    metrics_interval: float = METRICS_INTERVAL_S  # seconds per metric sample; 0: record none
    gpus: int = 0  # GPUs this VM must have (its accelerators); 0: a CPU VM
    gpus_per_worker: int = 1  # GPUs per worker process of `tasks run`
    nvidia_smi: str = "nvidia-smi"  # the driver's tool, for the GPU check


class Agent:
    """One VM's agent; see the module docstring."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.runs: dict[str, RunState] = {}
        self.books = books_for(s.root, s.home)  # where the records are, and whether it is usable
        self.last_step = 0.0
        self.last_mount_check = 0.0
        self.last_heartbeat = 0.0
        self.seq = 0  # heartbeats written: `fab up` sees this agent is alive when it grows
        self.idle_since = time.monotonic()
        self.last_guard_check = 0.0
        self.share_log: logging.Handler | None = None
        self.reports_state: bool | None = None  # does `tasks run` take --state-file? (asked once)
        self.stop_asked = False
        self.hostname = socket.gethostname()
        self.rate = ExecutionRate(self.books.local_root, self.hostname) if self.books.local_root else None
        self.problem = ""  # why this VM cannot work (no GPU driver): then it runs nothing
        self.recorder = Recorder(python=s.python, python_path=s.python_path, home=s.home,
                                 interval=s.metrics_interval, nvidia_smi=s.nvidia_smi)

    def loop(self) -> str:
        """Work until SIGTERM (the guard powering off) or the lifetime bound; return why it ended."""
        deadline = time.monotonic() + MAX_LIFETIME_S
        if self.s.gpus:
            self._check_gpus()
        while time.monotonic() < deadline and not self.stop_asked:
            now = time.monotonic()
            if self.problem:  # say why until the guard powers the VM off
                if now - self.last_heartbeat >= HEARTBEAT_INTERVAL_S:
                    self._check_mount(now)
                    self._heartbeat("no-gpu-driver")
                time.sleep(POLL_INTERVAL_S)
                continue
            if now - self.last_mount_check >= MOUNT_CHECK_INTERVAL_S:
                self._check_mount(now)
            if self.books.ok and now - self.last_step >= self.books.step_interval:
                self.last_step = now
                self._log_to_share()
                try:
                    self._step()
                except (OSError, StoreError) as e:  # the share hiccuped: check it again before going on
                    logger.warning("share error: %s", e)
                    self.last_mount_check = 0.0
            busy = self._useful_work()
            if busy:
                self.idle_since = now
                useful_work.mark(self.s.home)
            self.recorder.keep(busy=any(r.proc is not None for r in self.runs.values()), can_start=self.books.ok,
                               to=self.books.local(records.metrics_file(self.hostname), make_parent=False))
            self.books.sync()
            if now - self.last_guard_check >= GUARD_CHECK_INTERVAL_S:
                self.last_guard_check = now
                self._keep_guarded()
            if now - self.last_heartbeat >= HEARTBEAT_INTERVAL_S:
                self._heartbeat(self._state(busy))
            time.sleep(POLL_INTERVAL_S)
        return "stopped" if self.stop_asked else "max-lifetime"

    def _check_gpus(self) -> None:
        """No driver, or fewer GPUs than asked: fail closed, never CPU-only at GPU prices."""
        self.problem = boot_check(want=self.s.gpus, nvidia_smi=self.s.nvidia_smi)
        if self.problem:
            logger.error("%s", self.problem)
            atomic_write(self.s.home / "stop-now", "no-gpu-driver\n")  # the guard stops the VM now
        else:
            logger.info("GPU check: the driver shows the %d GPU(s) asked for", self.s.gpus)

    def _state(self, busy: bool) -> str:
        if not self.books.ok:
            return "mount-dead"
        if busy:
            return "working"
        waiting = any(r.proc is not None and r.phase == "waiting" for r in self.runs.values())
        return "waiting" if waiting else "idle"

    def _useful_work(self) -> bool:
        """Whether a key of this VM runs now (cluster.vm.busy); each run's phase is noted."""
        now = time.monotonic()
        for r in self.runs.values():
            if r.proc is None:
                r.useful, r.phase = False, None
                continue
            if not self.reports_state:  # an engine without --state-file: a live runner is busy
                r.useful = True
                continue
            st = useful_work.read_state(useful_work.state_path(self.s.home, r.id))
            fresh = st is not None and st.pid == r.pid
            r.phase = st.phase if fresh and st is not None else "starting"
            r.useful = useful_work.useful(st, pid=r.pid or -1, started_ago=now - r.spawned,
                                          grace=self.s.idle_timeout)
        return any(r.useful for r in self.runs.values())

    # -- runs ---------------------------------------------------------------------------

    def _step(self) -> None:
        try:
            names = self.books.listdir(records.RUNS_DIR)
        except (OSError, StoreError) as e:
            logger.warning("cannot list %s: %s", records.RUNS_DIR, e)
            self.books.ok = False
            return
        done = {n[: -len(".done.json")] for n in names if n.endswith(".done.json")}
        for n in names:
            rid = n[: -len(".json")]
            if records.is_request(n) and records.RUN_ID.fullmatch(rid):
                r = self.runs.setdefault(rid, RunState(id=rid))
                self._drive(r, finished_elsewhere=rid in done)

    def _drive(self, r: RunState, *, finished_elsewhere: bool) -> None:
        if r.proc is not None:
            code = r.proc.poll()
            if code is None:
                return
            r.proc, r.pid, r.exit_code = None, None, code
            if code in FINAL_EXITS:
                r.state = FINAL_EXITS[code]
                logger.info("run %s: tasks run exited %d (%s)", r.id, code, r.state)
                self._mark_done(r)
                return
            r.restarts += 1
            r.next_start = time.monotonic() + RESTART_BACKOFF_S * r.restarts
            r.error = last_error(self.books.local(f"{records.log_dir(self.s.name)}/{r.id}.log"))
            logger.warning("run %s: tasks run died (exit %s) with work left; restart %d/%d%s",
                           r.id, code, r.restarts, MAX_RESTARTS, f": {r.error}" if r.error else "")
        if r.state in FINAL_EXITS.values() or r.state == "gave-up":
            return
        if finished_elsewhere:
            r.state = "done"
            return
        if r.restarts > MAX_RESTARTS:
            r.state = "gave-up"
            logger.error("run %s: gave up after %d restarts; see its log", r.id, MAX_RESTARTS)
            return
        if time.monotonic() < r.next_start:
            r.state = "waiting"
            return
        self._start(r)

    def _request(self, rid: str) -> RunRequest | None:
        """The run's request, validated; None (logged) if it cannot be read or is refused."""
        rel = records.request_file(rid)
        try:
            text = self.books.read_text(rel)
            return None if text is None else RunRequest.from_json(text, source=rel, run_id=rid)
        except RecordError as e:
            logger.error("run %s: %s", rid, e)
            r = self.runs.get(rid)
            if r is not None:
                r.state = "gave-up"  # a refused request stays refused: never run, logged once
            return None
        except (OSError, StoreError) as e:
            logger.warning("run %s: unreadable request: %s", rid, e)
            return None

    def _start(self, r: RunState) -> None:
        req = self._request(r.id)
        if req is None:
            return
        after = self.runs.get(req.after) if req.after else None
        if after is not None and after.proc is not None:
            r.state = "queued"  # it follows a run whose `tasks run` still goes on this VM
            return
        workers = req.workers_per_vm or self.s.workers_per_vm
        gpus = ["--gpus", str(self.s.gpus), "--gpus-per-worker", str(self.s.gpus_per_worker)] if self.s.gpus else []
        if gpus:
            workers = self.s.gpus // self.s.gpus_per_worker  # one worker process per GPU group
        argv = [self.s.python, "-m", "tasks", "run", *req.spec_args, *req.run_args,
                "--root", self.books.run_root, "--workers", str(workers), *gpus]
        if self.reports_state is None:
            self.reports_state = useful_work.engine_reports_state(
                self.s.python, env=self._env(), cwd=self.s.home)  # the VM's own disk
            logger.info("tasks run %s --state-file: %s", "takes" if self.reports_state else "does not take",
                        "a run is busy while a key of this VM runs" if self.reports_state
                        else "a live tasks run counts as busy")
        if self.reports_state:
            state = useful_work.state_path(self.s.home, r.id)
            state.parent.mkdir(parents=True, exist_ok=True)
            state.unlink(missing_ok=True)  # a new runner: nothing its predecessor wrote counts
            argv += ["--state-file", str(state)]
        out = open(self.books.local(f"{records.log_dir(self.s.name)}/{r.id}.log"), "ab")
        out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {self.s.name}: {shlex.join(argv)}\n".encode())
        out.flush()
        r.proc = subprocess.Popen(argv, cwd=self.books.cwd, env=self._env(), stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT)
        out.close()
        r.pid, r.state, r.started, r.spawned = r.proc.pid, "running", time.time(), time.monotonic()
        logger.info("run %s: started tasks run (pid %d, %d workers)", r.id, r.pid, workers)

    def _env(self) -> dict[str, str]:
        return run_env(root=self.books.import_root, extra=self.s.python_path, home=self.s.home)

    def _mark_done(self, r: RunState) -> None:
        """Record that the run is over, with the engine's final counts (first agent wins)."""
        rel = records.done_file(r.id)
        if self.books.exists(rel):
            return
        done = RunDone(id=r.id, result=r.state, exit_code=r.exit_code, vm=self.s.name, time=time.time(),
                       status=self._engine_counts(r.id))
        self.books.create_text(rel, done.to_json())

    def _engine_counts(self, rid: str) -> records.EngineCounts | None:
        req = self._request(rid)
        if req is None:
            return None
        try:
            out = subprocess.run(
                [self.s.python, "-m", "tasks", "status", *req.spec_args, "--root", self.books.run_root, "--json"],
                cwd=self.books.cwd, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, env=self._env())
            return counts(out.stdout, host=self.s.name) if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ClusterError) as e:
            logger.warning("run %s: tasks status failed: %s", rid, e)
            return None

    # -- health and reporting -----------------------------------------------------------

    def _check_mount(self, now: float) -> None:
        """`mount.sh check` (cluster.vm.mount): a dead or missing mount is mounted again, with backoff."""
        self.last_mount_check = now
        what = self.books.check(now)
        if what == "back":
            self._log_to_share()  # first, so that the share's agent.log says so too
            logger.info("share usable again (after %d remount(s))", self.books.back_after)
        if not self.books.ok and self.share_log is not None:  # its file is on the dead mount
            logging.getLogger().removeHandler(self.share_log)
            try:
                self.share_log.close()
            except OSError:
                pass
            self.share_log = None
        if what == "remounted":
            self.last_mount_check = 0.0  # look again at once

    def _log_to_share(self) -> None:
        """The agent's log on the share too, once the share is there (never onto a bare mount point)."""
        if self.share_log is not None:
            return
        try:
            self.share_log = logging.FileHandler(self.books.local(f"{records.log_dir(self.s.name)}/agent.log"))
        except OSError as e:
            logger.warning("no agent log on the share (%s); logging locally only", e)
            return
        self.share_log.setFormatter(logging.Formatter(f"%(asctime)s {self.s.name} agent: %(message)s"))
        logging.getLogger().addHandler(self.share_log)
        logger.info("started (pid %d, id %s, root %s); logging to the share too", os.getpid(),
                    self.s.agent_id, self.s.root)

    def _keep_guarded(self) -> None:
        """The idle guard must run: boot.sh starts it first; if it has died since, start it again."""
        pidfile = self.s.home / "watchdog.pid"
        if running(pidfile, "watchdog.sh") is not None:
            return
        script = self.s.home / "watchdog.sh"
        if not script.exists():
            return
        logger.warning("the idle guard is not running: starting it again")
        with open(self.s.home / "watchdog.log", "ab") as log:
            p = subprocess.Popen(["sh", str(script)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 cwd=self.s.home, start_new_session=True)
        atomic_write(pidfile, f"{p.pid}\n")

    def _heartbeat(self, state: str) -> None:
        """This VM's heartbeat: on its own disk always, on the share while the share is alive."""
        self.last_heartbeat = time.monotonic()
        self.seq += 1
        beat = Heartbeat(
            name=self.s.name, state=state, time=time.time(), agent_id=self.s.agent_id, seq=self.seq,
            mount=self.books.state, agent_pid=os.getpid(), idle_for=round(time.monotonic() - self.idle_since, 1),
            idle_timeout=self.s.idle_timeout, runs={rid: r.public() for rid, r in self.runs.items()},
            problem=self.problem)
        try:
            atomic_write(self.s.home / records.LOCAL_HEARTBEAT, beat.to_json())
        except OSError as e:
            logger.warning("could not write the local heartbeat: %s", e)
        if not self.books.ok:
            return
        try:
            shared = replace(beat, rate=self.rate.now(), executions=self.rate.total) if self.rate else beat
            self.books.write_text(records.heartbeat_file(self.s.name), shared.to_json())
        except (OSError, StoreError) as e:
            logger.warning("could not write heartbeat: %s", e)

    def shut_down(self) -> None:
        """The guard is powering the VM off: end the recorder, say so once more, and return."""
        self.recorder.stop()
        try:
            reason = (self.s.home / "stopping").read_text().strip()
        except OSError:
            reason = ""
        logger.info("asked to stop (%s): last heartbeat", reason or "SIGTERM")
        self._heartbeat("no-gpu-driver" if self.problem else "stopped-idle" if reason == "idle" else "stopped")
        for h in logging.getLogger().handlers:
            h.flush()
        self.books.sync(force=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--root", required=True, help="the share's mount point, or the bucket's URL (headless)")
    p.add_argument("--home", required=True, type=Path)
    p.add_argument("--agent-id", default="", help="boot.sh's name for this agent, in every heartbeat")
    p.add_argument("--python", required=True)
    p.add_argument("--python-path", default="")
    p.add_argument("--idle-timeout", required=True, type=float)
    p.add_argument("--workers-per-vm", required=True, type=int)
    p.add_argument("--gpus", type=int, default=0, help="GPUs this VM must have (0: a CPU VM)")
    p.add_argument("--gpus-per-worker", type=int, default=1)
    p.add_argument("--nvidia-smi", default="nvidia-smi", help="the driver's tool, for the GPU check")
    p.add_argument("--metrics-interval", type=float, default=METRICS_INTERVAL_S,
                   help=f"seconds per metric sample while tasks run (default {METRICS_INTERVAL_S:g}; 0: none)")
    a = p.parse_args(argv)
    s = Settings(name=a.name, root=a.root, home=a.home, python=a.python, python_path=a.python_path,
                 idle_timeout=a.idle_timeout, workers_per_vm=a.workers_per_vm, agent_id=a.agent_id,
                 metrics_interval=a.metrics_interval, gpus=a.gpus, gpus_per_worker=max(1, a.gpus_per_worker),
                 nvidia_smi=a.nvidia_smi)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {s.name} agent: %(message)s")
    # One agent per VM, even if two boots race.
    lock = open(s.home / "agent.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        logger.info("another agent holds %s; exiting", s.home / "agent.lock")
        return 0
    agent = Agent(s)

    def on_term(signum: int, frame: object) -> None:
        agent.stop_asked = True

    signal.signal(signal.SIGTERM, on_term)
    logger.info("started (pid %d, id %s, root %s, idle timeout %.0fs)", os.getpid(), s.agent_id, s.root,
                s.idle_timeout)
    try:
        why = agent.loop()
        logger.info("loop over (%s)", why)
    finally:
        agent.shut_down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
