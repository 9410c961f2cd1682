"""Weekly features: 260 weekly feature tables (five years) from one generated event log,
with pandas; one key per week, outputs as Parquet, collected into one table at the end.

    python -m examples.weekly prepare --root DIR [--n 300000]
    python -m tasks run examples.weekly:weekly --root DIR
    python -m tasks collect examples.weekly:weekly --root DIR --to weekly.parquet

The event log (ROOT/events/events.parquet) has one row per event: time, user, category,
kind (view, cart, buy) and amount. It is sorted by time and written in row groups of
about a week, so each task reads only the weeks it needs (a Parquet filter). The table
of week W has one row per user active in W: counts and spend in W, spend and purchases
over the LOOKBACK_WEEKS before W, and days since the user's previous event.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import filetask

WEEKS = 260  # five years of weeks: one key each
FIRST_WEEK = date(2020, 1, 6)  # a Monday
LOOKBACK_WEEKS = 4
DEFAULT_N = 300_000  # events made by `prepare`
USERS = 3000
CATEGORIES = ("books", "games", "garden", "health", "home", "music", "sports", "toys")
KINDS = ("view", "cart", "buy")
EVENTS = Path("events") / "events.parquet"  # relative to the run root: workers run there


def week_keys() -> list[str]:
    """The keys: each week's Monday, e.g. "2020-01-06"."""
    return [(FIRST_WEEK + timedelta(weeks=i)).isoformat() for i in range(WEEKS)]


@filetask(keys=week_keys, out="weekly/{key}.parquet")
def weekly(key: str, out: Path) -> None:
    week = pd.Timestamp(key)
    since = week - pd.Timedelta(weeks=LOOKBACK_WEEKS)
    until = week + pd.Timedelta(weeks=1)
    events = pd.read_parquet(EVENTS, filters=[("ts", ">=", since), ("ts", "<", until)])
    week_features(events, week).to_parquet(out, index=False)


def week_features(events: pd.DataFrame, week: pd.Timestamp) -> pd.DataFrame:
    """One row per user active in `week`, from that week's events and the weeks before."""
    now = events[events["ts"] >= week]
    before = events[events["ts"] < week]
    buys = now["kind"] == "buy"
    g = now.groupby("user")
    table = pd.DataFrame({
        "events": g.size(),
        "views": (now["kind"] == "view").groupby(now["user"]).sum(),
        "carts": (now["kind"] == "cart").groupby(now["user"]).sum(),
        "buys": buys.groupby(now["user"]).sum(),
        "spend": now["amount"].where(buys, 0.0).groupby(now["user"]).sum(),
        "categories": g["category"].nunique(),
        "first_seen": g["ts"].min(),
    })
    b_buys = before["kind"] == "buy"
    table["spend_prev"] = before["amount"].where(b_buys, 0.0).groupby(before["user"]).sum()
    table["buys_prev"] = b_buys.groupby(before["user"]).sum()
    table[["spend_prev", "buys_prev"]] = table[["spend_prev", "buys_prev"]].fillna(0)
    last_before = before.groupby("user")["ts"].max()
    table["days_since_prev"] = (table["first_seen"] - last_before).dt.total_seconds() / 86400
    table = table.drop(columns="first_seen").reset_index()
    table.insert(0, "week", week)
    return table.astype({"buys_prev": "int64", "views": "int64", "carts": "int64",
                         "buys": "int64"})


def make_events(n: int, *, seed: int = 0) -> pd.DataFrame:
    """`n` events spread over WEEKS weeks, sorted by time."""
    rng = np.random.default_rng(seed)
    span_s = WEEKS * 7 * 86400
    ts = pd.Timestamp(FIRST_WEEK) + pd.to_timedelta(np.sort(rng.integers(0, span_s, n)), unit="s")
    user = (rng.pareto(1.2, n) * 50).astype(np.int64) % USERS  # a few users do most
    kind = rng.choice(len(KINDS), n, p=[0.8, 0.15, 0.05])
    return pd.DataFrame({
        "ts": ts,
        "user": user,
        "category": pd.Categorical.from_codes(rng.integers(0, len(CATEGORIES), n), CATEGORIES),
        "kind": pd.Categorical.from_codes(kind, KINDS),
        "amount": np.round(rng.lognormal(3.0, 1.0, n), 2),
    })


def prepare(root: str | Path, *, n: int = DEFAULT_N, seed: int = 0) -> Path:
    """Write the event log under ROOT/events/ (atomically; replaced if it exists)."""
    path = Path(root) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}")
    # About one row group per week, so a task's filter skips the rest of the file.
    make_events(n, seed=seed).to_parquet(tmp, index=False, row_group_size=max(1000, n // WEEKS))
    tmp.rename(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.weekly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--root", required=True, help="run root to write events/ into")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"events (default {DEFAULT_N})")
    args = parser.parse_args(argv)
    path = prepare(args.root, n=args.n)
    print(f"wrote {args.n} events to {path}; next:\n"
          f"  python -m tasks run examples.weekly:weekly --root {args.root}\n"
          f"  python -m tasks collect examples.weekly:weekly --root {args.root} "
          "--to weekly.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
