"""The lab cluster through `fab`: idempotent up, unreachable VMs, host keys, dead mounts, idle stop."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

from cluster.records import CLUSTER_DIR
from labs import lab_processes


def init_pids(lab) -> dict[str, int]:
    return {i.name: lab.provider.processes(i.name)[0].pid for i in lab.provider.list()}


def test_up_twice_creates_nothing_new_and_count_resizes(make_lab):
    lab = make_lab(workers=3)
    first = lab.fab_ok("up")
    assert first.count(": created;") == 3, first
    assert first.count("mount: ok (mounted)") == 3 and first.count("agent: ok (started") == 3
    pids = init_pids(lab)

    second = lab.fab_ok("up")
    assert ": created" not in second and second.count(": running;") == 3, second
    assert "mount: ok (already mounted)" in second and "agent: ok (already running" in second
    assert init_pids(lab) == pids, "a second `fab up` must not restart any VM"

    shrunk = lab.fab_ok("up", "--count", "2")
    assert f"{lab.config.name}-w003: deleted" in shrunk
    assert sorted(lab.statuses()) == lab.config.vm_names(2)
    assert "up: 2 VMs working" in lab.fab_ok("up"), "the new count sticks"

    st = json.loads(lab.fab_ok("status", "--json"))
    assert [v["status"] for v in st["vms"]] == ["RUNNING", "RUNNING"]
    hostnames = lab.fab_ok("exec", "hostname")
    assert all(n in hostnames for n in lab.config.vm_names(2))

    assert "deleted 2 VMs" in lab.fab_ok("down")
    assert lab.statuses() == {}
    assert lab_processes(lab.folder) == [], "fab down must leave no VM or head process"
    assert "deleted 0 VMs" in lab.fab_ok("down"), "down is idempotent"


def test_vm_that_never_answers_ssh_is_named_and_others_go_on(make_lab):
    lab = make_lab(workers=3, connect_timeout=1, boot_timeout=3)
    lab.fab_ok("up")
    mute = lab.config.vm_names()[1]
    sshd = next(p for p in lab.provider.processes(mute) if p.name() == "sshd")
    sshd.send_signal(signal.SIGKILL)
    sshd.wait(5)
    # Something takes the address and accepts TCP but never speaks SSH (a hung VM).
    address = next(i.address for i in lab.provider.list() if i.name == mute)
    with socket.socket() as hole:
        hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hole.bind((address, 22))
        hole.listen(16)
        r = lab.fab("exec", "hostname", timeout=60)
        heal = lab.fab("heal", timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"==> {mute}: FAILED: {mute} ({address}:22) did not answer SSH" in r.stdout
    for other in set(lab.config.vm_names()) - {mute}:
        assert f"==> {other}: exit 0\n{other}\n" in r.stdout, "the other VMs' results must be shown"
    assert "failed on 1 of 3 VMs" in r.stderr
    assert heal.returncode == 1 and f"{mute}: FAILED" in heal.stdout and "never answered SSH" in heal.stdout
    assert heal.stdout.count("mount: ok (already mounted)") == 2, "heal goes on with the others"


def test_changed_host_key_is_refused(make_lab):
    lab = make_lab(workers=2)
    lab.fab_ok("up")
    victim = lab.config.vm_names()[0]
    key = lab.settings.state_dir / "vms" / victim / "ssh" / "ssh_host_ed25519_key"
    for f in (key, key.with_name(key.name + ".pub")):
        f.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    lab.provider.preempt([victim])
    lab.provider.start([victim])  # its sshd now presents the new key; the provider knows the old one

    for args in (("exec", "hostname"), ("up",)):
        r = lab.fab(*args)
        assert r.returncode == 3, (args, r.stdout, r.stderr)
        assert f"host key of {victim} ({lab.settings.address_prefix}" in r.stdout and "changed" in r.stdout
        assert "do not proceed" in r.stdout
    other = lab.config.vm_names()[1]
    assert f"==> {other}: exit 0" in lab.fab("exec", "hostname").stdout


def test_dead_mount_is_remounted_by_heal(make_lab):
    lab = make_lab(workers=2)
    lab.fab_ok("up")
    victim = lab.config.vm_names()[1]
    sshfs = next(p for p in lab.provider.processes(victim) if p.name() == "sshfs")
    sshfs.send_signal(signal.SIGKILL)
    sshfs.wait(5)

    check = 'sh "$SPOTFAN_HOME/mount.sh" check'
    r = lab.fab("exec", check)
    assert r.returncode == 1 and f"==> {victim}: FAILED" in r.stdout and "mount: dead" in r.stdout

    healed = lab.fab_ok("heal")
    assert f"{victim}: running; mount: ok (remounted a dead mount)" in healed
    assert f"VMs needed help ({victim})" in healed
    (lab.share / "probe.txt").write_text("hello from the head\n")
    out = lab.fab_ok("exec", f"cat {lab.config.mount_point}/probe.txt")
    assert out.count("hello from the head") == 2


SESSION = 'sh -c "$(sed "s/^ssh /ssh -v /" "$SPOTFAN_HOME/sftp.cmd")" </dev/null 2>&1; echo "rc=$?"'


def test_runners_session_rides_on_the_mounts_connection_and_connects_alone_without_it(make_lab):
    """sftp.cmd (the runner's own SFTP session) is a second channel on the mount's ssh
    connection; with that ssh killed (its socket left behind) it still connects by itself,
    and a remount brings the shared connection back."""
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    vm = lab.config.vm_names()[0]
    out = lab.fab_ok("exec", SESSION)
    assert "mux_client_request_session" in out and "rc=0" in out, out
    assert "Authenticated to" not in out, "the session made a connection of its own"

    master = next(p for p in lab.provider.processes(vm)
                  if p.name() == "ssh" and "ControlMaster=yes" in " ".join(p.cmdline()))
    master.send_signal(signal.SIGKILL)  # no clean-up: its control socket stays
    master.wait(5)
    out = lab.fab("exec", f'test -S "$SPOTFAN_HOME/mux.sock" && echo stale; {SESSION}').stdout
    assert "stale" in out and "Authenticated to" in out and "rc=0" in out, out

    # sshfs's `reconnect` starts a new ssh, which finds the socket taken and goes on without
    # multiplexing; a remount (as the agent and `fab heal` make of a dead mount) brings it back.
    lab.fab_ok("exec", 'sh "$SPOTFAN_HOME/mount.sh" remount')
    out = lab.fab_ok("exec", SESSION)
    assert "mux_client_request_session" in out and "rc=0" in out, out


def test_idle_vms_stop_themselves(make_lab):
    # The idle clock runs from boot, so `fab up` must see the agents first even on a busy machine
    lab = make_lab(workers=2, idle_timeout=10)
    lab.fab_ok("up")
    lab.wait_for("idle VMs to stop themselves",
                 lambda: set(lab.statuses().values()) == {"TERMINATED"}, timeout=60)
    for name in lab.config.vm_names():
        beat = json.loads((lab.share / CLUSTER_DIR / "vms" / f"{name}.json").read_text())
        assert beat["state"] == "stopped-idle"
        assert lab.provider.processes(name) == []
    st = json.loads(lab.fab_ok("status", "--json"))
    assert {v["status"] for v in st["vms"]} == {"TERMINATED"}
    assert all(not v["preempted"] for v in st["vms"]), "a self-stop is not a preemption"
    assert lab.fab_ok("heal").count(": started;") == 2, "heal starts stopped VMs again"


def test_what_a_command_fed_stdin_prints_just_before_it_exits_is_all_read(make_lab):
    # sshd may send a command's exit status before the last of its output (`fab up` once
    # read a failing boot.sh's lines as nothing at all): every byte must still arrive.
    from cluster.boot import hosts

    lab = make_lab(workers=1)
    lab.fab_ok("up")
    with lab.cluster() as cluster:
        host = hosts(cluster.provider.list())[0]
        with cluster.remote.open(host) as conn:
            for i in range(60):
                out = cluster.remote.run_on(conn, host, f'cat >/dev/null; echo "line {i}"; echo "err {i}" >&2; exit 3',
                                            stdin=b"x" * 1000, check=False)
                assert (out.exit_code, out.stdout, out.stderr) == (3, f"line {i}\n", f"err {i}\n"), i
            # A background process that keeps the output open delays the answer a moment, not
            # until it ends (the boot script's daemons redirect theirs, but one may not).
            t = time.monotonic()
            out = cluster.remote.run_on(conn, host, "cat >/dev/null; sleep 60 & echo started", stdin=b"x")
            assert out.stdout == "started\n" and time.monotonic() - t < 30
