"""Bad input at every boundary of `python -m tasks`: refused before any key runs (exit 2),
with a message that says why, and nothing written outside the run root.

Every case runs the real command line in a fresh process on real files. "Nothing ran"
is checked on disk: no output folder, no execution log; "nothing outside" by comparing
every file next to the root before and after.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.bounds import WORKERS_PER_CPU_MAX
from tests.conftest import run_cli

# Each execution adds a line to ROOT/ran.txt (commands run in the root): a key that ran
# leaves a trace even if its output is refused.
CMD = "cat {src} > {out} && echo ran >> ran.txt"
KEYS_CMD = "printf '%s' {key} > {out} && echo ran >> ran.txt"


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


class Sandbox:
    """tmp_path/root is the run root (with in/ holding three inputs), tmp_path the cwd."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.root = tmp_path / "root"
        (self.root / "in").mkdir(parents=True)
        for name in ("a.txt", "b.txt", "c.txt"):
            (self.root / "in" / name).write_text(f"content of {name}\n")
        self.outside_before = self.outside()

    def outside(self) -> set[str]:
        return {p for p in tree(self.base) if not p.startswith("root")}

    def run(self, *args: str, timeout: float = 120):
        return run_cli([args[0], *args[1:], "--root", str(self.root)], self.base, timeout=timeout)

    def assert_refused(self, proc, *fragments: str) -> None:
        """Exit 2, every fragment in the message, no key ran, nothing written outside."""
        assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        for f in fragments:
            assert f in proc.stderr, f"{f!r} not in:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr
        assert not (self.root / "ran.txt").exists() and not (self.root / "o").exists(), \
            "a key ran before the spec was checked"
        logs = list((self.root / ".spotfan").glob("tasks/*/log/*"))
        assert logs == [], f"execution logs were written: {logs}"
        assert self.outside() == self.outside_before, "something was written outside the root"


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


# -- names that become paths -----------------------------------------------------------------

@pytest.mark.parametrize("name, fragment", [
    ("../../../x", "contains '/'"),
    ("..", "'..'"),
    (".", "names its folder itself"),
    ("a/b", "contains '/'"),
    ("n" * 256, "256 bytes long"),
    ("é" * 128, "256 bytes long"),  # 128 characters, but two bytes each
])
def test_task_names_that_are_not_one_folder_name_are_refused(box: Sandbox, name: str,
                                                             fragment: str) -> None:
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}", "--name", name)
    box.assert_refused(proc, "--name", fragment)
    assert not (box.root / ".spotfan").exists(), "refused before any bookkeeping was written"


def test_absolute_task_name_writes_nothing_at_that_path(box: Sandbox) -> None:
    target = box.base / "abs-escape"
    for command in ("run", "status", "failures"):
        proc = box.run(command, "--cmd", CMD, "--src", "in/*", "--out", "o/{name}",
                       "--name", str(target))
        box.assert_refused(proc, "--name", "contains '/'")
    assert not target.exists()


def test_filetask_name_is_checked_too(box: Sandbox, write_module) -> None:
    write_module("named", """
        from tasks import filetask

        @filetask(src="root/in/*", out="root/o/{name}", name="../../escape")
        def copy(src, out):
            out.write_bytes(src.read_bytes())
    """)
    proc = run_cli(["run", "named:copy"], box.base)
    assert proc.returncode == 2, proc.stderr
    assert "task name '../../escape' contains '/'" in proc.stderr
    assert "PYTHONPATH" not in proc.stderr, "the module was found: no import hint"
    assert not (box.root / "o").exists() and not (box.base / "escape").exists()
    assert not (box.base / ".spotfan").exists()


def test_a_name_fit_for_a_folder_is_used_as_one(box: Sandbox) -> None:
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}",
                   "--name", "thumbs-v2 (trial)")
    assert proc.returncode == 0, proc.stderr
    assert (box.root / ".spotfan/tasks/thumbs-v2 (trial)/log").is_dir()
    assert sorted(p.name for p in (box.root / "o").iterdir()) == ["a.txt", "b.txt", "c.txt"]


# -- placeholders: no conversions, no format specs ------------------------------------------

@pytest.mark.parametrize("cmd, out, shown", [
    ("cat {src!r} > {out}", "o/{stem}", "{src!r}"),
    ("cat {src!s} > {out}", "o/{stem}", "{src!s}"),
    ("cat {src!a} > {out}", "o/{stem}", "{src!a}"),
    ("cat {src:.3} > {out}", "o/{stem}", "{src:.3}"),
    ("cat {src:>200} > {out}", "o/{stem}", "{src:>200}"),
    ("cat {src} > {out!r}", "o/{stem}", "{out!r}"),
    ("cat {src} > {out}", "o/{stem!r}", "{stem!r}"),
    ("cat {src} > {out}", "o/{stem:.2}", "{stem:.2}"),
])
def test_conversions_and_format_specs_are_refused(tmp_path: Path, cmd: str, out: str,
                                                  shown: str) -> None:
    box = Sandbox(tmp_path)
    for name in ("$(touch PWNED).txt", "`touch PWNED`.txt"):
        (box.root / "in" / name).write_text("x\n")
    proc = box.run("run", "--cmd", cmd, "--src", "in/*", "--out", out)
    box.assert_refused(proc, shown, "conversions (!r, !s, !a) and format specs", "shell-quoted")
    pwned = list(tmp_path.rglob("PWNED")) + list(Path.cwd().glob("PWNED"))
    assert pwned == [], f"a file name ran as a command: {pwned}"


def test_the_same_hostile_names_with_plain_placeholders_are_only_names(box: Sandbox) -> None:
    for name in ("$(touch PWNED).txt", "`touch PWNED`.txt"):
        (box.root / "in" / name).write_text(f"{name}\n")
    proc = box.run("run", "--cmd", "cat {src} > {out}", "--src", "in/*", "--out", "o/{name}")
    assert proc.returncode == 0, proc.stderr
    assert (box.root / "o" / "$(touch PWNED).txt").read_text() == "$(touch PWNED).txt\n"
    assert list(box.base.rglob("PWNED")) == []


# -- every key checked at once ----------------------------------------------------------------

def keys_file(box: Sandbox, keys: list[str]) -> str:
    path = box.base / "keys.txt"
    path.write_text("".join(f"{k}\n" for k in keys), encoding="utf-8")
    box.outside_before = box.outside()
    return str(path)


def test_output_names_over_the_filesystem_limit_are_all_named_at_once(box: Sandbox) -> None:
    bad = [f"{c}" * 256 for c in "vwxyz"]  # five keys of 256 bytes
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", keys_file(box, ["fine", *bad, "ok"]),
                   "--out", "o/{key}", "--max-attempts", "3")
    box.assert_refused(proc, "5 key(s) have an output path that cannot be used",
                       "256 bytes long", "at most 255 bytes", "(and 2 more)")
    assert "'vvvvvvvv" in proc.stderr and "'zzzz" not in proc.stderr, "the first few are named"


def test_names_right_at_the_limit_work(box: Sandbox) -> None:
    # 255 bytes is allowed; the temporary, which prefixes the output's name, keeps only its
    # tail, so it stays within the limit too.
    keys = ["k" * 255, "é" * 127 + "x", "d/" * 100 + "e" * 255]
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", keys_file(box, keys), "--out", "{key}")
    assert proc.returncode == 0, proc.stderr
    for key in keys:
        assert (box.root / key).read_text() == key


def test_a_key_too_long_for_a_whole_path_is_a_spec_error_not_an_unusable_root(box: Sandbox) -> None:
    # 3,000 folders of one letter: every name is short, the whole path is not.
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", keys_file(box, ["x/" * 2999 + "x"]),
                   "--out", "o/{key}")
    box.assert_refused(proc, "1 key(s)", "4095-byte limit of a whole path")
    assert "could not be used" not in proc.stderr


def test_a_key_dot_collapsing_onto_the_output_folder_is_refused(box: Sandbox) -> None:
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", keys_file(box, ["a", ".", "b"]),
                   "--out", "o/{key}")
    box.assert_refused(proc, "key '.' -> 'o/.'", "collapse onto the output folder")


@pytest.mark.parametrize("out", ["o/{key}", "o/{key}/"])
def test_an_output_that_is_another_outputs_folder_is_refused(box: Sandbox, out: str) -> None:
    cmd = KEYS_CMD if not out.endswith("/") else "printf '%s' {key} > {out}/k && echo ran >> ran.txt"
    proc = box.run("run", "--cmd", cmd, "--keys", keys_file(box, ["a", "a/b", "c", "c/d/e", "f"]),
                   "--out", out)
    box.assert_refused(proc, "2 output path(s) would be the folder of another key's output",
                       "'a' -> 'o/a' is the folder of 'a/b' -> 'o/a/b'", "'o/c/d/e'")


def test_an_output_that_exists_as_a_folder_for_a_file_task_is_refused(box: Sandbox) -> None:
    (box.root / "o" / "b.txt").mkdir(parents=True)
    (box.root / "o" / "b.txt" / "keep").write_text("mine\n")
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}")
    assert proc.returncode == 2, proc.stderr
    assert "1 output path(s) exist, but not as what this task writes (file outputs)" in proc.stderr
    assert "'o/b.txt' (key 'b.txt') is a folder" in proc.stderr
    assert not (box.root / "ran.txt").exists(), "no key ran, not even the good ones"
    assert sorted(tree(box.root / "o")) == ["b.txt", "b.txt/keep"], "the folder is left alone"
    assert box.outside() == box.outside_before


@pytest.mark.parametrize("out", ["o/x{key}.txt", "o/{key}"])
def test_a_keys_output_that_exists_as_the_wrong_kind_is_refused(box: Sandbox, out: str) -> None:
    """keys= outputs are found by turning listed names back into keys (tasks.scan): a
    folder where a key's file goes is still named, with its key."""
    name = out[2:].replace("{key}", "b")
    (box.root / "o" / name).mkdir(parents=True)
    (box.root / "o" / out[2:].replace("{key}", "a")).write_text("done\n")
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", keys_file(box, ["a", "b", "c"]), "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "1 output path(s) exist, but not as what this task writes (file outputs)" in proc.stderr
    assert f"'o/{name}' (key 'b') is a folder" in proc.stderr
    assert not (box.root / "ran.txt").exists(), "no key ran, not even the good ones"
    assert box.outside() == box.outside_before


def test_a_keys_output_that_exists_as_a_file_for_a_directory_task_is_refused(box: Sandbox) -> None:
    (box.root / "o" / "pa").mkdir(parents=True)
    (box.root / "o" / "pb").write_text("mine\n")
    proc = box.run("run", "--cmd", "printf '%s' {key} > {out}/k && echo ran >> ran.txt",
                   "--keys", keys_file(box, ["a", "b", "c"]), "--out", "o/p{key}/")
    assert proc.returncode == 2, proc.stderr
    assert "(directory outputs): 'o/pb' (key 'b') is a file" in proc.stderr
    assert not (box.root / "ran.txt").exists()
    assert (box.root / "o" / "pb").read_text() == "mine\n"


def test_an_output_that_exists_as_a_file_for_a_directory_task_is_refused(box: Sandbox) -> None:
    (box.root / "o").mkdir()
    (box.root / "o" / "a").write_text("mine\n")
    proc = box.run("run", "--cmd", "cp {src} {out}/copy && echo ran >> ran.txt",
                   "--src", "in/*", "--out", "o/{stem}/")
    assert proc.returncode == 2, proc.stderr
    assert "(directory outputs): 'o/a' (key 'a.txt') is a file" in proc.stderr
    assert not (box.root / "ran.txt").exists()
    assert (box.root / "o" / "a").read_text() == "mine\n"


def test_an_output_folder_that_is_a_file_is_refused(box: Sandbox) -> None:
    (box.root / "o").write_text("a file where a folder goes\n")
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}")
    assert proc.returncode == 2, proc.stderr
    assert "'o', the folder of 'o/a.txt', is a file" in proc.stderr
    assert not (box.root / "ran.txt").exists()


def test_a_bad_signature_is_refused_before_any_key(box: Sandbox, write_module) -> None:
    write_module("sig_extra", """
        from tasks import filetask

        @filetask(src="root/in/*", out="root/o/{name}")
        def f(src, out, bogus):
            out.write_text("ran")
    """)
    write_module("sig_slash", """
        from tasks import filetask

        @filetask(src="root/in/*", out="root/o/{name}")
        def f(src, out, /):
            out.write_text("ran")
    """)
    write_module("sig_fine", """
        from tasks import filetask

        @filetask(src="root/in/*", out="root/o/{name}")
        def f(src, out, extra=1, *, more="fine", **rest):
            out.write_text(src.read_text())
    """)
    proc = run_cli(["run", "sig_extra:f", "--max-attempts", "3"], box.base)
    assert proc.returncode == 2, proc.stderr
    assert "task function f needs an argument `bogus` that the engine never passes" in proc.stderr
    assert "src, out, key, ctx, root" in proc.stderr and "PYTHONPATH" not in proc.stderr
    assert "attempt" not in proc.stderr, "refused once, not failed key by key"
    assert not (box.root / "o").exists() and not (box.base / ".spotfan").exists()
    proc = run_cli(["run", "sig_slash:f"], box.base)
    assert proc.returncode == 2 and "`src` as positional-only" in proc.stderr, proc.stderr
    assert not (box.root / "o").exists()
    proc = run_cli(["run", "sig_fine:f"], box.base)
    assert proc.returncode == 0, "parameters with defaults are fine: " + proc.stderr
    assert sorted(p.name for p in (box.root / "o").iterdir()) == ["a.txt", "b.txt", "c.txt"]


# -- source globs --------------------------------------------------------------------------

def test_folders_matched_by_a_glob_are_not_inputs(box: Sandbox) -> None:
    (box.root / "in" / "sub").mkdir()
    (box.root / "in" / "sub" / "deep.txt").write_text("deep\n")
    (box.root / "in" / "looks-like-a-file.txt").mkdir()
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (report["total"], report["succeeded"], report["failed"]) == (3, 3, 0)
    assert sorted(p.name for p in (box.root / "o").iterdir()) == ["a.txt", "b.txt", "c.txt"]
    # {parent} is empty for files at the glob's base: "o2//a" names "o2/a".
    proc = box.run("run", "--cmd", CMD, "--src", "in/**", "--out", "o2/{parent}/{stem}")
    assert proc.returncode == 0, proc.stderr
    assert sorted(tree(box.root / "o2")) == ["a", "b", "c", "sub", "sub/deep"]


def test_a_glob_matching_only_folders_says_so(box: Sandbox) -> None:
    proc = box.run("run", "--cmd", CMD, "--src", "*", "--out", "o/{name}")
    box.assert_refused(proc, "matches no file", "1 folder(s) matched: folders are not inputs")


# -- the keys file ------------------------------------------------------------------------

def test_keys_file_that_is_not_utf8_is_a_clear_error(box: Sandbox) -> None:
    path = box.base / "keys.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")
    box.outside_before = box.outside()
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", str(path), "--out", "o/{key}")
    box.assert_refused(proc, "is not UTF-8 text", "byte 0xe9 on line 2", "iconv")


def test_keys_file_splits_on_newlines_only(box: Sandbox) -> None:
    # Python's str.splitlines() would split each of these keys in two (or more).
    keys = ["form\x0cfeed", "vertical\x0btab", "mid\rreturn", "line\u2028separator",
            "para\u2029separator", "next\x85line", "file\x1cseparator", "plain"]
    path = box.base / "keys.txt"
    path.write_bytes(("\r\n".join(keys[:4]) + "\r\n\n  \n" + "\n".join(keys[4:]) + "\n").encode())
    proc = box.run("run", "--cmd", KEYS_CMD, "--keys", str(path), "--out", "o/{key}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["total"] == len(keys), report
    got = {p.name: p.read_bytes().decode() for p in (box.root / "o").iterdir()}
    assert got == {k: k for k in keys}


# -- numbers --------------------------------------------------------------------------------

@pytest.mark.parametrize("command, option, value", [
    ("run", "--lease", "nan"), ("run", "--lease", "inf"), ("run", "--lease", "-inf"),
    ("run", "--lease", "-5"), ("run", "--lease", "4"), ("run", "--lease", "1e300"),
    ("run", "--lease", "soon"),
    ("run", "--max-attempts", "0"), ("run", "--max-attempts", "-1"),
    ("run", "--max-attempts", "1000000"), ("run", "--max-attempts", "2.5"),
    ("run", "--limit", "0"), ("run", "--limit", "10000000000000"),
    ("run", "--chunk-size", "0"), ("run", "--chunk-size", "100000000"),
    ("run", "--workers", "0"), ("run", "--workers", "-3"), ("run", "--workers", "nan"),
    ("status", "--lease", "nan"), ("failures", "--lease", "inf"),
    ("collect", "--workers", "0"), ("collect", "--workers", "100000"),
])
def test_numbers_out_of_bounds_are_refused(box: Sandbox, command: str, option: str,
                                           value: str) -> None:
    extra = ["--to", str(box.base / "t.pkl")] if command == "collect" else []
    proc = box.run(command, "--cmd", CMD, "--src", "in/*", "--out", "o/{name}", f"{option}={value}",
                   *extra)
    box.assert_refused(proc, f"argument {option}: must be", "got ")
    assert not (box.root / ".spotfan").exists()
    assert not (box.base / "t.pkl").exists()


def test_workers_far_above_the_core_count_are_capped_with_a_warning(box: Sandbox) -> None:
    cap = WORKERS_PER_CPU_MAX * (os.cpu_count() or 1)
    proc = box.run("run", "--cmd", CMD, "--src", "in/*", "--out", "o/{name}",
                   "--workers", "10000", "--executor", "thread")
    assert proc.returncode == 0, proc.stderr
    assert (f"--workers 10000 is far above this machine's {os.cpu_count()} core(s): starting "
            f"{cap} (at most {WORKERS_PER_CPU_MAX} per core)") in proc.stderr
    assert sorted(p.name for p in (box.root / "o").iterdir()) == ["a.txt", "b.txt", "c.txt"]


# -- what a failed run reports ----------------------------------------------------------------

def test_failed_after_uses_each_keys_recorded_attempts(box: Sandbox, write_module) -> None:
    write_module("flaky", """
        from tasks import filetask

        @filetask(keys=["good", "bad"], out="root/o/{key}")
        def always_bad(key, out):
            if key == "bad":
                raise ValueError("bad key")
            out.write_text(key)
    """)
    first = run_cli(["run", "flaky:always_bad", "--max-attempts", "2"], box.base)
    assert first.returncode == 1
    assert "1 key(s) failed after 2 attempt(s): 'bad'" in first.stderr, first.stderr
    # A later run with another --max-attempts reports the key given up earlier: its
    # record says 2 attempts, whatever this run's limit.
    again = run_cli(["run", "flaky:always_bad", "--max-attempts", "7"], box.base)
    assert again.returncode == 1
    assert "1 key(s) failed after 2 attempt(s): 'bad'" in again.stderr, again.stderr
    assert "7 attempt" not in again.stderr


# -- import errors: the module's own error, hints only when it was not found ------------------

@pytest.mark.parametrize("source, fragments", [
    ("def broken(:\n    pass\n", ["SyntaxError: invalid syntax", "broken_mod.py, line 1"]),
    ("import no_such_dependency_xyz\n", ["imports 'no_such_dependency_xyz', which is not installed"]),
    ("raise RuntimeError('config missing.')\n",
     ["RuntimeError: config missing. (", "broken_mod.py, line 1"]),
    ("from tasks import filetask\n\n@filetask(keys=['a'], out='o/{stem}')\ndef f(key, out):\n"
     "    pass\n", ["output template 'o/{stem}' uses unknown placeholder {stem}"]),
])
def test_a_module_that_fails_shows_its_own_error(box: Sandbox, source: str,
                                                 fragments: list[str]) -> None:
    (box.base / "broken_mod.py").write_text(source)
    for args in (["run", "broken_mod:f"],
                 ["collect", "--cmd", CMD, "--src", "root/in/*", "--out", "root/o/{name}",
                  "--to", "t.pkl", "--reader", "broken_mod:f"]):
        proc = run_cli(args, box.base)
        assert proc.returncode == 2, proc.stderr
        for f in fragments:
            assert f in proc.stderr, proc.stderr
        assert "PYTHONPATH" not in proc.stderr, "the module was found: no hint about where"
        assert ".." not in proc.stderr.replace("...", ""), "no doubled full stop"
        assert "Traceback" not in proc.stderr


def test_a_module_not_found_gets_the_hint(box: Sandbox) -> None:
    proc = run_cli(["run", "not_a_module_here:f"], box.base)
    assert proc.returncode == 2
    assert ("cannot import module 'not_a_module_here': no module named 'not_a_module_here'. "
            "Run from the folder that holds it, or add that folder to PYTHONPATH") in proc.stderr
    assert ".." not in proc.stderr


def test_a_tmpdir_too_long_for_the_forkserver_socket_is_refused_with_the_fix(tmp_path: Path,
                                                                             write_module) -> None:
    write_module("t", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["a", "b"], out="out/{key}.txt")
        def make(key: str, out: Path) -> None:
            out.write_text(key)
        """)
    long_tmp = tmp_path / ("t" * 90)
    long_tmp.mkdir()
    done = run_cli(["run", "t:make"], tmp_path, env={**os.environ, "TMPDIR": str(long_tmp)})
    assert done.returncode == 2, done.stderr
    assert "Unix socket path" in done.stderr and "set TMPDIR to a shorter folder" in done.stderr
    assert not (tmp_path / "out").exists()
    spawned = run_cli(["run", "t:make", "--start-method", "spawn"], tmp_path,
                      env={**os.environ, "TMPDIR": str(long_tmp)})
    assert spawned.returncode == 0, spawned.stderr
