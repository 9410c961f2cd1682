"""Publishing over the runner's own SFTP session (tasks.direct), against a real sshd and real
SSHFS mounts: create-only, the probe, falling back to the mount when the session fails."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


from tasks.direct import COMMAND_ENV, Direct, Staged, remote_root
from tasks.errors import EnvironmentFault
from tasks.fs import probe_publish
from tasks.publish import Fence, Publisher
from tasks.records import read_logs
from tests.tasks.two_mounts import fresh, kill_session_when, sftp_command, two_machines  # noqa: F401 (fixtures)

DEADLINE_S = 240

TASKS = """
import time
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:04d}" for i in range(__N__)], out="out/{key}.txt")
def tiny(key: str, out: Path) -> None:
    time.sleep(__SLEEP__)
    out.write_text(key * 3)
"""


def write_tasks(root: Path, n: int, sleep: float) -> None:
    (root / "dt.py").write_text(TASKS.replace("__N__", str(n)).replace("__SLEEP__", str(sleep)))


def run(root: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "-v", "run", "dt:tiny", "--workers", "2"],
                            cwd=root, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def check_outputs(folder: Path, n: int) -> None:
    names = sorted(os.listdir(folder))
    assert len(names) == n
    assert all((folder / f).read_text() == f[:-4] * 3 for f in names), "an output is not whole"


def test_two_runners_publish_over_their_own_sessions(fresh) -> None:
    share, a, b = fresh
    n = 600
    write_tasks(share, n, 0.0)
    env = {COMMAND_ENV: sftp_command(share.parent)}
    procs = [run(m, env) for m in (a, b)]
    outs = [p.communicate(timeout=DEADLINE_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    check_outputs(share / "out", n)
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r["succeeded"] for r in reports) == n
    for out, report in zip(outs, reports):
        assert "publishing small outputs over a direct SFTP session" in out[1]
        sent = int(re.search(r"direct SFTP session sent (\d+) requests", out[1]).group(1))
        # create, write, close, rename per output: the session carried every publish
        assert sent >= 4 * report["succeeded"], (sent, report)
    per_key = Counter(r["key"] for r in read_logs(share / ".spotfan/tasks/tiny/log") if r["ok"])
    assert len(per_key) == n and max(per_key.values()) == 1
    assert os.listdir(share / ".spotfan/tmp") == [], "a runner left temporaries behind"


def _direct(share: Path, mount: Path, monkeypatch) -> Direct:
    monkeypatch.setenv(COMMAND_ENV, sftp_command(share.parent))
    tmp = mount / ".spotfan/tmp/me"
    tmp.mkdir(parents=True)
    remote = Direct.wanted(mount)
    assert remote is not None, "an sshfs mount's folder on the server is read from mountinfo"
    direct = Direct.start(root=mount, remote=remote, tmp=tmp, fallback=Publisher(
        mount, method=probe_publish(tmp), share_tmp=tmp, fsync=False))
    assert direct.session is not None and not direct.lost, "the probe refused a real OpenSSH server"
    return direct


def _stage(tmp_path: Path, name: str, data: bytes, out: str) -> Staged:
    local = tmp_path / name
    local.write_bytes(data)
    return Staged(name, local, out, Fence("unused", "0000", 0))


def test_a_published_output_is_never_replaced(fresh, tmp_path: Path, monkeypatch) -> None:
    share, a, _ = fresh
    (share / "out").mkdir()
    (share / "out/k1.txt").write_bytes(b"the peer's")
    inode = (share / "out/k1.txt").stat().st_ino
    direct = _direct(share, a, monkeypatch)
    try:
        got = direct.publish([_stage(tmp_path, "k1", b"late finisher", "out/k1.txt"),
                              _stage(tmp_path, "k2", b"mine" * 50_000, "out/deep/er/k2.txt")])
    finally:
        direct.close()
    assert got == ["theirs", "ours"]
    assert (share / "out/k1.txt").read_bytes() == b"the peer's"
    assert (share / "out/k1.txt").stat().st_ino == inode
    assert (share / "out/deep/er/k2.txt").read_bytes() == b"mine" * 50_000  # several WRITEs
    assert os.listdir(share / ".spotfan/tmp/me") == [], "a temporary was left on the share"
    assert os.listdir(tmp_path) == [], "a staged output was left on local disk"


def test_a_lost_temporary_folder_stops_the_run_not_the_key(fresh, tmp_path: Path,
                                                           monkeypatch) -> None:
    share, a, _ = fresh
    direct = _direct(share, a, monkeypatch)
    try:
        (share / ".spotfan/tmp/me").rmdir()  # a peer judged us dead and swept it
        got = direct.publish([_stage(tmp_path, "k1", b"x", "out/k1.txt")])
    finally:
        direct.close()
    assert isinstance(got[0], EnvironmentFault) and "vanished" in str(got[0])
    assert not (share / "out/k1.txt").exists()


def test_a_command_that_cannot_start_a_session_falls_back_to_the_mount(fresh) -> None:
    share, a, _ = fresh
    write_tasks(share, 50, 0.0)
    p = run(a, {COMMAND_ENV: "false"})
    out, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert "publishing through the mount (slower, as safe)" in err
    check_outputs(share / "out", 50)


def test_a_session_that_dies_mid_run_hands_over_to_the_mount(fresh) -> None:
    share, a, _ = fresh
    n = 400
    write_tasks(share, n, 0.01)
    p = run(a, {COMMAND_ENV: sftp_command(share.parent)})
    out = share / "out"
    killed = kill_session_when(p, lambda: out.is_dir() and len(os.listdir(out)) >= 40,
                               deadline_s=DEADLINE_S)
    assert killed is not None, "never saw the runner's SFTP session while it worked"
    out, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert "the direct SFTP session is gone" in err
    check_outputs(share / "out", n)


def test_the_server_path_of_a_root_comes_from_its_sshfs_mount(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / / rw - ext4 /dev/sda1 rw\n"
        "40 22 0:35 / /mnt/my\\040share rw,nosuid - fuse.sshfs w@10.0.0.1:/srv/share rw\n"
        "41 22 0:36 / /mnt/home rw - fuse.sshfs w@h: rw\n")
    assert remote_root(Path("/mnt/my share/run/x"), str(info)) == "/srv/share/run/x"
    assert remote_root(Path("/mnt/my share"), str(info)) == "/srv/share"
    assert remote_root(Path("/mnt/home/r"), str(info)) == "./r"  # the login's start folder
    assert remote_root(Path("/srv/local"), str(info)) is None


def test_listings_over_the_session_match_the_mount(fresh, monkeypatch) -> None:
    share, a, _ = fresh
    for folder, n in (("claims", 250), ("done", 7)):  # OpenSSH answers 100 names a page
        (share / folder).mkdir()
        for i in range(n):
            (share / folder / f"{i:04x}").touch()
    direct = _direct(share, a, monkeypatch)
    try:
        for _ in range(2):  # the second time it asks for the pages it saw the first
            got = direct.listings([a / "claims", a / "done", a / "missing"])
            assert got == [set(os.listdir(share / "claims")), set(os.listdir(share / "done")), set()]
        (share / "claims/0000").unlink()
        assert "0000" not in direct.listings([a / "claims"])[0]
    finally:
        direct.close()


BIG = """
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:02d}" for i in range(20)], out="out/{key}.bin")
def big(key: str, out: Path) -> None:
    out.write_bytes(key.encode() * 50_000)
"""


def test_a_full_share_stops_the_run_charges_nothing_and_the_rerun_finishes(fresh) -> None:
    """The share's disk fills while the runner publishes over its session: exit 3, no key
    charged, no partial output at a final path; after space is freed the rerun finishes."""
    share, a, _ = fresh
    disk = share / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "t.py").write_text(BIG)
        (disk / "ballast").write_bytes(b"\0" * (3 * 1024 * 1024))  # room for a few outputs
        env = {**os.environ, COMMAND_ENV: sftp_command(share.parent)}
        cmd = [sys.executable, "-m", "tasks", "-v", "run", "t:big", "--workers", "2"]
        p = subprocess.run(cmd, cwd=a / "disk", env=env, capture_output=True, text=True,
                           timeout=DEADLINE_S)
        assert p.returncode == 3, p.stderr
        assert "publishing small outputs over a direct SFTP session" in p.stderr
        assert "no space left on the device" in p.stderr, p.stderr[-2000:]
        assert "no key was charged an attempt" in p.stderr
        assert list((disk / ".spotfan/tasks/big/failed").iterdir()) == []
        done_before = os.listdir(disk / "out") if (disk / "out").exists() else []
        assert len(done_before) < 20, "the disk never filled up: the test proved nothing"
        assert all((disk / "out" / f).read_bytes() == f[:-4].encode() * 50_000 for f in done_before)
        (disk / "ballast").unlink()
        again = subprocess.run(cmd, cwd=a / "disk", env=env, capture_output=True, text=True,
                               timeout=DEADLINE_S)
        assert again.returncode == 0, again.stderr
        assert sorted(os.listdir(disk / "out")) == [f"k{i:02d}.bin" for i in range(20)]
        assert all((disk / "out" / f"k{i:02d}.bin").read_bytes() == f"k{i:02d}".encode() * 50_000
                   for i in range(20))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


SMALL = BIG.replace("50_000", "10")  # outputs the runner publishes over its session


def test_outputs_on_another_filesystem_stop_the_run_with_the_fix_and_charge_nothing(fresh) -> None:
    """The output folder is another filesystem on the share's server (a disk mounted under the
    run root): OpenSSH answers the rename with a bare FAILURE; the runner names the cause, exits
    3, charges no key; both over its session and through the mount alone. Once the outputs are
    on the run root's filesystem the same command finishes."""
    share, a, _ = fresh
    (share / "t.py").write_text(SMALL)
    (share / "out").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(share / "out")], check=True)
    cmd = [sys.executable, "-m", "tasks", "-v", "run", "t:big", "--workers", "2"]
    try:
        for env, said in [({COMMAND_ENV: sftp_command(share.parent)}, "on the share's server it is another "
                           f"filesystem than the run root {a}"),
                          ({}, f"cannot move outputs into {a / 'out'}: it is on another filesystem")]:
            p = subprocess.run(cmd, cwd=a, env={**os.environ, **env}, capture_output=True, text=True,
                               timeout=DEADLINE_S)
            assert p.returncode == 3, p.stderr[-3000:]
            assert said in p.stderr and "no key was charged an attempt" in p.stderr, p.stderr[-3000:]
            assert "key(s) failed" not in p.stderr
            assert list((share / ".spotfan/tasks/big/failed").iterdir()) == []
            assert os.listdir(share / "out") == [], "an output (or a temporary) reached the other disk"
    finally:
        subprocess.run(["umount", "-l", str(share / "out")], check=False)
    again = subprocess.run(cmd, cwd=a, env={**os.environ, COMMAND_ENV: sftp_command(share.parent)},
                           capture_output=True, text=True, timeout=DEADLINE_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(os.listdir(share / "out")) == [f"k{i:02d}.bin" for i in range(20)]


HOSTILE = ["a b", "ü-ñ-日本", "it's", 'q"uote', "new\nline", "-dash", "$(touch x)", "back\\slash",
           "tab\tkey", "%s%n"]


def test_hostile_names_are_published_as_they_are(fresh) -> None:
    share, a, _ = fresh
    (share / "hostile.py").write_text(
        "from pathlib import Path\nfrom tasks import filetask\n"
        f"@filetask(keys={HOSTILE!r}, out='out/{{key}}.txt')\n"
        "def h(key: str, out: Path) -> None:\n    out.write_text(key)\n")
    env = {**os.environ, COMMAND_ENV: sftp_command(share.parent)}
    p = subprocess.run([sys.executable, "-m", "tasks", "-v", "run", "hostile:h"], cwd=a, env=env,
                       capture_output=True, text=True, timeout=DEADLINE_S)
    assert p.returncode == 0, p.stderr
    assert "publishing small outputs over a direct SFTP session" in p.stderr
    assert "publishing through the mount" not in p.stderr
    assert sorted(os.listdir(share / "out")) == sorted(f"{k}.txt" for k in HOSTILE)
    assert all((share / "out" / f"{k}.txt").read_text() == k for k in HOSTILE)
    assert not (share / "x").exists() and not (a / "x").exists()


def test_a_big_chunk_is_published_in_batches_of_bounded_memory(fresh, tmp_path: Path,
                                                               monkeypatch) -> None:
    import tasks.direct
    monkeypatch.setattr(tasks.direct, "BATCH_BYTES", 120_000)  # 2 outputs a batch
    share, a, _ = fresh
    direct = _direct(share, a, monkeypatch)
    try:
        got = direct.publish([_stage(tmp_path, f"k{i}", bytes([i]) * 50_000, f"out/k{i}")
                              for i in range(5)])
    finally:
        direct.close()
    assert got == ["ours"] * 5
    assert all((share / f"out/k{i}").read_bytes() == bytes([i]) * 50_000 for i in range(5))


def test_a_session_that_sees_another_folder_fails_its_probe(fresh) -> None:
    """A real SFTP server whose view of the share's path is another (empty) folder: the
    runner must notice and publish through the mount."""
    share, a, _ = fresh
    write_tasks(share, 30, 0.0)
    other = f"mount -t tmpfs none {shlex.quote(str(share.parent))} && exec /usr/lib/openssh/sftp-server"
    p = run(a, {COMMAND_ENV: shlex.join(["unshare", "-m", "--propagation", "private", "sh", "-c", other])})
    out, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert "failed its check" in err and "publishing through the mount (slower, as safe)" in err, err
    check_outputs(share / "out", 30)


def _pipes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if link.startswith("pipe:"):
            out.add(link)
    return out


def test_a_fork_pool_is_forked_before_the_session_and_holds_none_of_its_pipes(fresh) -> None:
    # `--start-method fork` on a network root: workers forked after the session's ssh started
    # held its pipes, and one forked while that Popen ran held the pipe Popen waits on, so the
    # runner waited for ever (seen on a 4-VM lab). The workers are now forked first.
    import psutil

    share, a, _ = fresh
    write_tasks(share, 40, 0.25)
    proc = subprocess.Popen([sys.executable, "-m", "tasks", "-v", "run", "dt:tiny", "--workers", "2",
                             "--start-method", "fork"], cwd=a, env={**os.environ, COMMAND_ENV: sftp_command(share.parent)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not (share / "out").is_dir() or not os.listdir(share / "out"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        kids = psutil.Process(proc.pid).children()
        ssh = [k for k in kids if k.name() == "ssh"]
        workers = [k for k in kids if k.name() != "ssh"]
        assert len(ssh) == 1 and len(workers) == 2, [(k.pid, k.name()) for k in kids]
        theirs = _pipes(ssh[0].pid)
        for w in workers:
            assert not _pipes(w.pid) & theirs, f"worker {w.pid} holds the session's pipes"
        out, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "publishing small outputs over a direct SFTP session" in err
    check_outputs(share / "out", 40)
