"""`fab up` of a large lab fleet against a head sized for it, and the connect storm the
OpenSSH default would have dropped, for contrast. Needs root (the lab).

1. A burst of N simultaneous SFTP logins (`sftp -b /dev/null`, what each VM's mount does
   first) against a throwaway sshd on loopback, once with OpenSSH's default MaxStartups
   (10:30:100) and once with the settings `fab head-setup` prints for N workers
   (cluster.jail.fleet_sshd_settings): how many logins each refused.
2. `fab up --count N` of a lab cluster from nothing (the lab head sizes its sshd for N):
   wall time, VMs working, mounts that failed, mounts that needed a retry.

Usage: python bench/bench_fleet_up.py --vms 64 --octet 62 --port 32950
Every address is 127.OCTET.x.y and every port PORT..PORT+1, so side-by-side runs need
their own --octet and --port.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster import jail, lifecycle  # noqa: E402
from cluster.config import load  # noqa: E402
from cluster.session import Cluster  # noqa: E402
from cluster.ssh_keys import ensure_key_pair, public_key  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SSHD = "/usr/sbin/sshd"
LOGIN_TIMEOUT_S = 180  # one login of the burst; a CPU-bound burst of 128 took ~59 s here
LISTEN_TIMEOUT_S = 10
FAB_TIMEOUT_S = 1800


def burst(n: int, *, address: str, port: int, settings: list[str], folder: Path) -> tuple[int, float]:
    """N simultaneous SFTP logins against an sshd with `settings`; (refused, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    host_key = ensure_key_pair(folder / "host_key", comment="bench-host")
    user_key = ensure_key_pair(folder / "user_key", comment="bench-user")
    (folder / "authorized_keys").write_text(public_key(user_key) + "\n")
    (folder / "known_hosts").write_text(f"[{address}]:{port} {' '.join(public_key(host_key).split()[:2])}\n")
    (folder / "sshd_config").write_text("\n".join([
        f"ListenAddress {address}:{port}", f"HostKey {host_key}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PidFile none", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "Subsystem sftp internal-sftp", *settings]) + "\n")
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(folder / "sshd_config"), "-E", str(folder / "sshd.log")])
    try:
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        while subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/{address}/{port}"], capture_output=True).returncode:
            if time.monotonic() > deadline or sshd.poll() is not None:
                raise SystemExit(f"the bench sshd did not start: {(folder / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
        argv = ["sftp", "-b", "/dev/null", "-F", "none", "-P", str(port), "-i", str(user_key),
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", f"ConnectTimeout={LOGIN_TIMEOUT_S}",
                f"root@{address}"]
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=n) as pool:
            codes = list(pool.map(lambda _: subprocess.run(argv, capture_output=True, timeout=LOGIN_TIMEOUT_S,
                                                           stdin=subprocess.DEVNULL).returncode, range(n)))
        return sum(c != 0 for c in codes), time.perf_counter() - t
    finally:
        sshd.kill()
        sshd.wait()


def write_config(folder: Path, *, octet: int, port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cluster.toml"
    path.write_text(f"""
[cluster]
name = "fleet"
provider = "lab"
workers = 1
idle_timeout = 900
python = "{sys.executable}"
python_path = ["{REPO}"]
mount_point = "mnt"
[head]
address = "127.{octet}.0.1"
port = {port}
share = "share"
user = "sfbench-fleet{octet}"
jail = "/srv/spotfan-bench/fleet{octet}"
[ssh]
key = "keys/laptop"
worker_key = "keys/worker"
known_hosts = "keys/known_hosts"
boot_timeout = 600
command_timeout = 600
[lab]
state_dir = "state"
address_prefix = "127.{octet}.1."
""")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=64)
    p.add_argument("--octet", type=int, required=True, help="second octet of every address used (127.OCTET.x.y)")
    p.add_argument("--port", type=int, required=True, help="first of the two ports used")
    p.add_argument("--skip-burst", action="store_true")
    p.add_argument("--skip-up", action="store_true")
    a = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (the lab, and sshd)")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    folder = Path(tempfile.gettempdir()) / f"spotfan-bench-fleet-{a.octet}"
    if (folder / "cluster.toml").exists():
        with Cluster(load(folder / "cluster.toml")) as leftover:
            lifecycle.down(leftover)  # a crashed earlier run's leftovers
    shutil.rmtree(folder, ignore_errors=True)
    n = a.vms
    print(f"fleet bench: {n} VMs, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start")
    if not a.skip_burst:
        for label, settings in (("OpenSSH default (MaxStartups 10:30:100)", []),
                                (f"sized for {n} ({jail.fleet_sshd_settings(n)[0]})", jail.fleet_sshd_settings(n))):
            refused, secs = burst(n, address=f"127.{a.octet}.0.2", port=a.port + 1, settings=settings,
                                  folder=folder / "burst")
            print(f"  {n} simultaneous SFTP logins, {label}: {refused} refused, {secs:.1f}s")
    if not a.skip_up:
        toml = write_config(folder, octet=a.octet, port=a.port)
        env = {**os.environ, "SPOTFAN_CONFIG": str(toml)}
        t = time.perf_counter()
        r = subprocess.run([str(Path(sys.executable).parent / "fab"), "up", "--count", str(n)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=FAB_TIMEOUT_S)
        wall = time.perf_counter() - t
        try:
            working = len(re.findall(r"agent: ok \(started", r.stdout))
            failed_mounts = len(re.findall(r"mount: FAILED", r.stdout))
            retried = re.findall(r"mount: ok \(mounted after (\d+) attempts\)", r.stdout)
            print(f"  fab up --count {n} (exit {r.returncode}): {wall:.1f}s wall, {working}/{n} VMs working, "
                  f"{failed_mounts} failed mounts, {len(retried)} mounts needed a retry"
                  + (f" (at most {max(map(int, retried))} attempts)" if retried else ""))
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-2000:], sep="\n")
        finally:
            with Cluster(load(toml)) as cluster:
                lifecycle.down(cluster)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures under load "
          "are marked so in docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
