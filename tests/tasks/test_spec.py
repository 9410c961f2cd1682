"""Bad specs fail before any work starts, with a message that says how to fix it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tasks import OutputCollision, SpecError, UnsafePath, filetask, run
from tests.conftest import run_cli


def make_inputs(root: Path, names: list[str], folder: str = "data") -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / folder / n).write_text(n)


def test_lambda_task_is_refused_before_any_work(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt"])
    task = filetask(src="data/*.txt", out="out/{stem}")(lambda src, out: None)
    with pytest.raises(SpecError, match="lambda or is defined inside another function"):
        run(task, root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_closure_task_is_refused(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt"])

    def make():
        @filetask(src="data/*.txt", out="out/{stem}")
        def inner(src: Path, out: Path) -> None:
            out.write_text("x")
        return inner

    with pytest.raises(SpecError, match="move the function to a .py module"):
        run(make(), root=tmp_path)


def test_task_defined_in_main_is_refused(tmp_path: Path, write_module) -> None:
    make_inputs(tmp_path, ["a.txt"])
    script = write_module("script", """
        from pathlib import Path
        from tasks import filetask, run, SpecError

        @filetask(src="data/*.txt", out="out/{stem}")
        def f(src: Path, out: Path) -> None:
            out.write_text("x")

        try:
            run(f, root=".")
        except SpecError as e:
            print("REFUSED:", e)
    """)
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert "REFUSED: task f is defined in __main__" in proc.stdout, proc.stderr
    assert "notebook" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_glob_that_matches_nothing(tmp_path: Path) -> None:
    proc = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "nothing/*.jpg",
                    "--out", "o/{stem}"], tmp_path)
    assert proc.returncode == 2
    assert "matches no file" in proc.stderr and "--root" in proc.stderr


def test_two_keys_one_output(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt", "a.csv"])
    proc = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "data/*",
                    "--out", "o/{stem}.out"], tmp_path)
    assert proc.returncode == 2
    assert "shared by two keys" in proc.stderr and "'o/a.out'" in proc.stderr
    assert "placeholder that differs per key" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("key, fragment", [("../evil", "'..'"), ("/etc/evil", "absolute"),
                                           (".spotfan/x", "bookkeeping")])
def test_key_that_escapes_the_root(tmp_path: Path, key: str, fragment: str) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"fine\n{key}\n")
    proc = run_cli(["run", "--cmd", "echo {key} > {out}", "--keys", str(keys),
                    "--out", "{key}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr
    assert not (tmp_path / "fine").exists(), "no work may start before the spec is checked"


def test_unknown_placeholder(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt"])
    proc = run_cli(["run", "--cmd", "cp {src} {out}", "--src", "data/*.txt",
                    "--out", "o/{basename}.x"], tmp_path)
    assert proc.returncode == 2
    assert "unknown placeholder {basename}" in proc.stderr and "{stem}" in proc.stderr


def test_src_placeholder_with_keys_task_says_why() -> None:
    with pytest.raises(SpecError, match=r"need src="):
        filetask(keys=["a"], out="o/{stem}")(_by_key)


def test_cmd_without_out_is_refused(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt"])
    proc = run_cli(["run", "--cmd", "cat {src}", "--src", "data/*.txt", "--out", "o/{stem}"],
                   tmp_path)
    assert proc.returncode == 2 and "never mentions {out}" in proc.stderr


def test_bad_spec_names(tmp_path: Path, write_module) -> None:
    write_module("mod", """
        def plain(src, out): pass
    """)
    assert "must be module:function" in run_cli(["run", "nocolon"], tmp_path).stderr
    assert "cannot import module 'missing_mod'" in run_cli(["run", "missing_mod:f"], tmp_path).stderr
    proc = run_cli(["run", "mod:plain"], tmp_path)
    assert proc.returncode == 2 and "decorate it with @filetask" in proc.stderr
    assert "has no 'nothere'" in run_cli(["run", "mod:nothere"], tmp_path).stderr


def test_keys_with_spaces_and_non_ascii(tmp_path: Path, write_module) -> None:
    write_module("uni", """
        from pathlib import Path
        from tasks import filetask

        @filetask(keys=["plain", "with space", "naïve café", "日本語", "quote'\\"s"],
                  out="out/{key}.txt")
        def echo(key: str, out: Path) -> None:
            out.write_text(key, encoding="utf-8")
    """)
    proc = run_cli(["run", "uni:echo"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir()}
    assert got == {f"{k}.txt": k for k in ["plain", "with space", "naïve café", "日本語", "quote'\"s"]}


def test_collision_is_an_output_collision(tmp_path: Path) -> None:
    make_inputs(tmp_path, ["a.txt", "b.txt"])
    task = filetask(src="data/*.txt", out="o/same")(_noop)
    with pytest.raises(OutputCollision):
        task.items(tmp_path)


def test_absolute_glob_is_refused() -> None:
    with pytest.raises(UnsafePath):
        filetask(src="/etc/*.conf", out="o/{stem}")(_noop)


def _noop(src: Path, out: Path) -> None:
    out.write_text("x")


def _by_key(key: str, out: Path) -> None:
    out.write_text(key)


@pytest.mark.parametrize("decorator, wrong, meant", [("filetask", "outt", "out"), ("memo", "roots", "root")])
def test_a_misspelled_option_names_the_one_meant(tmp_path: Path, write_module, decorator, wrong, meant) -> None:
    write_module("typo", f"""
        from pathlib import Path
        from tasks import filetask, memo

        @filetask(keys=["a"], {'outt' if decorator == 'filetask' else 'out'}="o/{{key}}.txt")
        def t(key: str, out: Path) -> None:
            out.write_text(key)

        {f'@memo({wrong}=".")' if decorator == 'memo' else ''}
        def shared() -> int:
            return 1
    """)
    r = run_cli(["run", "typo:t"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert f"TypeError: {decorator}() got an unexpected keyword argument '{wrong}'" in r.stderr
    assert f"did you mean {meant}=? @{decorator} takes " in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
