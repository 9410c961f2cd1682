"""`fab push` of a very big file in ranges over several SFTP sessions (cluster.sftp_ranges), to a
real lab head: whole at its final path or not there, killed midway it continues from its journal,
and a damaged journal starts it afresh rather than trusting it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from cluster import sftp_ranges
from labs import FAB, REPO

BIG = sftp_ranges.RANGE_MIN_BYTES * 5 // 2  # 160 MB: in ranges, and long enough to kill midway
KILL_AFTER = 24 << 20  # journaled bytes before the push is killed
KILL_TIMEOUT_S = 120
COPIERS_GONE_S = 3
INTERRUPT_TAKEN_S = 1.0  # for the push's Python to take a SIGINT in while its sessions are still
OLD_MTIME = 1_500_000_000


def _big(tmp_path: Path) -> Path:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(BIG // (4 << 20)):
            f.write(os.urandom(4 << 20))
    big.chmod(0o640)
    os.utime(big, (OLD_MTIME, OLD_MTIME))
    return big


def _journaled(journal: Path) -> int:
    """Bytes the journal says the head answered (0 while it cannot be read whole)."""
    spans = sftp_ranges.bounds(BIG, sftp_ranges.SESSIONS)
    try:
        slots = sftp_ranges.parse_journal(journal.read_bytes(), spans)
    except OSError:
        return 0
    return sum(s - a for s, (a, _) in zip(slots, spans)) if slots else 0


def _push(big: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([str(FAB), "push", str(big), "--to", "data/big.bin", "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def _when_journaled(proc: subprocess.Popen, journal: Path, final: Path, at_least: int) -> None:
    """Return once the journal says `at_least` bytes are on the head; the final name never appears before."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while time.monotonic() < deadline:
        assert not final.exists(), "the final name appeared before the copy was whole"
        if _journaled(journal) >= at_least:
            return
        assert proc.poll() is None, f"the push ended before {at_least} bytes were journaled: {proc.communicate()}"
        time.sleep(0.002)
    raise AssertionError(f"the push never journaled {at_least} bytes")


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob(".big.bin.*.spotfan-part")) if folder.exists() else []


def test_a_big_file_goes_in_ranges_whole_and_a_killed_push_continues_from_its_journal(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    big = _big(tmp_path)
    data = lab.share / "data"
    final = data / "big.bin"
    part_name, journal_name = sftp_ranges.names(str(final), BIG, OLD_MTIME, sftp_ranges.SESSIONS)
    part, journal = Path(part_name), Path(journal_name)
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}

    # Ctrl-C: what is in flight is answered and journaled, the part kept, and the push says so.
    proc = _push(big, env)
    _when_journaled(proc, journal, final, KILL_AFTER)
    # Its sessions are held still while the push takes the Ctrl-C in (at 160 MB/s a loaded
    # machine's late signal found the file whole), then let go to answer what is in flight.
    sessions = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.name() == "ssh"]
    for s in sessions:
        s.suspend()
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(INTERRUPT_TAKEN_S)
    finally:
        for s in sessions:
            s.resume()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert not final.exists() and _parts(data) == sorted([part, journal])
    report = json.loads(out.splitlines()[-1])
    assert report["interrupted"] and report["kept"] == ["data/" + part.name], report
    first = _journaled(journal)
    assert KILL_AFTER <= first < BIG and report["bytes"] == first, (first, report)

    # Killed outright (a laptop that sleeps or loses power): the journal holds what it held.
    proc = _push(big, env)
    try:
        _when_journaled(proc, journal, final, first + KILL_AFTER)
        proc.send_signal(signal.SIGSTOP)  # it feeds its sessions no more while they are listed (a fast
        # machine would otherwise finish the file first); SIGKILL ends it stopped, as a lost laptop
        copiers = psutil.Process(proc.pid).children(recursive=True)
        sessions = [c for c in copiers if c.name() == "ssh"]
        assert len(sessions) == sftp_ranges.SESSIONS, [c.cmdline() for c in copiers]  # one session per range
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    gone, alive = psutil.wait_procs(copiers, timeout=COPIERS_GONE_S)
    assert alive == [], f"sessions went on after the push was killed: {alive}"
    assert not final.exists() and _parts(data) == sorted([part, journal])
    kept = _journaled(journal)
    assert first + KILL_AFTER <= kept < BIG

    # The same command continues every range from its slot: what the journal claims is there.
    again = json.loads(lab.fab_ok("push", str(big), "--to", "data/big.bin", "--json").splitlines()[-1])
    assert (again["copied"], again["resumed"], again["failed"]) == (1, 1, {}), again
    assert again["bytes"] == BIG - kept, "the resumed push sent again what the journal said was there"
    assert final.read_bytes() == big.read_bytes()
    st = final.stat()
    assert (st.st_mode & 0o777, int(st.st_mtime)) == (0o640, OLD_MTIME)
    assert _parts(data) == [], "the part or its journal was left behind"

    # Skipped once there; a journal that is not whole is not trusted: the copy starts afresh.
    skipped = json.loads(lab.fab_ok("push", str(big), "--to", "data/big.bin", "--json").splitlines()[-1])
    assert (skipped["copied"], skipped["skipped"], skipped["bytes"]) == (0, 1, 0), skipped
    claims = sftp_ranges.journal_bytes([a + (8 << 20) for a, _ in sftp_ranges.bounds(BIG, sftp_ranges.SESSIONS)])
    owner = data.stat()
    for damaged in (claims[:-3], claims):  # a journal cut short; a whole one that claims more than the part holds
        final.unlink()
        part.write_bytes(b"\xff" * (1 << 20))  # a part with garbage in it, shorter than the journal says
        journal.write_bytes(damaged)
        for p in (part, journal):  # as the head's user left them
            os.chown(p, owner.st_uid, owner.st_gid)
        fresh = json.loads(lab.fab_ok("push", str(big), "--to", "data/big.bin", "--json").splitlines()[-1])
        assert (fresh["copied"], fresh["resumed"], fresh["bytes"]) == (1, 0, BIG), fresh
        assert final.read_bytes() == big.read_bytes()
        assert _parts(data) == []


def test_a_new_folder_with_big_files_of_odd_names_appears_whole(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    src = tmp_path / "tree"
    (src / "sub dir").mkdir(parents=True)
    want = {"it's \"quoted\"\nand new-lined.bin": os.urandom(sftp_ranges.RANGE_MIN_BYTES + 12345),
            "sub dir/-dash $(x).bin": os.urandom(sftp_ranges.RANGE_MIN_BYTES),
            "small.txt": b"small\n"}
    for rel, body in want.items():
        (src / rel).write_bytes(body)
    report = json.loads(lab.fab_ok("push", str(src), "--to", "data/tree", "--json").splitlines()[-1])
    assert (report["copied"], report["failed"], report["kept"]) == (3, {}, []), report
    top = lab.share / "data" / "tree"
    got = {p.relative_to(top).as_posix(): p.read_bytes() for p in top.rglob("*") if p.is_file()}
    assert got == want, "a file missing or different, or a part or journal left behind"
    assert sorted(p.name for p in (lab.share / "data").iterdir()) == ["tree"], "a staged folder or lock left behind"


def test_a_big_file_that_grows_while_it_is_pushed_is_not_put_in_place_cut_short(make_lab, tmp_path):
    lab = make_lab(workers=1)
    lab.fab_ok("up")
    big = _big(tmp_path)
    data = lab.share / "data"
    final = data / "big.bin"
    _, journal = sftp_ranges.names(str(final), BIG, OLD_MTIME, sftp_ranges.SESSIONS)
    env = {**os.environ, "SPOTFAN_CONFIG": str(lab.folder / "cluster.toml")}
    proc = _push(big, env)
    try:
        _when_journaled(proc, Path(journal), final, 8 << 20)
        with open(big, "ab") as f:  # a log still being written, say
            f.write(b"more\n")
        out, err = proc.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 1, out + err
    assert "changed while it was copied" in out + err, out + err
    assert not final.exists() and _parts(data) == [], "a copy of another version was put in place or kept"
    lab.fab_ok("push", str(big), "--to", "data/big.bin")
    assert final.read_bytes() == big.read_bytes()
