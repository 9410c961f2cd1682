"""`fab logs VM|all --follow`: every run log of the VMs as it grows, line by line, prefixed by VM.

The logs are read from the share (each VM's agent writes `logs/<vm>/<run id>.log` there),
so a VM that is preempted stops adding lines but nothing else changes. Following ends
when every run on the share is over (each has its done record) and no live agent's runner
still goes (their summaries come last), on Ctrl-C, or at the deadline.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.records import LOGS_DIR, VMS_DIR, done_file, is_heartbeat, log_dir, plain_name
from cluster.runs import MAX_LOG_NAMES, requests
from cluster.session import Cluster

FOLLOW_POLL_S = 2.0  # how often the share is looked at
FOLLOW_TIMEOUT_S = 86400.0  # the longest a follow goes on
END_GRACE_S = 20.0  # once every run is over, how long the VMs' last runners are waited for
BEAT_FRESH_S = 30.0  # an older heartbeat is a dead VM's (or one whose clock is far off): not waited for
BACKLOG_BYTES = 2000  # of a log that exists when following starts, its last this many bytes
READ_MAX_BYTES = 1 << 20  # read per log and look: a log that grows faster catches up over looks
AGENT_LOG = "agent.log"


@dataclass
class _Log:
    offset: int  # bytes of the file already shown
    partial: bytes = b""  # the start of a line not yet ended


@dataclass
class Follower:
    """The state of one follow: where each log was left."""

    cluster: Cluster
    vm: str | None  # one VM (its agent log too), or None: every VM's run logs
    logs: dict[tuple[str, str], _Log] = field(default_factory=dict)
    started: bool = False

    def look(self, emit: Callable[[str], None]) -> None:
        share = self.cluster.board
        vms = [self.vm] if self.vm else [n for n in share.listdir(LOGS_DIR)[:MAX_LOG_NAMES] if plain_name(n)]
        for vm in sorted(vms):
            for name in sorted(n for n in share.listdir(log_dir(vm))[:MAX_LOG_NAMES] if plain_name(n)):
                if name == AGENT_LOG and self.vm is None:
                    continue  # all VMs: their runs' output; one VM: its agent's lines too
                self._read(vm, name, emit)
        self.started = True

    def _read(self, vm: str, name: str, emit: Callable[[str], None]) -> None:
        share = self.cluster.board
        rel = f"{log_dir(vm)}/{name}"
        log = self.logs.get((vm, name))
        if log is None:
            # a log there when following starts: its last lines; one that appears later: whole
            end = (share.size(rel) or 0) if not self.started else 0
            log = self.logs[(vm, name)] = _Log(max(0, end - BACKLOG_BYTES))
        got = share.read_from(rel, log.offset, max_bytes=READ_MAX_BYTES)
        if got is None:
            return
        data, log.offset = got
        lines = (log.partial + data).split(b"\n")
        log.partial = lines.pop()
        tag = name[: -len(".log")] if name.endswith(".log") else name
        for line in lines:
            emit(f"{vm} {tag} | {line.decode('utf-8', 'replace')}")


def runs_over(cluster: Cluster) -> bool:
    """Whether every run request on the share has its done record."""
    return all(cluster.board.read_text(done_file(r.id)) for r in requests(cluster).requests)


def runners_going(cluster: Cluster) -> bool:
    """Whether a live agent's heartbeat still shows one of its `tasks run` going. A run is
    over once the first VM records it done; the others' runners end a moment later, and
    their last lines (each one's summary) come then."""
    from cluster.status import share_beat

    now = time.time()
    for n in cluster.board.listdir(VMS_DIR)[:MAX_LOG_NAMES]:
        if not is_heartbeat(n) or not plain_name(n[: -len(".json")]):
            continue
        beat = share_beat(cluster, n[: -len(".json")], n, [])  # a refused one: `fab status` names it
        if beat is not None and beat.age(now) <= BEAT_FRESH_S and any(
                p.state in ("starting", "running") for p in beat.runs.values()):
            return True
    return False


def follow(cluster: Cluster, vm: str | None, *, emit: Callable[[str], None],
           timeout: float = FOLLOW_TIMEOUT_S, poll_s: float = FOLLOW_POLL_S) -> bool:
    """Show new log lines until every run is over and every VM's runner has ended (True; a
    runner still going END_GRACE_S after the end is not waited for), or the deadline (False)."""
    f = Follower(cluster, vm)
    deadline = time.monotonic() + timeout
    ended_at: float | None = None
    for _ in range(int(timeout / poll_s) + int(END_GRACE_S / poll_s) + 3):
        over = runs_over(cluster)  # before the look: lines written before the end are shown
        going = over and runners_going(cluster)
        f.look(emit)
        if over:
            ended_at = time.monotonic() if ended_at is None else ended_at
            if not going or time.monotonic() - ended_at > END_GRACE_S:
                return True
        elif time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return over
