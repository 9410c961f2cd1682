"""Bad input and the other shapes of a task on an object-store root: a missing bucket, a
malformed URL, a denied permission, failing keys, directory outputs, an unmodified command,
hostile key names. Each on S3 (moto) and GCS (our emulator), through the command line."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from .backends import clean_env
from .bucket_runs import BucketRun


@pytest.fixture
def run(backend, tmp_path, request) -> BucketRun:
    return BucketRun(backend, tmp_path, f"runs/{request.node.name.replace('[', '-').rstrip(']')}/")


KEYS = """
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i}" for i in range(6)], out="out/{key}.txt")
def make(key: str, out: Path) -> None:
    out.write_text(key)
"""


def test_a_missing_bucket_stops_the_run_before_any_work(run: BucketRun) -> None:
    run.write(KEYS)
    url = f"{run.backend.scheme}://spotfan-no-such-bucket-{run.backend.bucket_name[-6:]}/runs/x"
    done = run.cli("run", "t:make", "--root", url)
    assert done.returncode == 3, done.stderr
    assert "spotfan-no-such-bucket" in done.stderr
    assert ("aws s3 mb" if run.backend.scheme == "s3" else "gcloud storage buckets create") in done.stderr


@pytest.mark.parametrize("url, says", [("s3://Bad_Bucket/x", "bucket"), ("gcs://bucket/x", "gs://")])
def test_a_malformed_root_url_is_refused_with_how_to_write_it(run: BucketRun, url: str, says: str) -> None:
    run.write(KEYS)
    done = run.cli("run", "t:make", "--root", url)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "error:" in done.stderr


def test_a_denied_upload_stops_the_run_and_charges_no_key(run: BucketRun) -> None:
    run.write(KEYS)
    run.backend.deny("create")
    done = run.cli("run", "t:make", "--root", run.url)
    run.backend.clear_faults()
    assert done.returncode == 3, done.stderr
    assert ("s3:PutObject" if run.backend.scheme == "s3" else "storage.objects.create") in done.stderr
    assert run.outputs() == {}
    assert run.names(".spotfan/tasks/make/failed/") == [], "a key was charged for the store's refusal"
    again = run.cli("run", "t:make", "--root", run.url)
    assert again.returncode == 0, again.stderr
    assert run.outputs() == {f"out/k{i}.txt": f"k{i}".encode() for i in range(6)}


FAILING = """
import os
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i}" for i in range(8)], out="out/{key}.txt")
def flaky(key: str, out: Path) -> None:
    if key in ("k3", "k5") and not os.environ.get("FIXED"):
        raise ValueError(f"bad value in {key}")
    out.write_text(key)
"""


def test_failing_keys_are_recorded_in_the_bucket_and_retried_after_the_fix(run: BucketRun) -> None:
    run.write(FAILING)
    done = run.cli("run", "t:flaky", "--root", run.url, "--max-attempts", "2")
    assert done.returncode == 1, done.stderr
    assert ("2 key(s) failed after 2 attempt(s): 'k3', 'k5'" in done.stderr
            or "2 key(s) failed after 2 attempt(s): 'k5', 'k3'" in done.stderr), done.stderr
    assert f"Errors are in {run.url.rstrip('/')}/.spotfan/tasks/flaky/failed/" in done.stderr
    assert len(run.names(".spotfan/tasks/flaky/failed/")) == 2
    status = json.loads(run.cli("status", "t:flaky", "--root", run.url, "--json").stdout)
    assert (status["done"], status["failed"], status["pending"]) == (6, 2, 0)
    again = run.cli("run", "t:flaky", "--root", run.url)
    assert again.returncode == 1 and '"ran": 0' in again.stdout, "given-up keys ran again unasked"
    fixed = run.cli("run", "t:flaky", "--root", run.url, "--retry-failed", env={**run.env, "FIXED": "1"})
    assert fixed.returncode == 0, fixed.stderr
    assert len(run.outputs()) == 8 and run.names(".spotfan/tasks/flaky/failed/") == []


FOLDERS = """
from pathlib import Path
from tasks import filetask

@filetask(keys=["a", "b", "c"], out="tiles/{key}/")
def tiles(key: str, out: Path) -> None:
    (out / "sub").mkdir()
    (out / "one.txt").write_text(key)
    (out / "sub" / "two.txt").write_text(key * 2)
"""


def test_directory_outputs_are_published_by_a_marker_written_last(run: BucketRun) -> None:
    run.write(FOLDERS)
    run.seed("tiles/b/one.txt", b"half of a dead owner's upload")  # a prefix with no marker
    run.seed("tiles/b/stale.txt", b"left by it too")
    done = run.cli("run", "t:tiles", "--root", run.url)
    assert done.returncode == 0, done.stderr
    got = run.outputs("tiles/")
    for key in "abc":
        assert got[f"tiles/{key}/one.txt"] == key.encode()
        assert got[f"tiles/{key}/sub/two.txt"] == (key * 2).encode()
        assert json.loads(got[f"tiles/{key}/.spotfan-done"]) == {"files": 2, "bytes": 3}
    assert "tiles/b/stale.txt" not in got, "a dead owner's partial upload stayed in a published folder"
    assert len(got) == 9
    rerun = run.cli("run", "t:tiles", "--root", run.url)
    assert rerun.returncode == 0 and '"done_before": 3' in rerun.stdout, rerun.stdout


def test_an_unmodified_command_runs_on_downloaded_inputs(run: BucketRun) -> None:
    for i in range(4):
        run.seed(f"in/doc {i}.txt", f"hello {i}".encode())
    run.seed("in/.hidden.txt", b"not an input")
    done = run.cli("run", "--cmd", "tr a-z A-Z < {src} > {out}", "--src", "in/*.txt",
                   "--out", "up/{stem}.txt", "--root", run.url)
    assert done.returncode == 0, done.stderr
    assert run.outputs("up/") == {f"up/doc {i}.txt": f"HELLO {i}".encode() for i in range(4)}


def test_a_glob_that_matches_nothing_and_hash_keys_are_refused(run: BucketRun) -> None:
    run.seed("in/a.csv", b"x")
    nothing = run.cli("run", "--cmd", "cp {src} {out}", "--src", "in/*.txt", "--out", "o/{stem}",
                      "--root", run.url)
    assert nothing.returncode == 2 and "matches no file" in nothing.stderr, nothing.stderr
    hashed = run.cli("run", "--cmd", "cp {src} {out}", "--src", "in/*.csv", "--out", "o/{key}",
                     "--key", "hash", "--root", run.url)
    assert hashed.returncode == 2 and 'key="hash"' in hashed.stderr, hashed.stderr


HOSTILE = """
from pathlib import Path
from tasks import filetask

NAMES = ["with space", "üñí©ødé", "semi;colon", "dollar$HOME", "quote'and\\"", "hash#pct%plus+"]

@filetask(keys=NAMES, out="out/{key}.txt")
def hostile(key: str, out: Path) -> None:
    out.write_text(key)
"""


def test_hostile_key_names_are_published_as_they_are(run: BucketRun) -> None:
    run.write(HOSTILE)
    done = run.cli("run", "t:hostile", "--root", run.url)
    assert done.returncode == 0, done.stderr
    names = ["with space", "üñí©ødé", "semi;colon", "dollar$HOME", "quote'and\"", "hash#pct%plus+"]
    assert run.outputs() == {f"out/{n}.txt": n.encode() for n in names}
    rerun = run.cli("run", "t:hostile", "--root", run.url)
    assert '"done_before": 6' in rerun.stdout, rerun.stdout


ROOTED = """
from pathlib import Path
from tasks import filetask

@filetask(keys=["a"], out="out/{key}.txt")
def rooted(key: str, out: Path, root: Path) -> None:
    out.write_text((root / "meta.json").read_text())
"""


def test_a_task_that_reads_beside_its_input_is_refused_before_any_work(run: BucketRun) -> None:
    run.write(ROOTED)
    done = run.cli("run", "t:rooted", "--root", run.url)
    assert done.returncode == 2, done.stderr
    assert "takes `root`" in done.stderr and "folder root" in done.stderr
    assert run.names() == [], "a refused run wrote to the bucket"


def test_no_credentials_stop_the_run_with_where_to_get_them(run: BucketRun) -> None:
    run.write(KEYS)
    if run.backend.scheme == "s3":
        env = clean_env({"AWS_ENDPOINT_URL": run.backend.endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
        says = "no AWS credentials were found"
    else:
        env = clean_env({"GOOGLE_CLOUD_PROJECT": run.backend.server.project})
        says = "no Google credentials were found"
    done = run.cli("run", "t:make", "--root", run.url, env=env, timeout=120)
    assert done.returncode == 3, done.stderr
    assert says in done.stderr and "run the same command again" in done.stderr
    assert run.names() == []


BIG = """
from pathlib import Path
from tasks import filetask

@filetask(keys=[f"k{i:02d}" for i in range(20)], out="out/{key}.bin")
def big(key: str, out: Path) -> None:
    out.write_bytes(key.encode() * 50_000)  # 200 KB, written on the local staging disk
"""


def test_a_full_local_disk_stops_the_run_charges_nothing_and_the_rerun_finishes(run: BucketRun) -> None:
    """The outputs are staged on local disk ($TMPDIR) before their upload: a full one is
    the environment's fault, not the keys'."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    run.write(BIG)
    disk = Path(tempfile.mkdtemp(prefix="sf-disk-", dir="/tmp"))  # short: the forkserver's socket is in it
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        (disk / "ballast").write_bytes(b"\0" * (900 * 1024))  # no room for one 200 KB output
        done = run.cli("run", "t:big", "--root", run.url, "--workers", "2", env={**run.env, "TMPDIR": str(disk)})
        assert done.returncode == 3, done.stderr
        assert "no space left on the device" in done.stderr and "no key was charged" in done.stderr
        assert run.names(".spotfan/tasks/big/failed/") == []
        assert run.outputs() == {}, "an output fitted: the test proved nothing"
        (disk / "ballast").unlink()
        again = run.cli("run", "t:big", "--root", run.url, "--workers", "2", env={**run.env, "TMPDIR": str(disk)})
        assert again.returncode == 0, again.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        disk.rmdir()
    got = run.outputs()
    assert sorted(got) == [f"out/k{i:02d}.bin" for i in range(20)]
    assert all(data == n[4:-4].encode() * 50_000 for n, data in got.items())
