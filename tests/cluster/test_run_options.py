"""`fab run` refuses bad numbers and task names on the laptop (exit 2), before it writes a
run request that every VM would pick up and fail on."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("option, value, fragment", [
    ("--lease", "nan", "--lease must be a number of seconds from 5 to 86400, got nan"),
    ("--lease", "inf", "got inf"),
    ("--lease", "-5", "got -5.0"),
    ("--lease", "1e12", "got 1000000000000.0"),
    ("--max-attempts", "-1", "--max-attempts must be a whole number from 1 to 100, got -1"),
    ("--max-attempts", "1000", "got 1000"),
    ("--limit", "-5", "--limit must be a whole number from 1 to"),
    ("--workers-per-vm", "-2", "--workers-per-vm must be a whole number from 1 to 1024"),
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
