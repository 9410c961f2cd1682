"""`fab push` / `fab pull` against a real lab head, and `fab run --dry-run` on its VM."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from labs import FAB, REPO

ODD_NAMES = ["plain.txt", "with space.txt", "it's \"quoted\".txt", "ünïcødé-ß.txt", "new\nline.txt",
             "-starts-with-dash", "$(touch pwned)", ".hidden", "sub dir/deeper/x;y&z.bin", "empty"]
BIG = 12 * 1024 * 1024  # a file big enough to interrupt halfway at --bwlimit
KILL_TIMEOUT_S = 60
FOLDER_FILES, FOLDER_FILE_BYTES = 30, 100_000  # a folder pushed at --bwlimit 400: 7.5 s
COPIERS_GONE_S = 3  # a killed push's sftp and ssh processes are gone this soon


def make_tree(top: Path) -> dict[str, bytes]:
    data = {}
    for i, name in enumerate(ODD_NAMES):
        p = top / name
        p.parent.mkdir(parents=True, exist_ok=True)
        body = b"" if name == "empty" else (f"{i}:{name}\n".encode() * (i * 300 + 1))
        p.write_bytes(body)
        data[name] = body
    (top / "empty folder").mkdir()
    (top / "link").symlink_to("plain.txt")
    return data


def files_under(top: Path) -> dict[str, bytes]:
    return {p.relative_to(top).as_posix(): p.read_bytes() for p in top.rglob("*")
            if p.is_file() and not p.is_symlink()}


def test_push_and_pull_a_tree_of_odd_names_then_dry_run_it(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    src = tmp_path / "in put"
    src.mkdir()
    data = make_tree(src)
    (lab.share / "pwned").unlink(missing_ok=True)

    out = lab.fab_ok("push", str(src), "--to", "inputs/batch 1", "--json")
    summary = json.loads(out.splitlines()[-1])
    assert (summary["files"], summary["copied"], summary["skipped"], summary["failed"]) == (len(data), len(data), 0, {})
    assert summary["not_files"] == ["link"] and summary["bytes"] == sum(map(len, data.values()))
    dest = lab.share / "inputs" / "batch 1"
    assert files_under(dest) == data
    assert (dest / "empty folder").is_dir() and not (dest / "link").exists()
    assert not (lab.share / "pwned").exists() and not (tmp_path / "pwned").exists()
    assert not [p for p in dest.rglob("*spotfan-part")], "a part file was left behind"
    for name in data:  # mtimes kept (whole seconds), so the next push can skip by size and mtime
        assert int((dest / name).stat().st_mtime) == int((src / name).stat().st_mtime)

    # Again: nothing copied. One file changed (same size, other mtime): only it is copied.
    again = json.loads(lab.fab_ok("push", str(src), "--to", "inputs/batch 1", "--json").splitlines()[-1])
    assert (again["copied"], again["skipped"]) == (0, len(data))
    (src / "plain.txt").write_bytes(data["plain.txt"].upper())
    os.utime(src / "plain.txt", (1_000_000_000, 1_000_000_000))
    (dest / "with space.txt").write_bytes(data["with space.txt"][::-1])  # same size and mtime as before?
    os.utime(dest / "with space.txt", ((src / "with space.txt").stat().st_mtime,) * 2)
    third = lab.fab_ok("push", str(src), "--to", "inputs/batch 1")
    assert f"pushed 1 file(s)" in third and f"{len(data) - 1} already there" in third, third
    assert (dest / "plain.txt").read_bytes() == data["plain.txt"].upper()
    assert (dest / "with space.txt").read_bytes() == data["with space.txt"][::-1], "size+mtime match: skipped"
    checked = json.loads(lab.fab_ok("push", str(src), "--to", "inputs/batch 1", "--checksum", "--json").splitlines()[-1])
    assert checked["copied"] == 1 and (dest / "with space.txt").read_bytes() == data["with space.txt"]

    # The same tree through paramiko alone (where OpenSSH's sftp client is missing): the same result.
    by_paramiko = json.loads(lab.fab_ok("push", str(src), "--to", "inputs/paramiko", "--engine", "paramiko",
                                        "--json").splitlines()[-1])
    assert (by_paramiko["copied"], by_paramiko["failed"]) == (len(data), {})
    assert files_under(lab.share / "inputs" / "paramiko") == files_under(dest)
    bad = lab.fab("push", str(src), "--engine", "rsync")
    assert bad.returncode == 2 and "--engine 'rsync' must be one of auto, openssh, paramiko" in bad.stderr, bad.stderr

    # Pull it back into a new folder here: the same bytes; the share's names are kept as they are.
    back = tmp_path / "back"
    pulled = json.loads(lab.fab_ok("pull", "inputs/batch 1", "--to", str(back), "--json").splitlines()[-1])
    assert pulled["copied"] == len(data)
    assert files_under(back) == {**data, "plain.txt": data["plain.txt"].upper()}
    assert (back / "empty folder").is_dir()
    one = lab.fab_ok("pull", "inputs/batch 1/sub dir/deeper/x;y&z.bin", "--to", str(tmp_path))
    assert "pulled 1 file(s)" in one and (tmp_path / "x;y&z.bin").read_bytes() == data["sub dir/deeper/x;y&z.bin"]

    bad = lab.fab("push", str(src), "--to", "../outside")
    assert bad.returncode == 2 and "below the share's root" in bad.stderr
    missing = lab.fab("pull", "no/such/thing")
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr

    # A dry run of a command over what was pushed: said by the VM, nothing requested or written.
    agents = lab.share / ".spotfan" / "cluster"  # the VM's agent keeps writing its heartbeat and logs there

    def share_state():
        state = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in lab.share.rglob("*")
                 if not p.is_relative_to(agents)}
        return state, sorted((agents / "runs").iterdir()) if (agents / "runs").exists() else []

    before = share_state()
    dry = lab.fab("run", "cp {src} {out}", "--src", "inputs/batch 1/*.txt", "--out", "copies/{stem}.txt",
                  "--max-attempts", "2", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "==> run: --cmd 'cp {src} {out}' --src 'inputs/batch 1/*.txt' --out 'copies/{stem}.txt' " \
           "--max-attempts 2" in dry.stdout
    assert ": 5 keys, 0 done, 0 failed, 5 left" in dry.stdout, dry.stdout
    assert re.search(r"\n  'plain.txt'\n    \$ cp '/\S+/inputs/batch 1/plain.txt' /\S+/copies/plain.txt\n", dry.stdout)
    assert "1 worker(s), adaptive chunks" in dry.stdout
    assert "==> run: dry run; nothing was requested" in dry.stdout
    assert share_state() == before, "fab run --dry-run changed the share or requested a run"


def test_an_interrupted_push_never_shows_a_partial_file_and_resumes(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(BIG))
    final = lab.share / "data" / "big.bin"
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}
    proc = subprocess.Popen([str(FAB), "push", str(big), "--to", "data/big.bin", "--bwlimit", "2000"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        parts: list[Path] = []
        while time.monotonic() < deadline:
            assert not final.exists(), "the final name appeared before the copy was whole"
            parts = list((lab.share / "data").glob(".big.bin.*.spotfan-part")) if (lab.share / "data").exists() else []
            if parts and parts[0].stat().st_size > BIG // 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the push never got a third of the way")
        copiers = psutil.Process(proc.pid).children(recursive=True)  # its sftp and ssh processes
        assert any(c.name() == "sftp" for c in copiers), [c.name() for c in copiers]
        proc.send_signal(signal.SIGKILL)  # as a laptop that sleeps or loses power
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # Sooner than the rest of the copy would take at --bwlimit (2/3 of 12 MB at 2 MB/s: 4 s).
    gone, alive = psutil.wait_procs(copiers, timeout=COPIERS_GONE_S)
    assert alive == [], f"copies went on after the push was killed: {alive}"
    assert not final.exists() and len(parts) == 1
    kept = parts[0].stat().st_size

    resumed = json.loads(lab.fab_ok("push", str(big), "--to", "data/big.bin", "--json").splitlines()[-1])
    assert resumed["copied"] == 1 and resumed["resumed"] == 1
    assert resumed["bytes"] == BIG - kept, "the resumed push sent again what was already there"
    assert final.read_bytes() == big.read_bytes()
    assert list((lab.share / "data").glob("*.spotfan-part")) == []

    # A new folder fills beside its name and appears whole, at once; killed, it continues.
    tree = tmp_path / "tree"
    for i in range(FOLDER_FILES):
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 3}" / f"f{i:03d}.bin").write_bytes(os.urandom(FOLDER_FILE_BYTES))
    want = files_under(tree)
    final_dir, staging = lab.share / "data" / "tree", lab.share / "data" / ".tree.spotfan-part"
    proc = subprocess.Popen([str(FAB), "push", str(tree), "--to", "data/tree", "--jobs", "1", "--bwlimit", "400"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while time.monotonic() < deadline:
            assert not final_dir.exists(), "the folder appeared before every file of it was whole"
            if staging.exists() and len(files_under(staging)) >= FOLDER_FILES // 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            raise AssertionError("the folder push never got a third of the way")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    time.sleep(1)
    assert not final_dir.exists() and staging.is_dir()
    again = json.loads(lab.fab_ok("push", str(tree), "--to", "data/tree", "--json").splitlines()[-1])
    assert again["skipped"] >= FOLDER_FILES // 3 - 1 and again["copied"] + again["skipped"] == FOLDER_FILES, again
    assert files_under(final_dir) == want and not staging.exists()
    for rel in want:  # mtimes kept, so the next push skips them all
        assert int((final_dir / rel).stat().st_mtime) == int((tree / rel).stat().st_mtime)
    assert json.loads(lab.fab_ok("push", str(tree), "--to", "data/tree", "--json").splitlines()[-1])["skipped"] == FOLDER_FILES


MANY_FILES, MANY_FILE_BYTES = 4000, 25_000  # enough that a push is still going when it is killed
SEEN_BEFORE_KILL = 50  # files whole at the destination before the push is killed
OLD_MTIME = 1_500_000_000


def _kill_when(proc: subprocess.Popen, ready, what: str) -> list[psutil.Process]:
    """SIGKILL `proc` once `ready()` is true (its ssh children returned), failing if it ended first."""
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while time.monotonic() < deadline:
            if ready():
                break
            assert proc.poll() is None, f"the push ended before {what}: {proc.communicate()}"
            time.sleep(0.005)
        else:
            raise AssertionError(f"the push never got to {what}")
        copiers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return copiers


def test_a_pipelined_push_killed_midway_shows_no_partial_file_and_a_rerun_completes_it(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    tree = tmp_path / "many"
    for i in range(MANY_FILES):
        (tree / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        f = tree / f"d{i % 4}" / f"f {i:05d}.bin"
        f.write_bytes(os.urandom(MANY_FILE_BYTES))
        os.utime(f, (OLD_MTIME, OLD_MTIME))  # a copy showing it has had its last write (FSETSTAT comes after)
    want = files_under(tree)
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}

    def count(folder: Path) -> int:
        """Files there (not part files, which the push renames meanwhile) whose every byte has been written."""
        dirs = [folder / d for d in ("d0", "d1", "d2", "d3") if (folder / d).is_dir()]
        return sum(1 for d in dirs for e in os.scandir(d)
                   if not e.name.endswith("spotfan-part") and e.stat().st_mtime == OLD_MTIME)

    # A new folder: filled beside its name by the pipelined sessions, killed, never there half.
    final_dir, staging = lab.share / "data" / "many", lab.share / "data" / ".many.spotfan-part"
    proc = subprocess.Popen([str(FAB), "push", str(tree), "--to", "data/many"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    copiers = _kill_when(proc, lambda: staging.is_dir() and count(staging) >= SEEN_BEFORE_KILL,
                         f"{SEEN_BEFORE_KILL} files")
    assert any(c.name() == "ssh" for c in copiers) and not any(c.name() == "sftp" for c in copiers), \
        [c.name() for c in copiers]
    _, alive = psutil.wait_procs(copiers, timeout=COPIERS_GONE_S)
    assert alive == [], f"sessions went on after the push was killed: {alive}"
    assert not final_dir.exists() and staging.is_dir()
    again = json.loads(lab.fab_ok("push", str(tree), "--to", "data/many", "--json").splitlines()[-1])
    assert again["failed"] == {} and again["copied"] + again["skipped"] == MANY_FILES, again
    assert again["skipped"] >= SEEN_BEFORE_KILL // 2, again
    assert files_under(final_dir) == want and not staging.exists()
    for rel in want:  # mode and mtime set as `put -p` sets them: the next push skips every file
        src, dst = (tree / rel).stat(), (final_dir / rel).stat()
        assert (int(dst.st_mtime), dst.st_mode & 0o777) == (int(src.st_mtime), src.st_mode & 0o777), rel
    assert json.loads(lab.fab_ok("push", str(tree), "--to", "data/many", "--json").splitlines()[-1])["skipped"] \
        == MANY_FILES

    # Into a folder that exists: each file to its part name, renamed into place; killed, every
    # file at its final name is whole, and the rerun sends the rest and leaves no part file.
    into = lab.share / "data" / "into"
    lab.fab_ok("push", str(tree / "d0" / "f 00000.bin"), "--to", "data/into/seed.bin")
    proc = subprocess.Popen([str(FAB), "push", str(tree), "--to", "data/into"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _kill_when(proc, lambda: count(into) >= SEEN_BEFORE_KILL, f"{SEEN_BEFORE_KILL} files")
    time.sleep(COPIERS_GONE_S)  # what the head had received is written by now
    landed = {rel: body for rel, body in files_under(into).items() if rel != "seed.bin" and not rel.endswith("spotfan-part")}
    assert landed and all(want[rel] == body for rel, body in landed.items()), "a partial file at a final path"
    again = json.loads(lab.fab_ok("push", str(tree), "--to", "data/into", "--json").splitlines()[-1])
    assert again["failed"] == {} and again["copied"] + again["skipped"] == MANY_FILES, again
    assert files_under(into) == {**want, "seed.bin": want["d0/f 00000.bin"]}, "part files left behind, or files missing"


def test_a_refused_write_fails_the_push_with_a_clear_error(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(100_000))

    # A folder the share's user may not write in (root's): every file refused, said, exit 1.
    locked = lab.share / "locked"
    locked.mkdir()
    os.chmod(locked, 0o755)  # root's, as the test runs as root
    r = lab.fab("push", str(src), "--to", "locked")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "40 file(s) not copied" in r.stderr and "Permission denied" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "may not write there" in r.stdout + r.stderr
    assert os.listdir(locked) == []



def _slow_push_holding_its_lock(make_lab, tmp_path, size: int):
    """A lab, and a push of `size` random bytes to data/big.bin at 1 MB/s once it holds its lock:
    (lab, the source, the final path, the lock file, the push's process)."""
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(size))
    lock = lab.share / "data" / ".spotfan-push-lock.big.bin.spotfan-part"
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}
    proc = subprocess.Popen([str(FAB), "push", str(big), "--to", "data/big.bin", "--bwlimit", "1000"], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while not _written(lock):  # (made empty, then written: a push stopped between the two names no holder)
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the push never took its lock: {proc.communicate()}")
        time.sleep(0.02)
    return lab, big, lab.share / "data" / "big.bin", lock, proc


def _written(lock: Path) -> bool:
    try:
        return "token" in json.loads(lock.read_text())
    except (OSError, ValueError):
        return False


@contextmanager
def _stopped(proc: subprocess.Popen):
    """The push held still (SIGSTOP) with its lock, so that on a slow machine it cannot end
    while the pushes that must find it running are tried; it goes on afterwards. Its lock stays
    live: a lock of a process that is alive counts as held until STALE_S, on the head's clock."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGCONT)


def test_a_second_push_to_the_same_place_is_refused_while_the_first_runs_and_a_dead_ones_lock_is_taken_over(
        make_lab, tmp_path):
    from cluster.pushlock import STALE_S, machine

    lab, big, final, lock, first = _slow_push_holding_its_lock(make_lab, tmp_path, 4 << 20)
    try:
        # A cron script's next push, while the first still copies: refused, nothing of it written.
        with _stopped(first):
            second = lab.fab("push", str(big), "--to", "data/big.bin")
        said = second.stdout + second.stderr
        assert second.returncode == 1, said
        assert "another `fab push` to the share's data/big.bin is running" in said and "pid " in said, said
        assert first.poll() is None, "the first push should still be copying"
        out, err = first.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == 0, out + err
    assert final.read_bytes() == big.read_bytes() and not lock.exists()

    # A dead push's lock: another machine's, not rewritten for STALE_S on the head's clock, is
    # taken over; one of this machine whose process is gone, at once; a live one of another
    # machine is not.
    owner = final.parent.stat()
    cases = [('{"token": "x", "host": "laptop-2", "pid": 1}', STALE_S + 5, True),
             ('{"token": "x", "host": "%s", "pid": 999999999}' % socket.gethostname(), 0, False),
             ('{"token": "x", "host": "laptop-2", "pid": 1}', 0, False)]
    if machine():  # (a machine with no hardware address to name it by judges every lock by its lease)
        cases.insert(1, ('{"token": "x", "host": "h", "machine": "%s", "pid": 999999999}' % machine(), 0, True))
    for body, age, taken in cases:
        final.unlink(missing_ok=True)
        lock.write_text(body)
        os.chown(lock, owner.st_uid, owner.st_gid)
        os.utime(lock, (time.time() - age, time.time() - age))
        r = lab.fab("push", str(big), "--to", "data/big.bin")
        assert (r.returncode == 0) == taken, (body, r.stdout + r.stderr)
        assert final.exists() == taken and lock.exists() != taken, body
        if taken:
            assert final.read_bytes() == big.read_bytes()
        else:
            assert "is running (from " in r.stdout + r.stderr


def test_a_push_whose_lock_was_taken_over_stops_copying_and_says_why(make_lab, tmp_path):
    # A push stopped past the lease (a laptop that slept) whose lock another push took over.
    from cluster.pushlock import BEAT_S

    lab, big, final, lock, proc = _slow_push_holding_its_lock(make_lab, tmp_path, BIG)
    try:
        taken = time.monotonic()
        # Its new holder's, put in place as a takeover does (the old one moved away, a new file
        # made): a write into the same file would race the holder's own rewrite of it.
        theirs = lock.with_name("theirs.tmp")
        theirs.write_text('{"token": "theirs", "host": "laptop-2", "pid": 1}')
        owner = lock.stat()
        os.chown(theirs, owner.st_uid, owner.st_gid)
        os.replace(theirs, lock)
        out, err = proc.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 1, out + err
    assert time.monotonic() - taken < 3 * BEAT_S, "it went on copying long after its lock was taken"
    assert "another push to the share's data/big.bin took over" in out + err, out + err
    assert not final.exists(), "a push that lost its lock put its file in place"
    assert json.loads(lock.read_text())["token"] == "theirs", "the lock was taken back, or removed"


def test_a_push_into_the_shares_root_holds_its_lock_there(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    src = tmp_path / "inputs"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    (src / "b.txt").write_text("b\n")
    report = json.loads(lab.fab_ok("push", str(src), "--to", ".", "--json").splitlines()[-1])
    assert (report["copied"], report["failed"]) == (2, {}), report
    assert (lab.share / "a.txt").read_text() == "a\n" and (lab.share / "b.txt").read_text() == "b\n"
    assert not list(lab.share.glob(".spotfan-push-lock*")), "the lock was left behind"


def test_pushes_to_places_that_overlap_are_refused_while_one_runs(make_lab, tmp_path):
    # `fab push` to data/ while another push fills data/big.bin (and the reverse, by hand-made
    # locks): they would write the same files, so the later one refuses and writes nothing.
    from cluster.pushlock import STALE_S

    lab, big, final, lock, first = _slow_push_holding_its_lock(make_lab, tmp_path, 4 << 20)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "big.bin").write_bytes(b"another version")
    (folder / "other.txt").write_text("x\n")
    try:
        with _stopped(first):
            for to in ("data", "."):  # a folder above the running push's destination, and the root
                r = lab.fab("push", str(folder), "--to", to)
                said = r.stdout + r.stderr
                assert r.returncode == 1, said
                assert "another `fab push` to the share's data/big.bin is running" in said and "inside" in said, said
        assert first.poll() is None, "the first push should still be copying"
        out, err = first.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        first.kill()
        first.wait(timeout=30)
    assert first.returncode == 0, out + err
    assert final.read_bytes() == big.read_bytes(), "the refused pushes changed the running push's file"
    assert not (lab.share / "data" / "other.txt").exists() and not (lab.share / "other.txt").exists()

    # A push below a folder another push holds: refused while that lock is fresh, passed over
    # (and left alone) once it is stale.
    sub = tmp_path / "f.txt"
    sub.write_text("f\n")
    above = lab.share / ".spotfan-push-lock.data.spotfan-part"  # a push to the share's data
    owner = final.parent.stat()
    for age, ok in ((0, False), (STALE_S + 5, True)):
        above.write_text('{"token": "x", "host": "laptop-2", "pid": 1}')
        os.chown(above, owner.st_uid, owner.st_gid)
        os.utime(above, (time.time() - age, time.time() - age))
        r = lab.fab("push", str(sub), "--to", "data/sub/f.txt")
        said = r.stdout + r.stderr
        assert (r.returncode == 0) == ok, said
        assert (lab.share / "data" / "sub" / "f.txt").exists() == ok
        if not ok:
            assert "another `fab push` to the share's data is running (from laptop-2, pid 1" in said, said
            assert "which holds the share's data/sub/f.txt" in said, said
        assert above.exists(), "another push's lock was removed"
        assert not (lab.share / "data" / "sub" / ".spotfan-push-lock.f.txt.spotfan-part").exists()


def test_a_push_logs_in_with_the_clusters_kex_algorithms(make_lab, tmp_path):
    # [ssh] kex_algorithms reaches fab push's OpenSSH logins: one the head does not offer
    # fails the push (saying so, nothing at the final path), one it offers copies.
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    src = tmp_path / "inputs"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"{i}\n")
    (src / "big.bin").write_bytes(os.urandom(2 << 20))  # an `sftp -b` file as well as pipelined ones
    toml = lab.folder / "cluster.toml"
    default = toml.read_text()
    assert "kex_algorithms" not in default
    toml.write_text(default.replace("[ssh]\n", '[ssh]\nkex_algorithms = "diffie-hellman-group14-sha1"\n', 1))
    r = lab.fab("push", str(src), "--to", "inputs", "--engine", "openssh", "--json")
    said = r.stdout + r.stderr
    assert r.returncode == 1, said
    failed = json.loads(r.stdout.splitlines()[-1])["failed"]
    assert sorted(failed) == ["0.txt", "1.txt", "2.txt", "big.bin"], said  # none reported copied or left out
    assert all("no matching key exchange method" in why and "kex_algorithms" in why for why in failed.values()), said
    assert not (lab.share / "inputs").exists(), "a push that could not log in left files at the final path"
    toml.write_text(default.replace("[ssh]\n", '[ssh]\nkex_algorithms = "curve25519-sha256"\n', 1))
    report = json.loads(lab.fab_ok("push", str(src), "--to", "inputs", "--engine", "openssh", "--json")
                        .splitlines()[-1])
    assert (report["copied"], report["failed"]) == (4, {}), report
    assert files_under(lab.share / "inputs") == files_under(src)
