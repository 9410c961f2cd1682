"""Fail closed, with each fault injected for real on the lab: a VM that cannot work is named,
stopped and never reported "ok"; an idle VM stops itself whatever failed; a mistake in
cluster.toml or on the command line is refused (exit 2) before anything is created."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cluster.config import load
from cluster.providers.lab.host import listening
from cluster.records import CLUSTER_DIR
from labs import FAB, REPO, Lab, lab_processes

HERE = Path(__file__).resolve().parent
IDLE_S = 20  # idle_timeout of the clusters whose VMs must stop themselves
# How late after idle_timeout a VM may still be there: the guard looks every second, the
# mark's mtime has 1 s resolution, the agent gets 5 s to write its last heartbeat, and a
# loaded 2-core machine adds its own delays.
SLACK_S = 15


def cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def reconfigure(lab: Lab, **cluster: str) -> Lab:
    """The lab with [cluster] keys replaced (values are TOML text, e.g. python='".venv/bin/python"')."""
    toml = lab.folder / "cluster.toml"
    text = toml.read_text()
    for key, value in cluster.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    toml.write_text(text)
    return Lab(lab.folder, load(toml))


def stopped_within(lab: Lab, name: str, *, since: float, limit: float) -> float:
    """Wait until the VM is TERMINATED; return how long after `since` it was seen so."""
    lab.wait_for(f"{name} to stop itself", lambda: lab.statuses().get(name) == "TERMINATED", timeout=limit + 30)
    took = time.monotonic() - since
    assert took <= limit, f"{name} stopped {took:.0f}s after the reference, later than {limit}s"
    return took


# --- a VM that cannot work is a failure of `fab up`, and left stopped ---------------------


def test_a_missing_interpreter_fails_fab_up_names_the_fix_and_stops_the_vms(make_lab):
    # The trap: a copied cluster.toml resolves .venv/bin/python against its own folder.
    lab = reconfigure(make_lab(workers=2), python='".venv/bin/python"')
    missing = lab.folder / ".venv" / "bin" / "python"
    assert lab.config.python == str(missing) and not missing.exists()
    r = lab.fab("up")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "agent: ok" not in r.stdout, "nothing unchecked is called ok"
    for vm in lab.config.vm_names():
        assert (f"{vm}: FAILED: agent did not report: cluster.python = {missing} does not exist on this VM: "
                "set cluster.python in cluster.toml") in r.stdout, r.stdout
        assert "the VM was stopped so that it does not bill" in r.stdout
    names = ", ".join(sorted(lab.config.vm_names()))
    assert f"error: 2 of 2 VMs are not working ({names}); each one's error is printed above" in r.stderr, r.stderr
    assert lab.statuses() == dict.fromkeys(lab.config.vm_names(), "TERMINATED")
    heal = lab.fab("heal")
    assert heal.returncode == 1 and "does not exist on this VM" in heal.stdout, "heal says the same"
    assert lab.statuses() == dict.fromkeys(lab.config.vm_names(), "TERMINATED")


def test_a_mount_that_cannot_be_made_fails_fab_up_and_stops_the_vm(make_lab):
    lab = make_lab(workers=1)
    mount_point = Path(lab.config.mount_point)
    mount_point.write_text("a file where the mount point should be\n")
    r = lab.fab("up")
    vm = lab.config.vm_names()[0]
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(rf"^{vm}: FAILED: agent did not report: to mount \S+ on {mount_point} \(1 attempt\(s\)\): "
                     rf"the mount point {mount_point} is not a folder that can be made on this VM: set "
                     r"cluster.mount_point to one; without the share its agent cannot report", r.stdout, re.M), r.stdout
    assert "agent: ok" not in r.stdout
    assert lab.statuses() == {vm: "TERMINATED"}


def test_an_agent_that_dies_or_hangs_at_start_is_shown_with_its_log(make_lab):
    # Interpreters that exist and import spotfan, but whose agents never write a first
    # heartbeat: a wrapper that runs the real interpreter for everything but the agent (the
    # boot's import check passes). On the first VM the agent dies at once: seen gone over
    # SSH, it is named as such without waiting out the deadline. On the second it hangs (a
    # process that still looks like the agent): named when the deadline passes.
    lab = make_lab(workers=2)
    wrapper = lab.folder / "python-wrapper"
    wrapper.write_text(f"""#!/bin/sh
case "$*" in
    *"-m cluster.vm.agent"*)
        case "$(hostname)" in
            *w001) echo "wrapper: the agent's interpreter crashed on purpose" >&2; exit 3 ;;
            *) echo "wrapper: the agent hangs on purpose" >&2
               exec {sys.executable} -c 'import time; time.sleep(3600)' "$@" ;;
        esac ;;
esac
exec {sys.executable} "$@"
""")
    wrapper.chmod(0o755)
    lab = reconfigure(lab, python=f'"{wrapper}"')
    t = time.monotonic()
    r = lab.fab("up", timeout=240)
    dead, hung = lab.config.vm_names()
    assert dead.endswith("w001"), lab.config.vm_names()
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(rf"^{dead}: FAILED: agent did not report: its agent \(pid \d+\) exited before it wrote a "
                     r"heartbeat to the share: see the end of its log below; the VM was stopped", r.stdout, re.M), r.stdout
    assert (f"{hung}: FAILED: agent did not report: its agent started but wrote no heartbeat to the share "
            "within 60s") in r.stdout, r.stdout
    assert f"last lines of {dead}'s agent.log:" in r.stdout and f"last lines of {hung}'s agent.log:" in r.stdout
    assert "| wrapper: the agent's interpreter crashed on purpose" in r.stdout, "read over SSH from the VM's disk"
    assert "| wrapper: the agent hangs on purpose" in r.stdout
    assert re.search(rf"^==> up: still waiting for 1 agent\(s\) to report \({hung}\): \d+ s of 60 s", r.stdout, re.M), \
        "no word while it waited"
    assert lab.statuses() == {dead: "TERMINATED", hung: "TERMINATED"}
    print(f"fab up gave up after {time.monotonic() - t:.0f}s")


# --- the idle guard holds in every state -------------------------------------------------


def _who_listens(port: int) -> str:
    """Which processes listen on `port` now (what answered a VM whose head was killed)."""
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
            try:
                p = psutil.Process(c.pid) if c.pid else None
                found.append(f"{c.laddr.ip}:{port} pid {c.pid}: {' '.join(p.cmdline()) if p else '?'}")
            except psutil.Error:
                found.append(f"{c.laddr.ip}:{port} pid {c.pid}: gone")
    return "\nlistening on the head's port now: " + ("; ".join(found) or "nothing")


def test_a_vm_that_cannot_mount_at_boot_stops_itself_within_idle_timeout(make_lab):
    lab = make_lab(workers=1, idle_timeout=IDLE_S)
    lab.fab_ok("up")
    vm = lab.config.vm_names()[0]
    head = json.loads((lab.settings.state_dir / "head" / "sshd.json").read_text())
    init = psutil.Process(head["pid"])
    wrapper = init.parent()  # the `unshare` that started the head's namespaces
    os.kill(head["pid"], signal.SIGKILL)  # the head is gone: no mount can be made
    try:  # and the wrapper with it, so nothing of the head is left to answer
        if wrapper is not None and wrapper.cmdline()[:1] == ["unshare"]:
            wrapper.kill()
    except psutil.NoSuchProcess:
        pass  # it ended with its child
    lab.wait_for("the head to stop listening", lambda: not listening(lab.config.head.address, lab.config.head.port),
                 timeout=15)
    lab.provider.preempt([vm])
    t0 = time.monotonic()
    lab.provider.start([vm])  # its own boot: the guard first, then a mount that fails
    home = lab.provider.vm_home(vm)
    took = stopped_within(lab, vm, since=t0, limit=IDLE_S + SLACK_S)
    console = (home.parent / "console.log").read_text()
    if "mount: FAILED to mount" not in console:
        sshfs = home / "sshfs.log"
        procs = "; ".join(f"{p.pid}: {cmdline(p)}" for p in lab.provider.processes(vm))
        raise AssertionError(console[-2000:] + _who_listens(lab.config.head.port) + "\nsshfs.log: "
                             + (sshfs.read_text()[-1500:] if sshfs.exists() else "none") + "\nVM processes: " + procs)
    guard = (home / "watchdog.log").read_text()
    assert f"no useful work for {IDLE_S}s (idle): powering off" in guard, guard
    assert lab.provider.processes(vm) == []
    print(f"a VM that could not mount stopped itself {took:.0f}s after its boot (idle_timeout {IDLE_S}s)")


def test_a_vm_whose_agent_died_for_good_stops_itself_though_a_key_still_runs(make_lab):
    lab = make_lab(workers=1, idle_timeout=IDLE_S)
    (lab.share / "in").mkdir(parents=True)
    (lab.share / "in" / "a.txt").write_text("a\n")
    lab.fab_ok("up")
    vm = lab.config.vm_names()[0]
    lab.fab_ok("run", "sleep 600 && cp {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt")
    lab.wait_for("the key to run", lambda: any(cmdline(p) == "sleep 600"
                                               for p in lab.provider.processes(vm)), timeout=60)
    time.sleep(IDLE_S + 5)
    assert lab.statuses() == {vm: "RUNNING"}, "a VM whose key runs is busy, not idle"
    agent = next(p for p in lab.provider.processes(vm) if "-m cluster.vm.agent" in cmdline(p))
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    t0 = time.monotonic()
    took = stopped_within(lab, vm, since=t0, limit=IDLE_S + SLACK_S)
    assert "(idle): powering off" in (lab.provider.vm_home(vm) / "watchdog.log").read_text()
    print(f"with its agent dead, the VM stopped itself {took:.0f}s later")


def test_the_guard_is_started_again_if_it_dies(make_lab):
    lab = make_lab(workers=1, idle_timeout=120)
    lab.fab_ok("up")
    vm = lab.config.vm_names()[0]
    guard = next(p for p in lab.provider.processes(vm) if "watchdog.sh" in cmdline(p))
    guard.send_signal(signal.SIGKILL)
    guard.wait(10)
    lab.wait_for("the agent to start the guard again", lambda: any(
        "watchdog.sh" in cmdline(p) for p in lab.provider.processes(vm)), timeout=60)
    assert "the idle guard is not running: starting it again" in (
        lab.share / CLUSTER_DIR / "logs" / vm / "agent.log").read_text()


# --- the worker count is said, and forgotten by down ---------------------------------------


def test_fab_up_says_when_the_remembered_count_differs_and_down_forgets_it(make_lab):
    lab = make_lab(workers=2)
    lab.fab_ok("up", "--count", "1")
    again = lab.fab_ok("up")
    assert ("==> up: 1 VMs, as the last `fab up --count 1` asked; cluster.toml says workers = 2: "
            "`fab up --count 2` follows it (and `fab down` forgets the count)") in again, again
    assert sorted(lab.statuses()) == lab.config.vm_names(1)
    lab.fab_ok("down")
    third = lab.fab_ok("up")
    assert "as the last" not in third and sorted(lab.statuses()) == lab.config.vm_names(2)


# --- mistakes are refused before anything is created ---------------------------------------


def test_a_typo_in_cluster_toml_is_refused_before_anything_is_created(make_lab):
    lab = make_lab(workers=2)
    toml = lab.folder / "cluster.toml"
    toml.write_text(toml.read_text().replace("idle_timeout = ", "idle_timout = "))
    r = lab.fab("up")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == f"error: {toml}: [cluster] idle_timout is not a known key; did you mean idle_timeout?"
    assert lab.statuses() == {} and lab_processes(lab.folder) == [], "nothing was created, not even the head"


def fab(args: list[str], toml: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPOTFAN_CONFIG": str(toml)}
    return subprocess.run([str(FAB), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, line", [
    (["up", "--count", "two"], "error: --count 'two' is not a whole number of at least 0: type e.g. `fab up --count 3`"),
    (["run", "m:f", "--workers-per-vm", "two"],
     "error: --workers-per-vm 'two' is not a whole number of at least 0: type e.g. `fab run SPEC --workers-per-vm 4`"),
    (["run", "m:f", "--timeout", "1h"],
     "error: --timeout '1h' is not a number of seconds (at least 0): type e.g. `fab run SPEC --timeout 600`"),
    (["status", "--watch", "--interval", "soon"],
     "error: --interval 'soon' is not a number of seconds (at least 1): type e.g. `fab status --watch --interval 5`"),
    (["preempt", "--count", "-1"], "error: --count '-1' is not a whole number of at least 1: type e.g. `fab preempt --count 2`"),
    (["up", "--bogus"], "error: No idea what '--bogus' is!: `fab --list` shows the commands, `fab TASK --help` a command's options"),
])
def test_a_usage_error_exits_2_with_one_line_that_says_what_to_type(tmp_path, args, line):
    if not FAB.exists():
        pytest.skip(f"no `fab` next to {sys.executable}")
    toml = tmp_path / "cluster.toml"
    toml.write_text('[cluster]\nname = "u"\n[head]\naddress = "127.0.0.1"\nshare = "share"\n')
    r = fab(args, toml)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", line + "\n")


def test_fab_task_help_shows_that_tasks_help(tmp_path):
    if not FAB.exists():
        pytest.skip(f"no `fab` next to {sys.executable}")
    r = fab(["run", "--help"], tmp_path / "none.toml")
    assert r.returncode == 0, r.stderr
    assert "Start a task on every VM" in r.stdout and "--wait-timeout" in r.stdout and "--timeout" in r.stdout


# --- status tells the truth ------------------------------------------------------------------

MOUNT_DEAD_BOUND_S = 10  # a killed sshfs must show in the agent's heartbeat within this (see the test)
MOUNT_DEAD_POLL_S = 0.1
STATUS_TRIES = 40  # `fab status` calls until it shows what the VM's heartbeat already says


def _local_beat(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or mid-write
        return {}


def test_a_killed_sshfs_shows_as_mount_dead_and_the_agent_mounts_again(make_lab):
    from cluster.records import HEARTBEAT_INTERVAL_S, STALE_S

    lab = make_lab(workers=1, idle_timeout=300)
    lab.fab_ok("up")
    vm = lab.config.vm_names()[0]
    beat_file = lab.provider.vm_home(vm) / "heartbeat.json"
    sshfs = next(p for p in lab.provider.processes(vm) if p.name() == "sshfs")
    sshfs.send_signal(signal.SIGKILL)
    killed_at, t0 = time.time(), time.monotonic()
    # The agent notices at its next mount check (every heartbeat interval) and says so in its
    # next local heartbeat: timed on the VM's own file, not through `fab status`, whose own
    # start-up (seconds on a loaded machine) is no part of the agent's reaction.
    seen = None
    while seen is None and time.monotonic() - t0 < 6 * MOUNT_DEAD_BOUND_S:
        if _local_beat(beat_file).get("state") == "mount-dead":
            seen = time.monotonic() - t0
        time.sleep(MOUNT_DEAD_POLL_S)
    assert seen is not None, _local_beat(beat_file)
    print(f"mount-dead in the VM's heartbeat {seen:.1f}s after the kill (heartbeat every "
          f"{HEARTBEAT_INTERVAL_S:g}s, share copy stale after {STALE_S:g}s)")
    assert seen <= MOUNT_DEAD_BOUND_S
    beat = _local_beat(beat_file)
    assert beat["state"] == "mount-dead" and beat["mount"] == "dead"
    # `fab status` reads that heartbeat over SSH from the VM's own disk (the share's copy is stale).
    for _ in range(STATUS_TRIES):
        st = json.loads(lab.fab_ok("status", "--json"))
        (v,) = st["vms"]
        if v["agent"] == "mount-dead":
            break
    assert v["agent"] == "mount-dead", st
    assert v["heartbeat_from"] == "vm", "read over SSH from the VM's own disk: the share's copy is stale"
    text = lab.fab_ok("status")
    assert re.search(rf"{vm} .* RUNNING .* agent mount-dead .* heartbeat \d+s ago \(on the VM\)", text), text
    # The agent mounts the share again by itself, after a jittered backoff.
    lab.wait_for("the agent to mount the share again", lambda: json.loads(
        lab.fab_ok("status", "--json"))["vms"][0]["agent"] == "idle", timeout=90)
    assert "mounting the share again (try 1): mount: ok (remounted a dead mount)" in (
        lab.provider.vm_home(vm) / "agent.log").read_text()
    assert "share usable again (after 1 remount(s))" in (lab.share / CLUSTER_DIR / "logs" / vm / "agent.log").read_text()
    assert killed_at < time.time()


def test_status_after_down_says_no_vm_is_left_and_every_json_is_json_only(make_lab, tmp_path):
    lab = make_lab(workers=1)
    (lab.share / "in").mkdir(parents=True)
    (lab.share / "in" / "a.txt").write_text("a\n")
    up = lab.fab("up", "--json")
    assert up.returncode == 0, up.stderr
    (report,) = json.loads(up.stdout)  # only JSON on stdout; the progress went to stderr
    assert report["action"] == "created" and "agent: ok (started" in report["boot"]
    assert "==> up:" in up.stderr
    heal = lab.fab("heal", "--json")
    assert heal.returncode == 0 and json.loads(heal.stdout)[0]["action"] == "running"
    assert json.loads(lab.fab_ok("exec", "--json", "hostname"))
    lab.fab_ok("run", "cp {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt", "--wait",
               "--wait-timeout", "120")
    st = json.loads(lab.fab_ok("status", "--json"))
    (run,) = st["runs"]
    assert run["result"] == "done" and run["requested"] <= run["started"] <= run["ended"], run
    assert st["billing"] == {"items": [], "per_hour": None}
    text = lab.fab_ok("status")
    assert re.search(rf"run {run['id']}: done: 1/1 done.*\(requested \S+ \S+, started \S+ \S+, ended \S+ \S+, "
                     r"took \d+m\d\ds\)", text), text
    assert "billing now: nothing (lab VMs run on this machine)" in text

    lab.fab_ok("down")
    r = lab.fab("status")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"cluster {lab.config.name} (lab): no VM is left (`fab up` creates them)" in r.stdout
    j = lab.fab("status", "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["vms"] == []

    # A failing `fab up --json`: still only JSON on stdout, the error on stderr.
    broken = reconfigure(lab, python='"/nonexistent/python"')
    f = broken.fab("up", "--json")
    assert f.returncode == 1
    failed = json.loads(f.stdout)
    assert "does not exist on this VM" in failed[broken.config.vm_names()[0]]["error"]


# --- with the engine's state file and per-key timeout (tasks/, merged separately) -----------


def engine_takes(option: str) -> bool:
    out = subprocess.run([sys.executable, "-m", "tasks", "run", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    return option in out.stdout


@pytest.mark.skipif(not engine_takes("--state-file"), reason="this engine's `tasks run` has no --state-file yet")
def test_a_vm_that_only_waits_on_a_peers_key_stops_itself(make_lab):
    lab = make_lab(workers=2, idle_timeout=IDLE_S)
    (lab.share / "in").mkdir(parents=True)
    (lab.share / "in" / "slow.txt").write_text("slow\n")
    lab.fab_ok("up")
    lab.fab_ok("run", "sleep 180 && cp {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt")
    running = {}
    lab.wait_for("one VM to run the key", lambda: running.update(
        # the key's own `sleep`: every VM's `tasks run --cmd 'sleep 180 && ...'` has the words too
        {n: any(cmdline(p) == "sleep 180" for p in lab.provider.processes(n)) for n in lab.config.vm_names()})
        or any(running.values()), timeout=60)
    worker = next(n for n, r in running.items() if r)
    waiter = next(n for n in lab.config.vm_names() if n != worker)
    t0 = time.monotonic()
    stopped_within(lab, waiter, since=t0, limit=IDLE_S + SLACK_S)
    assert lab.statuses()[worker] == "RUNNING", "the VM whose key runs is busy"


@pytest.mark.skipif(not engine_takes("--timeout"), reason="this engine's `tasks run` has no --timeout yet")
def test_a_key_that_sleeps_forever_is_ended_by_fab_run_timeout_and_the_vm_stops(make_lab):
    lab = make_lab(workers=1, idle_timeout=IDLE_S)
    (lab.share / "in").mkdir(parents=True)
    (lab.share / "in" / "hang.txt").write_text("hang\n")
    lab.fab_ok("up")
    r = lab.fab("run", "sleep 100000 && cp {src} {out}", "--src", "in/*.txt", "--out", "out/{stem}.txt",
                "--timeout", "3", "--max-attempts", "2", "--wait", "--wait-timeout", "120", timeout=200)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"run r[\w-]+: failed \(0/1 done, 1 failed\)", r.stdout), r.stdout
    assert "timed out after 3" in lab.fab_ok("failures")
    t0 = time.monotonic()
    stopped_within(lab, lab.config.vm_names()[0], since=t0, limit=IDLE_S + SLACK_S)


# --- the head is ready for a fleet ------------------------------------------------------------


def test_the_fleet_settings_are_valid_sshd_config_and_head_setup_prints_them(tmp_path):
    from cluster import jail
    from cluster.ssh_keys import ensure_key_pair

    if not os.access("/usr/sbin/sshd", os.X_OK):
        pytest.skip("no /usr/sbin/sshd to check the settings with")
    key = ensure_key_pair(tmp_path / "host_key", comment="check")
    for workers, begin in ((1, 42), (64, 138), (65, 266), (250, 522)):
        lines = jail.fleet_sshd_settings(workers)
        assert lines[0] == f"MaxStartups {begin}:30:{2 * begin}"
        (tmp_path / "sshd_config").write_text(f"HostKey {key}\n" + "".join(f"{ln}\n" for ln in lines))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        t = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(tmp_path / "sshd_config")], capture_output=True,
                           text=True)
        assert t.returncode == 0, t.stderr  # this machine's OpenSSH takes every line
        effective = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(tmp_path / "sshd_config")],
                                   capture_output=True, text=True).stdout
        assert f"maxstartups {begin}:30:{2 * begin}" in effective
    toml = tmp_path / "cluster.toml"
    toml.write_text('[cluster]\nname = "h"\nprovider = "gce"\nworkers = 8\n[head]\naddress = "10.0.0.2"\n'
                    'share = "/data/h"\n[ssh]\nkey = "keys/laptop"\nworker_key = "keys/worker"\n'
                    '[gce]\nproject = "p"\nzones = ["us-central1-a"]\nimage = "i"\n')
    if not FAB.exists():
        return
    default = fab(["head-setup"], toml)
    assert default.returncode == 0 and "MaxStartups 42:30:84" in default.stdout, default.stderr
    big = fab(["head-setup", "--count", "64"], toml)
    assert "MaxStartups 138:30:276" in big.stdout and "/etc/ssh/sshd_config.d/00-spotfan-fleet.conf" in big.stdout


def test_the_lab_head_is_sized_for_the_fleet_and_a_resize_keeps_the_mounts(make_lab):
    from cluster import lifecycle

    lab = make_lab(workers=1)
    lab.fab_ok("up")
    head = lab.settings.state_dir / "head"
    assert "MaxStartups 42:30:84\n" in (head / "sshd_config").read_text()
    pid = json.loads((head / "sshd.json").read_text())["pid"]
    with lab.cluster() as cluster:
        lifecycle.prepare(cluster, workers=40)  # what `fab up --count 40` does first
    assert "MaxStartups 138:30:276\n" in (head / "sshd_config").read_text()
    assert json.loads((head / "sshd.json").read_text())["pid"] == pid, "reloaded, not restarted"
    out = lab.fab_ok("exec", 'sh "$SPOTFAN_HOME/mount.sh" check')
    assert "mount: ok" in out, "the VMs' mounts outlive the reload"
    (lab.share / "after-reload.txt").write_text("still served\n")
    assert "still served" in lab.fab_ok("exec", f"cat {lab.config.mount_point}/after-reload.txt")


# --- a run no VM can make progress on is shown stuck, with its runners' error -----------

RO_TASKS = '''
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i}" for i in range(4)], out="ro/{key}.txt")
def ro(key: str, out: Path) -> None:
    out.write_text(key)
'''


def test_a_run_every_vm_gave_up_on_is_shown_stuck_with_its_error_and_ends_the_wait(make_lab, tmp_path) -> None:
    # The outputs' folder refuses writes (an environment fault: exit 3, no key charged). Each
    # agent restarts its runner 5 times, then gives up; nothing will start the run again, so
    # `fab run --wait` must not wait out its timeout, and `fab status` must not say "running".
    lab = make_lab(workers=2)
    lab.fab_ok("up")
    assert lab.share is not None
    (lab.share / "ro").mkdir(mode=0o555)  # root's: the jailed user cannot write in it
    tasks = tmp_path / "ro_tasks.py"
    tasks.write_text(RO_TASKS)
    t0 = time.monotonic()
    r = lab.fab("run", "ro_tasks:ro", "--ship", str(tasks), "--wait", "--wait-timeout", "600", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.monotonic() - t0 < 200, "the wait went on after every VM gave up"
    vms = ", ".join(sorted(lab.config.vm_names()))
    assert re.search(rf"error: run r[-0-9a-f]+ is stuck: {vms} gave up: `tasks run` exited 3: error: the run "
                     r"root could not be used: .*refuses writes under .*ro.*no key was charged an attempt", r.stderr), \
        r.stdout + r.stderr
    assert re.search(rf"^ +{vms} restarting \([0-9-]+ so far\): `tasks run` exited 3: error: ", r.stdout, re.M), r.stdout
    st = lab.fab_ok("status")
    assert re.search(r"run r[-0-9a-f]+: stuck \(every VM gave up on it\): 0/4 done, 0 failed", st), st
    assert f"    {vms} gave up: `tasks run` exited 3: error: " in st
    assert "fix what the error says, then `fab run` the same task again" in st
    failed = lab.share / ".spotfan/tasks/ro/failed"
    assert not failed.exists() or not any(failed.iterdir()), "a key was charged for the folder's fault"
    assert os.listdir(lab.share / "ro") == []
