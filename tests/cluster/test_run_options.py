"""`fab run` refuses bad numbers and task names on the laptop (exit 2), before it writes a
run request that every VM would pick up and fail on."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("option, value, fragment", [
    ("--lease", "nan", "--lease 'nan' is not a number of seconds"),
    ("--lease", "inf", "--lease 'inf' is not a number of seconds"),
    ("--lease", "-5", "--lease '-5' is not a number of seconds"),
    ("--lease", "1e12", "got 1000000000000.0"),
    ("--max-attempts", "-1", "--max-attempts '-1' is not a whole number"),
    ("--max-attempts", "1000", "got 1000"),
    ("--limit", "-5", "--limit '-5'"),
    ("--workers-per-vm", "-2", "--workers-per-vm '-2'"),
    ("--workers-per-vm", "100000", "got 100000"),
    ("--name", "../../x", "--name '../../x' contains '/'"),
    ("--name", "..", "--name '..' is '..'"),
])
def test_fab_run_refuses_bad_options_before_writing_a_request(make_lab, option: str, value: str,
                                                              fragment: str) -> None:
    lab = make_lab(workers=0)  # nothing started: the refusal needs no VM and no head
    r = lab.fab("run", "cp {src} {out}", "--src", "in/*", "--out", "o/{name}", f"{option}={value}")
    assert r.returncode == 2, f"{r.stdout}\n{r.stderr}"
    assert fragment in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (lab.share / ".spotfan").exists(), "no run request was written"
