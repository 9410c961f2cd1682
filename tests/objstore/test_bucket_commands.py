"""collect, failures, report, logs and run --dry-run on an object-store root, after real runs on
it, through the command line as a user types them, on both stores (the `backend` fixture)."""
from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pandas as pd

from tasks.layout import key_id
from tests.conftest import run_cli

from .backends import clean_env

TASK = """
import json
import os
from pathlib import Path

from tasks import filetask

FAIL = set(os.environ.get("FAIL_KEYS", "").split(","))


@filetask(keys=[f"k{i:02d}" for i in range(12)], out="out/{key}.json")
def make(key: str, out: Path) -> None:
    if key in FAIL:
        if key == "k10":
            raise KeyError(key)
        raise ValueError(f"cannot make {key}")
    n = int(key[1:])
    out.write_text(json.dumps({"n": n, "sq": n * n}))


@filetask(keys=["a", "b"], out="dirs/{key}/")
def folders(key: str, out: Path) -> None:
    (out / "sub").mkdir()
    (out / "one.txt").write_text(key)
    (out / "sub" / "two.txt").write_text(key * 2)


@filetask(keys=["x"], out="never/{key}.json")
def never(key: str, out: Path) -> None:
    out.write_text("{}")


def read_folder(path: Path) -> dict:
    return {"one": (path / "one.txt").read_text(), "two": (path / "sub" / "two.txt").read_text(),
            "files": sum(1 for p in path.rglob("*") if p.is_file())}
"""


def _setup(backend, tmp_path: Path, prefix: str) -> tuple[str, dict[str, str]]:
    (tmp_path / "t.py").write_text(textwrap.dedent(TASK))
    return f"{backend.scheme}://{backend.bucket_name}/{prefix}", {**os.environ, **backend.env}


def _cli(args: list[str], tmp_path: Path, env: dict[str, str], **extra: str):
    done = run_cli(args, cwd=tmp_path, env={**env, **extra})
    print(" ".join(args), "->", done.returncode, done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    return done


def test_failed_keys_on_a_bucket_are_named_grouped_shown_sent_back_and_drawn(backend, tmp_path):
    url, env = _setup(backend, tmp_path, "runs/f")
    first = _cli(["run", "t:make", "--root", url, "--workers", "2", "--max-attempts", "1"], tmp_path, env,
                 FAIL_KEYS="k03,k07,k10")
    assert first.returncode == 1
    assert "3 key(s) failed after 1 attempt(s): " in first.stderr
    assert f"Errors are in {url}/.spotfan/tasks/make/failed/; rerun with --retry-failed" in first.stderr

    listed = _cli(["failures", "t:make", "--root", url, "--json"], tmp_path, env)
    assert listed.returncode == 0
    data = json.loads(listed.stdout)
    assert (data["total"], data["failed"], data["gave_up"]) == (12, 3, 3)
    assert [(g["count"], g["keys"], g["signature"]) for g in data["groups"]] == [
        (2, ["k03", "k07"], "ValueError: cannot make k#"), (1, ["k10"], "KeyError: '…'")]
    text = _cli(["failures", "t:make", "--root", url], tmp_path, env)
    assert "make: 3 of 12 keys failed (3 gave up), 2 distinct error(s)" in text.stdout
    assert "[1] 2 key(s): ValueError: cannot make k#\n    keys: 'k03', 'k07'" in text.stdout
    assert "| ValueError: cannot make k03" in text.stdout

    failed = _cli(["logs", "t:make", "k03", "--root", url], tmp_path, env)
    assert failed.returncode == 0
    assert "==> 'k03': attempt 1 of 1 failed at " in failed.stdout
    assert "ValueError: cannot make k03; given up: `tasks failures --retry` sends it back" in failed.stdout
    ok = _cli(["logs", "t:make", "k00", "--root", url], tmp_path, env)
    assert "==> 'k00' succeeded: its output 'out/k00.json' exists" in ok.stdout
    stranger = _cli(["logs", "t:make", "nope", "--root", url], tmp_path, env)
    assert stranger.returncode == 1 and "'nope' is not a key of make (12 keys)" in stranger.stderr

    reset = _cli(["failures", "t:make", "--root", url, "--retry"], tmp_path, env)
    assert reset.returncode == 0 and "reset 3 key(s)" in reset.stdout
    record = json.loads(backend.body(f"runs/f/.spotfan/tasks/make/failed/{key_id('k07')}.json"))
    assert (record["attempts"], record["gave_up"], record["error"]) == (0, False, "ValueError: cannot make k07")
    st = json.loads(_cli(["status", "t:make", "--root", url, "--json"], tmp_path, env).stdout)
    assert (st["done"], st["failed"], st["pending"], st["retrying"]) == (9, 0, 3, 3)

    again = _cli(["run", "t:make", "--root", url, "--workers", "2"], tmp_path, env, FAIL_KEYS="")
    assert again.returncode == 0
    assert json.loads(again.stdout.splitlines()[-1])["succeeded"] == 3
    assert backend.body("runs/f/out/k10.json") == b'{"n": 10, "sq": 100}'
    none = _cli(["failures", "t:make", "--root", url], tmp_path, env)
    assert none.stdout.strip() == "make: no failed keys (12 keys)"

    # The report reads every log part and the metric samples under the prefix, and is
    # written locally: into --to, else the current folder.
    now = time.time()
    backend.seed("runs/f/.spotfan/metrics/vm-a.jsonl", "".join(
        json.dumps({"t": now - i, "host": "vm-a", "cpu": 40.0, "seconds": 1.0}) + "\n" for i in range(5)).encode())
    (tmp_path / "reports").mkdir()
    drawn = _cli(["report", "t:make", "--root", url, "--to", "reports"], tmp_path, env)
    assert drawn.returncode == 0
    rep = json.loads(drawn.stdout)
    assert (rep["tasks"], rep["failures"], rep["hosts"]) == (12, 3, 2)
    assert rep["png"] == str(tmp_path / "reports" / "make.report.png")
    assert (tmp_path / "reports" / "make.report.png").read_bytes().startswith(b"\x89PNG")
    page = (tmp_path / "reports" / "make.report.html").read_text()
    assert f"Run root <code>{url}</code>" in page and "<td>vm-a</td>" in page and "<td>40</td>" in page
    here = _cli(["report", "t:make", "--root", url], tmp_path, env)
    assert here.returncode == 0 and (tmp_path / "make.report.html").is_file()
    assert backend.body("runs/f/.spotfan/tasks/make/report.png") is None  # nothing written to the bucket
    empty = _cli(["report", "t:never", "--root", url], tmp_path, env)
    assert empty.returncode == 1
    assert f"no executions of never are logged under {url}/.spotfan/tasks/never/log/" in empty.stderr
    nowhere = _cli(["report", "t:make", "--root", url, "--to", "missing"], tmp_path, env)
    assert nowhere.returncode == 2 and "'missing' is not a folder" in nowhere.stderr


def test_collect_on_a_bucket_downloads_each_output_for_its_reader(backend, tmp_path):
    url, env = _setup(backend, tmp_path, "runs/c")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # Where collect's local copies go (empty again after each collect); only for collect: a
    # run's forkserver puts its socket there, and a long AF_UNIX path is refused.
    local = {"TMPDIR": str(scratch)}
    ran = _cli(["run", "t:make", "--root", url, "--workers", "2", "--max-attempts", "1"], tmp_path, env,
               FAIL_KEYS="k03")
    assert ran.returncode == 1

    got = _cli(["collect", "t:make", "--root", url, "--to", "res.parquet"], tmp_path, env, **local)
    assert got.returncode == 0
    summary = json.loads(got.stdout)
    assert (summary["rows"], summary["outputs"], summary["missing"], summary["unreadable"]) == (11, 11, 1, 0)
    assert "1 of 12 keys are not done (no output yet) and are absent from the table" in got.stderr
    table = pd.read_parquet(tmp_path / "res.parquet")
    assert list(table["key"]) == [f"k{i:02d}" for i in range(12) if i != 3]
    assert list(table["sq"]) == [i * i for i in range(12) if i != 3]
    assert list(scratch.iterdir()) == []

    backend.seed("runs/c/out/k03.json", b'{"n": 3, "sq"')  # torn by someone else's writer
    torn = _cli(["collect", "t:make", "--root", url, "--to", "res.parquet"], tmp_path, env, **local)
    assert torn.returncode == 1
    assert "1 of 12 outputs of make cannot be read:\n  'k03' (out/k03.json): JSONDecodeError" in torn.stderr
    skipped = _cli(["collect", "t:make", "--root", url, "--to", "res.parquet", "--skip-unreadable"],
                   tmp_path, env, **local)
    assert skipped.returncode == 0 and json.loads(skipped.stdout)["unreadable"] == 1
    assert "skipped 1 unreadable output(s):\n  'k03' (out/k03.json): JSONDecodeError" in skipped.stderr
    assert list(scratch.iterdir()) == []

    remote = _cli(["collect", "t:make", "--root", url, "--to", f"{url}/res.parquet"], tmp_path, env, **local)
    assert remote.returncode == 2 and "the table is written to a local file" in remote.stderr

    assert _cli(["run", "t:folders", "--root", url], tmp_path, env).returncode == 0
    dirs = _cli(["collect", "t:folders", "--root", url, "--to", "dirs.pkl", "--reader", "t:read_folder"],
                tmp_path, env, **local)
    assert dirs.returncode == 0
    table = pd.read_pickle(tmp_path / "dirs.pkl")
    assert table.to_dict("records") == [{"key": "a", "one": "a", "two": "aa", "files": 2},
                                        {"key": "b", "one": "b", "two": "bb", "files": 2}]

    backend.deny("get")  # the store refuses the reads: the root is unusable, no output is to blame
    denied = _cli(["collect", "t:make", "--root", url, "--to", "res.parquet", "--skip-unreadable"],
                  tmp_path, env, **local)
    assert denied.returncode == 3
    assert {"s3": "s3:GetObject", "gs": "storage.objects.get"}[backend.scheme] in denied.stderr
    assert "unreadable" not in denied.stderr and "fab heal" not in denied.stderr
    assert list(scratch.iterdir()) == []


CMD = ["--cmd", "grep -q . {src} && tr a-z A-Z < {src} > {out}", "--src", "in/*.txt", "--out", "up/{stem}.txt",
       "--name", "up"]


def test_a_dry_run_on_a_bucket_counts_and_lists_keys_and_sends_no_write(backend, tmp_path):
    url, env = _setup(backend, tmp_path, "runs/d")
    for i in range(5):
        backend.seed(f"runs/d/in/f{i}.txt", b"" if i == 4 else b"abc%d\n" % i)  # an empty one fails
    ran = _cli(["run", *CMD, "--root", url, "--max-attempts", "1"], tmp_path, env)
    assert ran.returncode == 1 and "1 key(s) failed after 1 attempt(s): 'f4.txt'" in ran.stderr
    assert backend.body("runs/d/up/f2.txt") == b"ABC2\n"
    for i in range(5, 8):
        backend.seed(f"runs/d/in/f{i}.txt", b"new%d\n" % i)

    log = backend.request_log
    before = len(log.select(bucket=backend.bucket_name))
    names_before = sorted(o.name for o in backend.bucket.list("runs/d/"))
    dry = _cli(["run", *CMD, "--root", url, "--dry-run"], tmp_path, env)
    assert dry.returncode == 0
    assert f"dry run of up in {url}: 8 keys, 4 done, 1 failed, 3 left" in dry.stdout
    assert ("first keys that would run:\n  (paths relative to " + url) in dry.stdout
    assert "  'f5.txt'\n    $ grep -q . in/f5.txt && tr a-z A-Z < in/f5.txt > up/f5.txt" in dry.stdout
    assert "nothing was claimed or written" in dry.stdout
    as_json = json.loads(_cli(["run", *CMD, "--root", url, "--dry-run", "--json"], tmp_path, env).stdout)
    assert (as_json["total"], as_json["done"], as_json["failed"], as_json["left"]) == (8, 4, 1, 3)
    assert as_json["keys"] == ["f5.txt", "f6.txt", "f7.txt"] and as_json["chunking"]["plan_exists"]
    retrying = json.loads(_cli(["run", *CMD, "--root", url, "--dry-run", "--json", "--retry-failed"],
                               tmp_path, env).stdout)
    assert (retrying["failed"], retrying["left"], retrying["retrying"]) == (0, 4, 1)
    sent = log.select(bucket=backend.bucket_name)[before:]
    assert sent, "the dry runs read the bucket"
    assert {r.method for r in sent} <= {"GET", "HEAD"}, sorted({(r.method, r.kind) for r in sent})
    assert sorted(o.name for o in backend.bucket.list("runs/d/")) == names_before

    # Kept output is not supported on a bucket root: refused before any request; `logs`
    # shows the failure record (with the command's stderr end) and says so.
    before = len(log.select(bucket=backend.bucket_name))
    kept = _cli(["run", *CMD, "--root", url, "--keep-output"], tmp_path, env)
    assert kept.returncode == 2
    assert "--keep-output is not supported on an object-store root (s3://, gs://) yet" in kept.stderr
    assert len(log.select(bucket=backend.bucket_name)) == before
    shown = _cli(["logs", *CMD, "f4.txt", "--root", url], tmp_path, env)
    assert shown.returncode == 0
    assert "==> 'f4.txt': attempt 1 of 1 failed at " in shown.stdout and "exit status 1" in shown.stdout
    assert "(no output kept: --keep-output is not supported on an object-store root yet)" in shown.stdout


# Every command on a bucket root, with what it needs besides the root.
COMMANDS = {"status": ["status", "t:make"], "collect": ["collect", "t:make", "--to", "res.parquet"],
            "failures": ["failures", "t:make"], "retry": ["failures", "t:make", "--retry"],
            "report": ["report", "t:make"], "logs": ["logs", "t:make", "k00"],
            "dry-run": ["run", "t:make", "--dry-run"], "run": ["run", "t:make"]}
MAKE_BUCKET = {"s3": "aws s3 mb s3://", "gs": "gcloud storage buckets create gs://"}
LIST_PERMISSION = {"s3": "s3:ListBucket", "gs": "storage.objects.list"}


def test_every_command_names_a_missing_bucket_and_how_to_make_it(backend, tmp_path):
    url, env = _setup(backend, tmp_path, "runs/x")
    url = url.replace(backend.bucket_name, "spotfan-no-such-bucket")
    for name, args in COMMANDS.items():
        done = _cli([*args, "--root", url], tmp_path, env)
        assert done.returncode == 3, name
        assert "the run root could not be used" in done.stderr and "spotfan-no-such-bucket does not exist" in done.stderr
        assert f"{MAKE_BUCKET[backend.scheme]}spotfan-no-such-bucket" in done.stderr, name
        assert "fab heal" not in done.stderr and "Traceback" not in done.stderr, name
    assert not (tmp_path / "res.parquet").exists()


def test_every_command_names_a_denied_listing_and_changes_nothing(backend, tmp_path):
    url, env = _setup(backend, tmp_path, "runs/x")
    backend.seed("runs/x/out/k00.json", b'{"n": 0}')
    backend.deny("list")
    for name, args in COMMANDS.items():
        done = _cli([*args, "--root", url], tmp_path, env)
        assert done.returncode == 3, name
        assert f"grant {LIST_PERMISSION[backend.scheme]} on" in done.stderr, name
        assert "Traceback" not in done.stderr, name
    writes = [r for r in backend.request_log.select(bucket=backend.bucket_name) if r.method not in ("GET", "HEAD")]
    assert writes == []


def test_commands_without_credentials_say_where_to_get_them(backend, tmp_path):
    url, _ = _setup(backend, tmp_path, "runs/x")
    if backend.scheme == "s3":
        env = clean_env({"AWS_ENDPOINT_URL": backend.endpoint, "AWS_DEFAULT_REGION": "us-east-1"})
        needed = "no AWS credentials were found"
    else:
        env = clean_env({"GOOGLE_CLOUD_PROJECT": backend.server.project})
        needed = "no Google credentials were found"
    env["HOME"] = str(tmp_path)  # no user configuration either
    for name in ("collect", "failures", "report", "dry-run"):
        done = _cli([*COMMANDS[name], "--root", url], tmp_path, env)
        assert done.returncode == 3 and needed in done.stderr, name


def test_a_malformed_root_url_is_refused_with_how_to_write_it(tmp_path):
    (tmp_path / "t.py").write_text(textwrap.dedent(TASK))
    env = clean_env({})
    urls = [("gcs://my-bucket/runs", "did you mean gs://my-bucket/runs?"),
            ("s3://My_Bucket/runs", "S3 bucket names use only lowercase letters"),
            ("s3:///runs", "names no bucket; write s3://BUCKET/PREFIX")]
    for i, (name, args) in enumerate(COMMANDS.items()):  # each command, each mistake in turn
        url, says = urls[i % len(urls)]
        done = _cli([*args, "--root", url], tmp_path, env)
        assert done.returncode == 2 and says in done.stderr, (name, url)
