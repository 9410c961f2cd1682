"""Hostile file names in `--cmd` tasks: every file is processed as a name, nothing else is touched.

Placeholders are substituted shell-quoted, so a file named `a; rm -f canary` is an
argument, never a command. Keys and templates cannot reach outside the run root.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

# Each one would do damage, or at least something visible, if a placeholder were pasted
# into the shell line unquoted.
HOSTILE = [
    "plain.txt",
    "with space.txt",
    "  leading and trailing spaces  .txt",
    "single'quote.txt",
    'double"quote.txt',
    "semi; rm -f canary.txt; x.txt",
    "and && rm -f canary.txt || x.txt",
    "pipe | tee pwned-pipe.txt",
    "redirect > pwned-redirect.txt",
    "$(touch pwned-dollar).txt",
    "`touch pwned-backtick`.txt",
    "${HOME} $PATH.txt",
    "new\nline; touch pwned-newline.txt",
    "tab\there.txt",
    "back\\slash.txt",
    "naïve café 日本語 😀.txt",
    "-rf.txt",
    "--help.txt",
    "{out} {src} {{key}}.txt",
    "star * and ? [a].txt",
    "percent %s %n.txt",
    "a'b\"c$(touch pwned-mix)`touch pwned-mix2`;d|e&f.txt",
]
# Writes the input, then each placeholder on its own line (printf's format comes first,
# so a value starting with "-" is an argument, not an option).
CMD = "cat {src} > {out} && printf '%s\\n' {key} {name} {stem} {suffix} >> {out}"


def expected(name: str) -> str:
    stem, suffix = (name[:-4], ".txt") if name.endswith(".txt") else (name, "")
    return f"content of {name}\n" + "".join(f"{v}\n" for v in (name, name, stem, suffix))


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def hostile_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    for name in HOSTILE:
        (root / "in" / name).write_text(f"content of {name}\n")
    # What an injected `rm -f canary.txt` would delete, wherever the command ran.
    (root / "canary.txt").write_text("still here\n")
    (tmp_path / "canary.txt").write_text("still here\n")
    return root


def test_every_hostile_name_is_processed_and_nothing_else_is_touched(tmp_path: Path,
                                                                    hostile_root: Path) -> None:
    root = hostile_root
    before_outside = tree(tmp_path) - {p for p in tree(tmp_path) if p.startswith("root")}
    proc = run_cli(["run", "--cmd", CMD, "--src", "in/*", "--out", "out/{stem}.out",
                    "--root", str(root), "--workers", "2", "--max-attempts", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["succeeded"], report["failed"]) == (len(HOSTILE), 0), report

    outputs = {p.name for p in (root / "out").iterdir()}
    assert outputs == {f"{n[:-4]}.out" for n in HOSTILE}, "one output per input, named after it"
    for name in HOSTILE:
        assert (root / "out" / f"{name[:-4]}.out").read_text() == expected(name), name

    assert (root / "canary.txt").read_text() == "still here\n"
    assert (tmp_path / "canary.txt").read_text() == "still here\n"
    pwned = [p for p in tmp_path.rglob("pwned*")] + list(Path.cwd().glob("pwned*"))
    assert pwned == [], f"a file name ran as a command: {pwned}"
    # Nothing but inputs, outputs, the canary and the engine's bookkeeping under the root,
    # and nothing new next to it.
    assert {p.split("/")[0] for p in tree(root)} == {"in", "out", "canary.txt", ".spotfan"}
    assert sorted(p.name for p in (root / "in").iterdir()) == sorted(HOSTILE), "inputs untouched"
    after_outside = tree(tmp_path) - {p for p in tree(tmp_path) if p.startswith("root")}
    assert after_outside == before_outside

    again = run_cli(["run", "--cmd", CMD, "--src", "in/*", "--out", "out/{stem}.out",
                     "--root", str(root), "--workers", "2"], tmp_path)
    report = json.loads(again.stdout.strip().splitlines()[-1])
    assert again.returncode == 0 and (report["done_before"], report["ran"]) == (len(HOSTILE), 0), \
        "a second run finds every hostile-named output done and runs nothing"


@pytest.mark.parametrize("args, fragment", [
    (["--src", "in/*", "--out", "../escape/{stem}"], "'..'"),
    (["--src", "in/*", "--out", "/tmp/escape/{stem}"], "absolute"),
    (["--src", "../*", "--out", "out/{stem}"], "'..'"),
    (["--src", "in/*", "--out", ".spotfan/tasks/{stem}"], "bookkeeping"),
])
def test_templates_that_leave_the_root_are_refused(tmp_path: Path, hostile_root: Path, args, fragment):
    proc = run_cli(["run", "--cmd", "cp {src} {out}", *args, "--root", str(hostile_root)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert fragment in proc.stderr
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()
    assert not (hostile_root / "out").exists(), "refused before any work"


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/tmp/outside-abs", "ok/../../../x"])
def test_keys_that_leave_the_root_are_refused(tmp_path: Path, key: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    keys = tmp_path / "keys.txt"
    keys.write_text(f"fine\n{key}\n")
    proc = run_cli(["run", "--cmd", "echo {key} > {out}", "--keys", str(keys), "--out", "{key}",
                    "--root", str(root)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert key in proc.stderr
    assert not (root / "fine").exists(), "refused before any work, even for the good key"
    assert not (tmp_path / "outside").exists() and not Path("/tmp/outside-abs").exists()
