"""The lab cluster the fleet benchmarks run on: start-up, the VMs' connections, inputs, commands.

Shared by bench/bench_fleet.py and bench/bench_objroot.py. `lab(name, vms, workers)` brings
a lab cluster up (the head's sshd on loopback, each VM mounting the share with
cluster/vm/mount.sh's options, bench/fleet_task.py copied onto the share) and down again,
whatever happens in between. The lab uses 127.$SPOTFAN_TEST_OCTET.0.x and head port
$SPOTFAN_TEST_PORT_BASE + 90; its state (the share too) lives in $SPOTFAN_BENCH_STATE
(default /var/lib/spotfan-bench/NAME-OCTET). Needs root.
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cluster import lifecycle  # noqa: E402
from cluster.config import load  # noqa: E402
from cluster.session import Cluster  # noqa: E402

OCTET = int(os.environ.get("SPOTFAN_TEST_OCTET", "61"))
PORT = int(os.environ.get("SPOTFAN_TEST_PORT_BASE", "31000")) + 90
RUN_TIMEOUT_S = 1800  # one contender on one VM
DEBUG_MOUNT = """
set -eu
. "$SPOTFAN_HOME/boot.env"
eval "$(grep -E '^(FUSE_OPTS|SSH_OPTS)=' "$SPOTFAN_HOME/mount.sh")"
D="$SPOTFAN_HOME/dbg"; L="$SPOTFAN_HOME/sshfs-debug.log"
mkdir -p "$D"
setsid sshfs -f -o "$FUSE_OPTS,sshfs_debug" -o "$SSH_OPTS" -o "ssh_command=ssh -F none" \\
    "$SPOTFAN_HEAD_USER@$SPOTFAN_HEAD_ADDRESS:$SPOTFAN_SHARE" "$D" </dev/null >/dev/null 2>"$L" &
P=$!
i=0; while ! mountpoint -q "$D" && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
cd "$D"
{run} >"$SPOTFAN_HOME/dbg-run.out" 2>"$SPOTFAN_HOME/dbg-run.err"
cd /
fusermount3 -u "$D" || fusermount3 -u -z "$D"
kill $P 2>/dev/null || true
grep -E '^\\[[0-9]+\\] +[A-Z_]+ *$' "$L" | awk '{print "REQ", $2}' | sort | uniq -c
grep -ho 'direct SFTP session sent [0-9]*' "$SPOTFAN_HOME/dbg-run.err" | awk '{print $5, "REQ", "DIRECT"}' 
"""


def state_dir(name: str) -> Path:
    """The lab's state, the head's share included, on a fresh folder rather than /tmp: on this
    machine a file create under /tmp costs 1.2 ms of CPU against 0.03-0.04 ms under /var/lib,
    /srv or /root of the same disk, an artefact of an aged /tmp that no head's disk has."""
    return Path(os.environ.get("SPOTFAN_BENCH_STATE", f"/var/lib/spotfan-bench/{name}-{OCTET}"))


def write_config(state: Path, name: str, vms: int, workers: int) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "cluster.toml"
    path.write_text(f"""
[cluster]
name = "{name}{OCTET}"
provider = "lab"
workers = {vms}
workers_per_vm = {workers}
idle_timeout = 7200
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"
[head]
address = "127.0.0.1"
port = {PORT}
share = "share"
user = "sf{OCTET}-{name}"
jail = "/srv/spotfan-bench/{OCTET}/{name}"
[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/known_hosts"
command_timeout = {RUN_TIMEOUT_S}
[lab]
state_dir = "state"
address_prefix = "127.{OCTET}.0."
""")
    return path


class Fleet:
    """The lab VMs with one open SSH connection each, and the share seen from the head."""

    def __init__(self, cluster: Cluster, vms: int) -> None:
        self.config = cluster.config
        self.share = cluster.config.head.share
        self.remote = cluster.remote
        self.hosts = sorted(lifecycle.running_hosts(cluster), key=lambda h: h.name)[:vms]
        self.conns = [self.remote.open(h) for h in self.hosts]
        self.cpu = LabCpu(cluster.config)

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.cpu.close()

    def run_all(self, n: int, command: str) -> list[tuple[float, str]]:
        """`command` on the first n VMs at once: (seconds from the common start, stdout)."""
        start = threading.Barrier(n + 1)
        t0: list[float] = []

        def one(i: int) -> tuple[float, str]:
            start.wait()
            out = self.remote.run_on(self.conns[i], self.hosts[i], command, timeout=RUN_TIMEOUT_S)
            return time.perf_counter() - t0[0], out.stdout

        with ThreadPoolExecutor(n) as pool:
            futs = [pool.submit(one, i) for i in range(n)]
            t0.append(time.perf_counter())
            start.wait()
            return [f.result() for f in futs]


@contextmanager
def lab(name: str, vms: int, workers: int) -> Iterator[tuple[Cluster, Fleet]]:
    """A lab cluster of `vms` VMs x `workers` (a crashed earlier run's leftovers removed
    first), with bench/fleet_task.py on its share; down and its state removed at the end."""
    state = state_dir(name)
    if (state / "cluster.toml").exists():
        with Cluster(load(state / "cluster.toml")) as leftover:
            lifecycle.down(leftover)
    shutil.rmtree(state, ignore_errors=True)
    config = load(write_config(state, name, vms, workers))
    cluster = Cluster(config)
    fleet: Fleet | None = None
    try:
        lifecycle.prepare(cluster)
        lifecycle.up(cluster)
        shutil.copy(REPO / "bench/fleet_task.py", config.head.share / "fleet_task.py")
        fleet = Fleet(cluster, vms)
        yield cluster, fleet
    finally:
        if fleet is not None:
            fleet.close()
        lifecycle.down(cluster)
        cluster.close()
        shutil.rmtree(state, ignore_errors=True)


def prepare_inputs(share: Path, n: int) -> str:
    folder = f"in-{n}"
    if not (share / folder).is_dir() or len(os.listdir(share / folder)) != n:
        shutil.rmtree(share / folder, ignore_errors=True)
        (share / folder).mkdir()
        for i in range(n):
            (share / folder / f"k{i:06d}.txt").write_bytes(input_bytes(i))
    return folder


def input_bytes(i: int) -> bytes:
    """Input i's content; fleet_task.tiny's output is this plus fleet_task.PAD."""
    return f"{i:010d}".encode()


def clean(share: Path) -> None:
    for name in ("out", ".spotfan/tasks", ".spotfan/tmp"):
        shutil.rmtree(share / name, ignore_errors=True)


def commands(folder: str, workers: int, sleep_ms: float = 0) -> dict[str, str]:
    env = f"BENCH_IN={folder} BENCH_OUT=out BENCH_SLEEP_MS={sleep_ms:g}"
    py = shlex.quote(sys.executable)
    direct = 'SPOTFAN_SFTP_COMMAND="$(cat "$SPOTFAN_HOME/sftp.cmd")"'  # as the agent sets it
    spotfan = f"{env} {direct} {py} -m tasks run fleet_task:tiny --workers {workers}"
    # The runner's session logging in as with cluster.toml `ssh.kex_algorithms = "curve25519-sha256"`
    # (ssh takes the first value given for an option; mount.sh gives none by default).
    c25519 = direct.replace('"$(cat ', '"$(sed "s/^ssh /ssh -o KexAlgorithms=curve25519-sha256 /" ')
    return {"spotfan": spotfan, "spotfan --fetch": f"{spotfan} --fetch",
            "spotfan --fetch c25519": f"{env} {c25519} {py} -m tasks run fleet_task:tiny --workers {workers} --fetch",
            "naive": f"{env} {py} fleet_task.py . {workers}"}


def count_requests(fleet: Fleet, n_vms: int, cmd: str, keys: int) -> tuple[int, Counter]:
    """One run of `cmd` on every VM over a second mount made with sshfs's `sshfs_debug`:
    (SFTP requests in all, by kind), the runners' own sessions included (kind DIRECT)."""
    clean(fleet.share)
    script = DEBUG_MOUNT.replace("{run}", cmd.replace(" -m tasks run ", " -m tasks -v run "))
    total: Counter = Counter()
    for _, out in fleet.run_all(n_vms, f"sh -c {shlex.quote(script)}"):
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "REQ":
                total[parts[2]] += int(parts[0])
    assert len(os.listdir(fleet.share / "out")) == keys
    return sum(total.values()), total


class LabCpu:
    """CPU seconds used by the lab cluster alone (every VM's processes, the head's sshd and
    all they start), from a cgroup v1 cpuacct group they are moved into: a figure that other
    load on this machine barely changes, unlike wall time. None where there is no cpuacct."""

    BASE = Path("/sys/fs/cgroup/cpuacct")

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        self.group = self.BASE / f"spotfan-bench-{config.name}"
        self.ok = (self.BASE / "cgroup.procs").exists()
        if not self.ok:
            return
        self.group.mkdir(exist_ok=True)
        marker = str(config.settings.state_dir)
        roots = [p for p in psutil.process_iter(["cmdline"])
                 if marker in " ".join(p.info["cmdline"] or [])]
        for p in roots:
            try:
                for q in [p, *p.children(recursive=True)]:
                    (self.group / "cgroup.procs").write_text(str(q.pid))
            except (psutil.Error, OSError):
                continue

    def seconds(self) -> float | None:
        if not self.ok:
            return None
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def close(self) -> None:
        if not self.ok:
            return
        for pid in (self.group / "cgroup.procs").read_text().split():
            try:
                (self.BASE / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        try:
            self.group.rmdir()
        except OSError:
            pass
