"""`fab status --watch`: successive cluster statuses turned into views with rates and ETAs (drawn by
cluster.show as rich tables on a terminal, or as plain lines in a log).

A run's rate is its keys done over the last RATE_WINDOW_S seconds the watch has seen;
before the watch has seen MIN_RATE_SPAN_S of it, the agents' own rates (executions per
second over their last 30 s, from the heartbeats) stand in.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.errors import ClusterError, HostKeyError, SSHError
from cluster.session import Cluster

if TYPE_CHECKING:  # imported where a status is read: `fab` reads these constants for its help
    from cluster.status import ClusterStatus, RunStatus, VMState

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 5.0  # between refreshes; each one asks a VM for the engine's counts
MIN_INTERVAL_S = 1.0
WATCH_TIMEOUT_S = 24 * 3600.0  # the watch's outer bound when --timeout is not given
RATE_WINDOW_S = 300.0  # a run's rate: keys done over the last this many seconds
MIN_RATE_SPAN_S = 3.0  # below this much history the agents' rates stand in
MAX_STATUS_ERRORS = 5  # consecutive failed refreshes (head or VMs unreachable) end the watch


@dataclass(frozen=True)
class RunView:
    """One run as the watch shows it."""

    status: RunStatus
    rate: float | None  # keys done per second, recently; None: not known yet
    eta: float | None  # seconds until every key is done or has failed, at that rate

    @property
    def left(self) -> int | None:
        s = self.status
        return None if s.total is None else max(0, s.total - (s.done or 0) - (s.failed or 0))


@dataclass(frozen=True)
class VMView:
    """One VM as the watch shows it."""

    name: str
    state: str  # running | waiting | idle | preempted | stopped | starting | stopping | mount-dead |
    # no-agent | unreachable
    rate: float | None  # its worker's executions per second (last 30 s), while it runs
    heartbeat_age: float | None  # seconds since its agent's last heartbeat; None: never
    stale: bool  # the heartbeat is older than HEARTBEAT_STALE_S


@dataclass(frozen=True)
class View:
    """One refresh of the watch."""

    cluster: str
    provider: str
    time: float  # epoch seconds
    runs: list[RunView]  # runs going, or that went while watched (else the latest run)
    earlier: int  # runs over before the watch began, not shown
    vms: list[VMView]
    over: bool  # no run is going

    @property
    def running_vms(self) -> int:
        return sum(v.state not in ("preempted", "stopped", "stopping") for v in self.vms)


def vm_state(v: VMState) -> str:
    """The provider's status and the agent's heartbeat, as one word."""
    if v.status == "TERMINATED":
        return "preempted" if v.preempted else "stopped"
    if v.status == "STOPPING":
        return "stopping"
    if v.status != "RUNNING":
        return "starting"
    return {"working": "running", "idle": "idle", "waiting": "waiting", "mount-dead": "mount-dead",
            "stopped-idle": "stopping", "stopped": "stopping", "no-agent": "no-agent",
            "unreachable": "unreachable"}.get(v.agent or "", "starting")


@dataclass
class Tracker:
    """Remembers what the watch has seen: each run's done counts over time."""

    history: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)
    shown: set[str] | None = None  # None until the first refresh
    rates: dict[str, float] = field(default_factory=dict)  # last known, kept once a run is over

    def view(self, st: ClusterStatus, now: float) -> View:
        from cluster.status import HEARTBEAT_STALE_S

        going = {r.id for r in st.runs if r.result is None and not r.stuck}  # a stuck run waits for a human
        if self.shown is None:
            self.shown = set(going) or ({st.runs[-1].id} if st.runs else set())
        self.shown |= going
        vms = [VMView(v.name, vm_state(v), v.rate if v.status == "RUNNING" else None,
                      v.heartbeat_age,
                      v.heartbeat_age is not None and v.heartbeat_age > HEARTBEAT_STALE_S)
               for v in st.vms]
        shown = [self._run(r, st.vms, now) for r in st.runs if r.id in self.shown]
        return View(st.name, st.provider, now, shown, len(st.runs) - len(shown), vms,
                    over=not going)

    def _run(self, r: RunStatus, vms: list[VMState], now: float) -> RunView:
        hist = self.history.setdefault(r.id, deque())
        if r.done is not None:
            hist.append((now, r.done))
        while len(hist) > 2 and now - hist[0][0] > RATE_WINDOW_S:
            hist.popleft()
        if r.result is None:
            if len(hist) >= 2 and hist[-1][0] - hist[0][0] >= MIN_RATE_SPAN_S:
                (t0, d0), (t1, d1) = hist[0], hist[-1]
                self.rates[r.id] = max(0.0, (d1 - d0) / (t1 - t0))
            else:
                agents = [v.rate for v in vms if v.status == "RUNNING" and v.rate is not None
                          and v.runs.get(r.id) == "running"]
                if agents:
                    self.rates[r.id] = sum(agents)
        rate = self.rates.get(r.id)
        view = RunView(r, rate, None)
        left = view.left
        if r.result is not None or left == 0:
            return RunView(r, rate, 0.0 if left is not None else None)
        return RunView(r, rate, left / rate if left is not None and rate else None)


def watch(cluster: Cluster, *, interval: float, timeout: float,
          on_view: Callable[[View], None],
          on_error: Callable[[ClusterError], None] | None = None) -> View | None:
    """Refresh every `interval` seconds until no run is going or `timeout` has passed;
    return the last view (None if no refresh ever succeeded). A refresh that fails (the
    head or every VM unreachable for a moment) is reported and retried, up to
    MAX_STATUS_ERRORS in a row."""
    from cluster.status import cluster_status

    interval = max(MIN_INTERVAL_S, interval)
    deadline = time.monotonic() + timeout
    tracker = Tracker()
    last: View | None = None
    errors = 0
    for _ in range(int(timeout / interval) + 2):  # bounded; the deadline ends it first
        try:
            st = cluster_status(cluster)
            errors = 0
        except HostKeyError:
            raise
        except SSHError as e:
            errors += 1
            if errors >= MAX_STATUS_ERRORS or on_error is None:
                raise
            on_error(e)
        else:
            last = tracker.view(st, time.time())
            on_view(last)
            if last.over:
                return last
        if time.monotonic() + interval > deadline:
            break
        time.sleep(interval)
    return last
