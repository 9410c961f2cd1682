"""Inputs fetched in batches over the runner's SFTP session (tasks.fetch, `fetch=True`), against
a real sshd and real SSHFS mounts: exact copies, what is left to the mount, the fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import fetch
from tasks.direct import COMMAND_ENV, Direct
from tasks.fs import probe_publish
from tasks.items import Item
from tasks.publish import Publisher
from tests.tasks.two_mounts import fresh, kill_session_when, sftp_command, two_machines  # noqa: F401 (fixtures)

DEADLINE_S = 240

# Each output says what the task read and where from: the share's mount or a local copy.
TASKS = """
import os, time
from pathlib import Path
from tasks import filetask

@filetask(src="in/**/*.dat", out="out/{key}.txt", fetch=__FETCH__)
def copy(src: Path, out: Path, root: Path) -> None:
    time.sleep(__SLEEP__)
    where = "mount" if str(src).startswith(str(root)) else "local"
    out.write_bytes(src.read_bytes() + f"|{where}|{int(src.stat().st_mtime)}|{src.name}".encode())
"""


def write_inputs(share: Path, n: int, *, sleep: float = 0.0, fetching: bool = True) -> dict[str, bytes]:
    (share / "ft.py").write_text(TASKS.replace("__FETCH__", str(fetching)).replace("__SLEEP__", str(sleep)))
    data = {}
    for i in range(n):
        rel = f"in/{i % 3}/k {i:04d}.dat"  # folders, and a space in every name
        data[rel] = f"input {i} ".encode() * (i % 7)
        (share / rel).parent.mkdir(parents=True, exist_ok=True)
        (share / rel).write_bytes(data[rel])
        os.utime(share / rel, (1_700_000_000 + i, 1_700_000_000 + i))
    return data


def run(root: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tasks", "-v", "run", "ft:copy", "--workers", "2", *extra],
                            cwd=root, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def outputs(share: Path, data: dict[str, bytes]) -> dict[str, str]:
    """Where each key's task read its input from; asserts every output is exact."""
    where = {}
    for rel, content in data.items():
        out = share / "out" / (rel[len("in/"):] + ".txt")
        body, how, mtime, name = out.read_bytes().rsplit(b"|", 3)
        assert body == content, f"{out}: the task read other bytes than its input's"
        assert int(mtime) == int((share / rel).stat().st_mtime), f"{out}: the copy lost the input's mtime"
        assert name.decode() == Path(rel).name, f"{out}: the copy has another name"
        where[rel] = how.decode()
    return where


def _direct(share: Path, mount: Path, monkeypatch) -> Direct:
    monkeypatch.setenv(COMMAND_ENV, sftp_command(share.parent))
    tmp = mount / ".spotfan/tmp/me"
    tmp.mkdir(parents=True)
    remote = Direct.wanted(mount)
    assert remote is not None
    direct = Direct.start(root=mount, remote=remote, tmp=tmp, fallback=Publisher(
        mount, method=probe_publish(tmp), share_tmp=tmp, fsync=False))
    assert direct.session is not None and not direct.lost
    return direct


def test_fetched_copies_are_exact_and_what_is_not_worth_it_is_left_to_the_mount(
        fresh, tmp_path: Path, monkeypatch) -> None:
    share, a, _ = fresh
    sizes = {"empty.bin": 0, "small.bin": 100, "one block.bin": fetch.READ_BLOCK,
             "blocks.bin": 3 * fetch.READ_BLOCK + 17, "just fits.bin": fetch.MAX_BYTES,
             "too big.bin": fetch.MAX_BYTES + 1, "new\nline é; $(x).bin": 10}
    for i, (name, size) in enumerate(sizes.items()):
        (share / "in/deep").mkdir(parents=True, exist_ok=True)
        (share / "in/deep" / name).write_bytes(os.urandom(size))
        os.utime(share / "in/deep" / name, (1_600_000_000 + i, 1_600_000_000 + i))
    (share / "in/deep/a folder.bin").mkdir()
    (share / "in/deep/a link.bin").symlink_to("small.bin")  # the mount resolves it, not the head
    items = [Item(n, f"in/deep/{n}", f"out/{n}")
             for n in [*sizes, "a folder.bin", "a link.bin", "missing.bin"]]
    direct = _direct(share, a, monkeypatch)
    try:
        sent = direct.session.sent
        got = fetch.fetch(direct, items, tmp_path / "f")
        sent = direct.session.sent - sent
    finally:
        direct.close()
    by_name = dict(zip([it.key for it in items], got))
    for name, size in sizes.items():
        if size > fetch.MAX_BYTES:
            assert by_name[name] == "", "an input over MAX_BYTES was fetched"
            continue
        local = Path(by_name[name])
        assert local == tmp_path / "f/in/deep" / name, "a copy is not at the input's own relative path"
        assert local.read_bytes() == (share / "in/deep" / name).read_bytes()
        assert local.stat().st_mtime == (share / "in/deep" / name).stat().st_mtime
    assert by_name["a folder.bin"] == by_name["a link.bin"] == by_name["missing.bin"] == ""
    # lstat + open, read, close per input (and the extra reads of bigger ones), in a few batches
    assert sent <= 4 * len(items) + 2 * fetch.MAX_BYTES // fetch.READ_BLOCK, sent
    fetch.discard(tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_a_fetching_task_reads_local_copies_and_every_output_is_exact(fresh, tmp_path: Path) -> None:
    share, a, b = fresh
    data = write_inputs(share, 300)
    env = {COMMAND_ENV: sftp_command(share.parent), "TMPDIR": str(tmp_path)}
    procs = [run(m, env) for m in (a, b)]
    outs = [p.communicate(timeout=DEADLINE_S) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert set(outputs(share, data).values()) == {"local"}, "a small input was read through the mount"
    assert all("fetch: small inputs are fetched in batches" in o[1] for o in outs)
    reports = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(r["succeeded"] for r in reports) == len(data)
    assert os.listdir(tmp_path) == [], "a runner left fetched inputs (or its staging) behind"


def test_a_command_with_fetch_is_given_the_local_copy(fresh, tmp_path: Path) -> None:
    share, a, _ = fresh
    data = write_inputs(share, 30)
    p = subprocess.run([sys.executable, "-m", "tasks", "-v", "run", "--cmd", "cat {src} > {out}; echo {src} >> {out}",
                        "--src", "in/**/*.dat", "--out", "out/{key}.txt", "--fetch", "--workers", "2"],
                       cwd=a, env={**os.environ, COMMAND_ENV: sftp_command(share.parent), "TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=DEADLINE_S)
    assert p.returncode == 0, p.stderr
    for rel, content in data.items():
        body = (share / "out" / (rel[len("in/"):] + ".txt")).read_bytes()
        assert body.startswith(content)
        src = body[len(content):].decode().strip()
        assert src.startswith(str(tmp_path)) and src.endswith(rel), src


def test_without_a_session_or_without_fetch_the_task_reads_through_the_mount(fresh) -> None:
    share, a, _ = fresh
    data = write_inputs(share, 60)
    p = run(a, {COMMAND_ENV: "false"})  # no session: nothing to fetch with
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert set(outputs(share, data).values()) == {"mount"}
    assert "no direct SFTP session here, so the task reads its inputs through the mount" in err
    sub = share.parent / (share.name + "-nofetch")
    sub.mkdir()
    data = write_inputs(sub, 60, fetching=False)
    p = run(a.parent / sub.name, {COMMAND_ENV: sftp_command(share.parent)})
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert set(outputs(sub, data).values()) == {"mount"}, "a task without fetch=True got a copy"


def test_a_session_killed_mid_run_leaves_the_rest_to_the_mount(fresh) -> None:
    share, a, _ = fresh
    data = write_inputs(share, 400, sleep=0.01)
    p = run(a, {COMMAND_ENV: sftp_command(share.parent)})
    out = share / "out"
    killed = kill_session_when(p, lambda: out.is_dir() and sum(len(f) for _, _, f in os.walk(out)) >= 40,
                               deadline_s=DEADLINE_S)
    assert killed is not None, "never saw the runner's SFTP session while it worked"
    _, err = p.communicate(timeout=DEADLINE_S)
    assert p.returncode == 0, err
    assert "the direct SFTP session is gone" in err
    where = outputs(share, data)
    assert {"local", "mount"} <= set(where.values()), where  # fetched before, the mount after


def test_fetch_on_a_task_without_inputs_is_refused(tmp_path: Path) -> None:
    from tasks import filetask
    from tasks.errors import SpecError

    with pytest.raises(SpecError, match="fetch=True needs src="):
        filetask(keys=["a"], out="o/{key}", fetch=True)(lambda key, out: None)
    (tmp_path / "keys.txt").write_text("a\n")
    p = subprocess.run([sys.executable, "-m", "tasks", "run", "--cmd", "cp /dev/null {out}",
                        "--keys", str(tmp_path / "keys.txt"), "--out", "o/{key}", "--fetch",
                        "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "--fetch is for tasks with input files" in p.stderr
    assert not (tmp_path / "o").exists()
