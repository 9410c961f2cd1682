"""A VM agent's heartbeat as the laptop reads it (validated: the share is untrusted input),
and the wait for the first one that proves an agent alive.

The agent (cluster.agent) writes its heartbeat every HEARTBEAT_INTERVAL_S to the share
(ROOT/.spotfan/cluster/vms/NAME.json) while the share is alive, and always to its own
disk (SPOTFAN_HOME/heartbeat.json), where `fab status` reads it over SSH when the
share's copy is stale. `agent_id` names one agent process (boot.sh makes it up) and
`seq` counts its heartbeats, so a heartbeat proves an agent alive without comparing the
VM's clock with the laptop's.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

HEARTBEAT_INTERVAL_S = 2.0  # as cluster.agent writes them
VMS_DIR = ".spotfan/cluster/vms"
LOCAL_FILE = "heartbeat.json"  # in SPOTFAN_HOME on the VM
AGENT_REPORT_TIMEOUT_S = 60.0  # `fab up`/`heal`: how long a booted VM's agent has to report
REPORT_POLL_S = 0.5
STALE_S = HEARTBEAT_INTERVAL_S + 1.0  # a share heartbeat older than this: ask the VM itself


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat of a VM's agent."""

    name: str  # the VM
    state: str  # working | waiting | idle | mount-dead | stopped-idle | stopped
    time: float  # epoch seconds, on the VM's clock
    agent_id: str  # which agent process wrote it ("" from an agent older than ids)
    seq: int  # heartbeats this agent has written
    mount: str  # ok | dead | absent | unknown: the share as the agent last checked it
    rate: float | None = None  # task executions per second on this VM (last 30 s)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> this VM's part

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.time)


def parse(text: str | None) -> Heartbeat | None:
    """A heartbeat from its JSON, or None if missing or malformed."""
    if not text:
        return None
    try:
        raw = json.loads(text)
        runs = raw.get("runs") or {}
        rate = raw.get("rate")
        return Heartbeat(
            name=str(raw["name"]), state=str(raw["state"]), time=float(raw["time"]),
            agent_id=str(raw.get("agent_id") or ""), seq=int(raw.get("seq") or 0),
            mount=str(raw.get("mount") or "unknown"),
            rate=None if rate is None else float(rate),
            runs={str(k): dict(v) for k, v in runs.items() if isinstance(v, dict)} if isinstance(runs, dict) else {},
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def wait_first(read: Callable[[str], str | None], agents: Mapping[str, tuple[str, bool]], *,
               timeout: float = AGENT_REPORT_TIMEOUT_S) -> dict[str, Heartbeat]:
    """Wait until each VM's agent has reported; return the heartbeats that proved it.

    `read(vm)` gives the text of the VM's heartbeat on the share (or None); `agents` maps
    each VM to (the id of its agent, whether that agent was started just now). The first
    heartbeat of a new agent proves it alive; an agent that was already running must
    write one more (its seq grows), so an old heartbeat of a hung agent proves nothing.
    Returns as soon as every VM has reported, else at the deadline with those that did.
    """
    first_seq: dict[str, int] = {}
    proved: dict[str, Heartbeat] = {}
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / REPORT_POLL_S) + 2):
        for vm, (agent_id, new) in agents.items():
            if vm in proved:
                continue
            beat = parse(read(vm))
            if beat is None or beat.agent_id != agent_id:
                continue
            if new or (vm in first_seq and beat.seq > first_seq[vm]):
                proved[vm] = beat
            else:
                first_seq.setdefault(vm, beat.seq)
        if len(proved) == len(agents) or time.monotonic() >= deadline:
            break
        time.sleep(REPORT_POLL_S)
    return proved
