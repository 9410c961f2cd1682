"""What `fab status` lists: every going run and the latest ended ones, or every run with --all."""
from __future__ import annotations

import io
from contextlib import redirect_stdout

from cluster import show
from cluster.status import ClusterStatus, RunStatus


def _run(i: int, result: str | None) -> RunStatus:
    return RunStatus(id=f"r{i:02d}", spec="t:f", result=result, requested=1000.0 + i,
                     ended=None if result is None else 2000.0 + i)


def test_status_lists_going_runs_and_the_latest_ended_ones_and_all_with_every() -> None:
    runs = [_run(i, None if i in (0, 9) else "done") for i in range(12)]  # r00 and r09 still go
    shown, older = show.shown_runs(runs, every=False)
    assert sorted(r.id for r in shown) == ["r00", "r06", "r07", "r08", "r09", "r10", "r11"]
    assert older == 12 - 7
    assert [r.id for r in shown] == [r.id for r in runs if r in shown], "in the share's order"
    every, none_left = show.shown_runs(runs, every=True)
    assert every == runs and none_left == 0

    st = ClusterStatus(name="c", provider="lab", vms=[], runs=runs, prices="local")
    out = io.StringIO()
    with redirect_stdout(out):
        show.status(st)
    text = out.getvalue()
    assert "run r00: running" in text and "run r11: done" in text and "run r05:" not in text
    assert "(5 older ended run(s) not shown: `fab status --all` lists every run)" in text
    out = io.StringIO()
    with redirect_stdout(out):
        show.status(st, every=True)
    assert "run r05: done" in out.getvalue() and "older ended" not in out.getvalue()
