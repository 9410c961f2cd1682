"""`fab push` to a head whose disk fills up: a clear error, whole files or nothing at every final path, and a rerun that finishes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cluster import sftp_ranges

SHARE_MB = 24  # the share's own small disk (a tmpfs): the lab's VM and records need a little of it
FREE_BYTES = 2_500_000  # left free before the push, which brings about 6 MB
SMALL_FILES, SMALL_BYTES = 24, 100_000  # through the pipelined sessions
BIG_FILES, BIG_BYTES = 2, 1_600_000  # through sftp -b, each resumable from its part file
RANGED_SHARE_MB = 100  # room for one file that goes in ranges (cluster.sftp_ranges)
RANGED_BYTES = sftp_ranges.RANGE_MIN_BYTES + (3 << 20)
RANGED_FREE_BYTES = 20 << 20


def _tree(top: Path) -> dict[str, bytes]:
    want = {}
    for i in range(SMALL_FILES):
        want[f"small/s{i:02d}.bin"] = os.urandom(SMALL_BYTES)
    for i in range(BIG_FILES):
        want[f"big{i}.bin"] = os.urandom(BIG_BYTES)
    for rel, body in want.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(body)
    return want


def _files(top: Path) -> dict[str, bytes]:
    return {p.relative_to(top).as_posix(): p.read_bytes() for p in top.rglob("*") if p.is_file()}


def _fill(share: Path, *, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the share's disk."""
    filler = share / "filler.bin"
    free = shutil.disk_usage(share).free
    assert free > leave + (1 << 20), f"the share's disk has only {free} bytes free after `fab up`"
    with open(filler, "wb") as f:
        f.truncate(0)
        block = b"\0" * (1 << 20)
        left = free - leave
        while left > 0:
            left -= f.write(block[:min(left, len(block))])
    return filler


@pytest.fixture
def full_lab(make_lab):
    yield from _lab_on_tmpfs(make_lab, SHARE_MB)


@pytest.fixture
def roomier_full_lab(make_lab):
    yield from _lab_on_tmpfs(make_lab, RANGED_SHARE_MB)


def _lab_on_tmpfs(make_lab, size_mb: int):
    """A one-VM lab whose share is a small tmpfs of its own (mounted before the head starts, so
    the head's bind mount of the share is that disk)."""
    if shutil.which("mount") is None:
        pytest.skip("needs mount(8) for a tmpfs")
    lab = make_lab(workers=1)
    lab.share.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(lab.share)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the share: {r.stderr.strip()}")
    try:
        lab.fab_ok("up")
        yield lab
    finally:
        lab.fab("down")
        subprocess.run(["umount", str(lab.share)], capture_output=True)
        if os.path.ismount(lab.share):
            subprocess.run(["umount", "-l", str(lab.share)], capture_output=True)


@pytest.mark.parametrize("into", ["a new folder", "a folder that exists"])
def test_a_push_to_a_full_disk_says_so_leaves_only_whole_files_and_finishes_once_space_is_freed(
        full_lab, tmp_path, into):
    lab = full_lab
    src = tmp_path / "data"
    want = _tree(src)
    dest = lab.share / "inputs"
    if into == "a folder that exists":
        lab.fab_ok("push", str(src / "small" / "s00.bin"), "--to", "inputs/seed.bin")
    filler = _fill(lab.share, leave=FREE_BYTES)
    before = {p for p in lab.share.rglob("*") if p.is_file()}  # the lab's own records, the seed, the filler

    r = lab.fab("push", str(src), "--to", "inputs", "--json")
    report = json.loads(r.stdout.splitlines()[-1])
    said = "\n".join(r.stdout.splitlines()[:-1]) + r.stderr  # what a person reads (without the JSON)
    assert r.returncode == 1, said
    assert "the head's disk is full" in said and "free space on the head" in said, said
    assert report["failed"] and report["copied"] < len(want), report
    # Whole files at final paths, or nothing; what is half-written or waits to be renamed into
    # place only where the report says it kept it (for the next push to continue from).
    kept = [lab.share / k for k in report["kept"]]
    for k in report["kept"]:
        assert ".spotfan-part" in k and k in said, f"kept {k}, but the message does not say where"
    for path in (p for p in lab.share.rglob("*") if p.is_file() and p not in before):
        if any(path == k or path.is_relative_to(k) for k in kept):
            continue
        assert path.is_relative_to(dest), f"a stray file after the failed push: {path}"
        rel = path.relative_to(dest).as_posix()
        assert rel in want, f"a stray file after the failed push: {path}"
        assert path.read_bytes() == want[rel], f"a partial file at a final path: {path}"
    whole_before = report["copied"]

    filler.unlink()  # the user frees space, and runs the same command again
    again = json.loads(lab.fab_ok("push", str(src), "--to", "inputs", "--json").splitlines()[-1])
    assert again["failed"] == {} and again["kept"] == [], again
    assert again["copied"] + again["skipped"] == len(want), again
    assert again["skipped"] >= whole_before, ("files copied whole were sent again", report, again)
    got = _files(dest)
    got.pop("seed.bin", None)
    assert got == want, "files missing, or part files left behind"
    assert not list(lab.share.rglob("*.spotfan-part")), "temporaries left behind"


def test_a_push_in_ranges_to_a_full_disk_says_so_keeps_its_part_and_continues_once_space_is_freed(
        roomier_full_lab, tmp_path):
    lab = roomier_full_lab
    big = tmp_path / "huge.bin"
    body = os.urandom(RANGED_BYTES)
    big.write_bytes(body)
    filler = _fill(lab.share, leave=RANGED_FREE_BYTES)

    r = lab.fab("push", str(big), "--to", "inputs/huge.bin", "--json")
    report = json.loads(r.stdout.splitlines()[-1])
    said = "\n".join(r.stdout.splitlines()[:-1]) + r.stderr
    assert r.returncode == 1, said
    assert "the head's disk is full" in said and report["copied"] == 0, said
    assert not (lab.share / "inputs" / "huge.bin").exists(), "a partial file at the final path"
    assert len(report["kept"]) == 1 and report["kept"][0] in said, report  # the part, to continue from

    filler.unlink()
    again = json.loads(lab.fab_ok("push", str(big), "--to", "inputs/huge.bin", "--json").splitlines()[-1])
    assert (again["copied"], again["resumed"], again["kept"]) == (1, 1, []), again
    assert 0 < again["bytes"] < RANGED_BYTES, "what the journal said was there was sent again"
    assert (lab.share / "inputs" / "huge.bin").read_bytes() == body
    assert not list(lab.share.rglob("*.spotfan-part")), "the part or its journal was left behind"


def test_a_push_to_a_disk_with_no_room_at_all_says_the_disk_is_full(full_lab, tmp_path):
    lab = full_lab
    (tmp_path / "a.txt").write_text("a\n")
    filler = _fill(lab.share, leave=0)
    r = lab.fab("push", str(tmp_path / "a.txt"), "--to", "inputs/a.txt")
    said = r.stdout + r.stderr
    assert r.returncode == 1, said
    assert "the head's disk is full" in said and "free space on the head" in said, said
    assert not (lab.share / "inputs" / "a.txt").exists()
    assert not list(lab.share.rglob(".spotfan-push-lock.*")), "a lock it could not write was left to block the next"
    filler.unlink()
    lab.fab_ok("push", str(tmp_path / "a.txt"), "--to", "inputs/a.txt")  # at once, not after a lease
    assert (lab.share / "inputs" / "a.txt").read_text() == "a\n"
