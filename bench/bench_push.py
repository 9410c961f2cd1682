"""`fab push` against `scp -r` (OpenSSH's SFTP mode) to the same lab head, side by side in one run.

Brings up a one-VM lab cluster (its head is an sshd on loopback with the jailed SFTP user),
makes FILES files of FILE_KB KB and one file of BIG_MB MB, then pushes each data set with
`fab push DATA --to bench/push-N` and copies it with `scp -r DATA user@head:/share/bench/scp-N`,
alternating, REPEAT times each, a fresh destination every time. Prints the median wall time
and rate of each, and the ratio. Goal: `fab push` at least as fast for the big file and at least
2x for the many small ones. Needs root (the lab).

With `--rtt-ms MS` both reach the head through the same relay (bench/delay_relay.py, on
127.OCTET.0.2:PORT+1), which delays every chunk by MS/2 each way, in order: a laptop's link
to a cloud head, with no bandwidth cap unless `--rate MB/s` is given. Both still check the
head's real host key: a known_hosts of the relay's address and port with the key `fab up`
recorded for the head (the relay only forwards bytes; it holds no key).
Usage: python bench/bench_push.py --octet 85 --port 44090 [--files 1000 --file-kb 100 --big-mb 1024 --repeat 3]
       [--rtt-ms 20 [--rate 100] [--turns]]
Every address is 127.OCTET.x.y and every port PORT..PORT+1. The lab, its share and the data
live in --dir (default /var/lib/spotfan-bench/push-OCTET: a plain disk folder, as a head's disk
is; this machine's /tmp creates files about 15x slower than its other folders on the same disk,
which bounded both contenders).
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import lifecycle  # noqa: E402
from cluster.config import load  # noqa: E402
from cluster.session import Cluster  # noqa: E402
from cluster.ssh_keys import host_pattern  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAB = Path(sys.executable).parent / "fab"
COPY_TIMEOUT_S = 1800  # one push or scp of one data set
UP_TIMEOUT_S = 600
RELAY_START_S = 10.0
RELAY = REPO / "bench" / "delay_relay.py"


def write_config(folder: Path, *, octet: int, port: int, address: str = "", known_hosts: str = "known_hosts",
                 name: str = "cluster.toml", kex: str = "") -> Path:
    """The bench cluster's cluster.toml; with `address` (and `port`, `known_hosts`, `name`) a copy
    that reaches the same head elsewhere (through the relay)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"""
[cluster]
name = "push"
provider = "lab"
workers = 1
idle_timeout = 3600
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"
[head]
address = "{address or f'127.{octet}.0.1'}"
port = {port}
share = "share"
user = "sfbench-push{octet}"
jail = "/srv/spotfan-bench/push{octet}"
[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/{known_hosts}"
kex_algorithms = "{kex}"
boot_timeout = 600
command_timeout = 600
[lab]
state_dir = "state"
address_prefix = "127.{octet}.1."
""")
    return path


def start_relay(folder: Path, config_path: Path, *, octet: int, port: int, rtt_ms: float,
                rate: float, turns: bool, kex: str) -> tuple[subprocess.Popen[str], Path]:
    """The delay relay in front of the head, and a cluster.toml that reaches the head through it,
    trusting only the host key `fab up` recorded for the head (now under the relay's address)."""
    config = load(config_path)
    h = config.head
    listen = (f"127.{octet}.0.2", port + 1)
    head_line = host_pattern(h.address, h.port) + " "
    lines = [ln for ln in config.ssh.known_hosts.read_text().splitlines() if ln.startswith(head_line)]
    if not lines:
        raise SystemExit(f"no host key for the head ({head_line.strip()}) in {config.ssh.known_hosts}")
    relayed = config.ssh.known_hosts.with_name("known_hosts.relay")
    relayed.write_text("".join(host_pattern(*listen) + " " + ln[len(head_line):] + "\n" for ln in lines))
    toml = write_config(folder, octet=octet, port=listen[1], address=listen[0], known_hosts=relayed.name,
                        name="cluster-relay.toml", kex=kex)
    proc = subprocess.Popen([sys.executable, str(RELAY), "--listen", f"{listen[0]}:{listen[1]}",
                             "--to", f"{h.address}:{h.port}", "--rtt-ms", str(rtt_ms), "--rate", str(rate), *(["--count"] if turns else [])],
                            stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    said = proc.stdout.readline() if select.select([proc.stdout], [], [], RELAY_START_S)[0] else ""
    if not said.startswith("listening"):  # "listening HOST:PORT" once it accepts
        proc.kill()
        raise SystemExit(f"the delay relay did not start in {RELAY_START_S:g} s: {said!r} (exit {proc.wait()})")
    return proc, toml


def make_data(top: Path, *, files: int, file_kb: int, big_mb: int) -> tuple[Path, Path]:
    small = top / "small"
    small.mkdir(parents=True)
    block = os.urandom(file_kb * 1024)
    for i in range(files):
        (small / f"f{i:05d}.bin").write_bytes(block[i % 97:] + block[:i % 97])
    big = top / "big"
    big.mkdir()
    with open(big / "big.bin", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(big_mb):
            f.write(chunk)
    return small, big


def timed(argv: list[str], env: dict[str, str], copying: list[float] | None = None) -> float:
    """Wall time of one command; with `copying`, the push's own seconds (from its --json) are added to it."""
    os.sync()  # the last copy's writes reach the disk now, not during this one's
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=COPY_TIMEOUT_S,
                       stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    if copying is not None:
        copying.append(json.loads(r.stdout.strip().splitlines()[-1])["seconds"])
    return wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--octet", type=int, required=True, help="second octet of every address used (127.OCTET.x.y)")
    p.add_argument("--port", type=int, required=True, help="first of the two ports used")
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--file-kb", type=int, default=100)
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default="", help="where the lab, its share and the data live "
                                                "(default /var/lib/spotfan-bench/push-OCTET; removed at the end)")
    p.add_argument("--jobs", type=int, default=0, help="fab push --jobs (default: its own)")
    p.add_argument("--kex", default="", help="KexAlgorithms of both contenders' OpenSSH logins, e.g. curve25519-sha256 "
                                             "(cluster.toml ssh.kex_algorithms for fab push; default: OpenSSH's own)")
    p.add_argument("--rtt-ms", type=float, default=None,
                   help="reach the head through bench/delay_relay.py with this round trip (default: straight, loopback)")
    p.add_argument("--rate", type=float, default=0.0, help="with --rtt-ms: the relay's MB/s each way (default: no cap)")
    p.add_argument("--turns", action="store_true",
                   help="with --rtt-ms: each relayed connection's seconds, bytes and turns on stderr (where round trips go)")
    a = p.parse_args()
    if (a.rate or a.turns) and a.rtt_ms is None:
        p.error("--rate and --turns need --rtt-ms (0 for none)")
    if os.geteuid() != 0:
        raise SystemExit("needs root (the lab, and sshd)")
    folder = Path(a.dir or f"/var/lib/spotfan-bench/push-{a.octet}")
    if (folder / "cluster.toml").exists():
        with Cluster(load(folder / "cluster.toml")) as leftover:
            lifecycle.down(leftover)  # a crashed earlier run's leftovers
    shutil.rmtree(folder, ignore_errors=True)
    toml = write_config(folder, octet=a.octet, port=a.port, kex=a.kex)
    # Python writes its bytecode beside spotfan's modules as on a user's machine, so `fab` does not
    # compile them at every start (this machine's environment sets PYTHONDONTWRITEBYTECODE).
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "SPOTFAN_CONFIG": str(toml)}
    link = ("loopback, straight to the head" if a.rtt_ms is None else
            f"through the delay relay: {a.rtt_ms:g} ms round trip, " + (f"{a.rate:g} MB/s" if a.rate else "no rate cap"))
    link += f", kex {a.kex or 'OpenSSH default'}"
    print(f"push bench: {a.files} x {a.file_kb} KB and 1 x {a.big_mb} MB, {link}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    relay = None
    try:
        r = subprocess.run([str(FAB), "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=UP_TIMEOUT_S)
        if r.returncode != 0:
            raise SystemExit(f"fab up failed:\n{r.stdout}\n{r.stderr}")
        if a.rtt_ms is not None:
            relay, relay_toml = start_relay(folder, toml, octet=a.octet, port=a.port, rtt_ms=a.rtt_ms, rate=a.rate,
                                           turns=a.turns, kex=a.kex)
            env["SPOTFAN_CONFIG"] = str(relay_toml)
        config = load(Path(env["SPOTFAN_CONFIG"]))
        h, s = config.head, config.ssh
        share = load(toml).head.share  # the share's folder here (the head is this machine)
        small, big = make_data(folder / "data", files=a.files, file_kb=a.file_kb, big_mb=a.big_mb)
        bench = share / "bench"
        scp = ["scp", "-q", "-r", "-s", "-P", str(h.port), "-i", str(s.key), "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={s.known_hosts}",
               "-o", "IdentitiesOnly=yes", "-F", "/dev/null", *(["-o", f"KexAlgorithms={a.kex}"] if a.kex else [])]
        jobs = ["--jobs", str(a.jobs)] if a.jobs else []
        for label, data, nbytes in (("small files", small, a.files * a.file_kb * 1024),
                                    ("one big file", big, a.big_mb << 20)):
            if not nbytes:
                continue  # --files 0 or --big-mb 0: only the other
            push_s, scp_s, inside = [], [], []
            for i in range(a.repeat):
                shutil.rmtree(bench, ignore_errors=True)
                bench.mkdir()
                os.chown(bench, share.stat().st_uid, share.stat().st_gid)
                push_s.append(timed([str(FAB), "push", str(data), "--to", f"bench/push-{i}", "--json", *jobs], env, inside))
                scp_s.append(timed([*scp, str(data), f"{h.user}@{h.address}:{h.sftp_share}/bench/scp-{i}"], env))
                for d in (bench / f"push-{i}", bench / f"scp-{i}"):
                    got = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                    assert got == nbytes, f"{d}: {got} bytes, expected {nbytes}"
            mp, ms = statistics.median(push_s), statistics.median(scp_s)
            load_avg = os.getloadavg()[0]
            print(f"  {label}: fab push {mp:.2f}s ({nbytes / mp / 1e6:.1f} MB/s), scp -r {ms:.2f}s "
                  f"({nbytes / ms / 1e6:.1f} MB/s): fab push is {ms / mp:.2f}x scp's speed "
                  f"(median of {a.repeat}; all push {[round(x, 2) for x in push_s]}, scp {[round(x, 2) for x in scp_s]}; "
                  f"push without fab's start-up {[round(x, 2) for x in inside]}; load average {load_avg:.1f})")
        print(json.dumps({"load_average_end": os.getloadavg()[0]}))
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(RELAY_START_S)
        with Cluster(load(toml)) as cluster:
            lifecycle.down(cluster)
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
