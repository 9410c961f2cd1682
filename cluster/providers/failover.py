"""The capacity failover every cloud provider shares: try VMs on each place in order, move on at a stockout.

A place is whatever a provider tries in turn (a GCE zone; an EC2 instance type in a zone
or subnet). Every VM still pending is tried on the next place at once (one fan-out per
place); a VM that meets a StockoutError stays pending, any other error is that VM's
failure, and a QuotaError ends the search (a quota is per project or account and region:
no other place helps). `raise_unplaced` then turns what is left into one error: the quota,
the one cause when nothing was made, each VM's result, or the stockout.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cluster.errors import GroupError, ProvisionError, QuotaError, StockoutError
from cluster.fanout import failed, first_failure

P = TypeVar("P")


@dataclass(frozen=True)
class Placement(Generic[P]):
    """What trying the places did."""

    placed: dict[str, P]  # VM name -> the place it was made on
    bad: dict[str, Exception]  # VM name -> the error that stopped it (not a stockout)
    pending: list[str]  # VMs no place had room for
    full: list[P]  # the places that had no room for some VM, in the order tried


def place(names: Sequence[str], places: Sequence[P], attempt: Callable[[str, P, int], object], *,
          fan_out: Callable[[Sequence[str], Callable[[str], Any]], dict[str, Any]],
          on_full: Callable[[P, dict[str, Any]], None], landed: Callable[[P], str],
          log: logging.Logger) -> Placement[P]:
    """Try every pending VM of `names` on each of `places` in turn: `attempt(name, place, try)`
    (the try counts from 1). `on_full(place, results)` says (logs) that a place had no room for
    the VMs whose results are stockouts; `landed(place)` words a place for the log of where VMs landed."""
    placed: dict[str, P] = {}
    bad: dict[str, Exception] = {}
    pending = list(names)
    full: list[P] = []
    for tried, where in enumerate(places, 1):
        if not pending:
            break
        results = fan_out(pending, lambda n, where=where, tried=tried: attempt(n, where, tried))
        pending = [n for n, r in results.items() if isinstance(r, StockoutError)]
        bad.update({n: r for n, r in failed(results).items() if n not in pending})
        placed.update({n: where for n, r in results.items() if not isinstance(r, Exception)})
        if pending:
            full.append(where)
            on_full(where, {n: results[n] for n in pending})
        if any(isinstance(r, QuotaError) for r in bad.values()):
            break  # a quota is per project or account and region: other places will not help
    for where in _unique(placed.values()):
        made = sorted(n for n, p in placed.items() if p == where)
        log.info("%d VM(s) landed %s: %s", len(made), landed(where), ", ".join(made))
    return Placement(placed=placed, bad=bad, pending=pending, full=full)


def raise_unplaced(p: Placement[Any], *, verb: str, made: str, no_room: Callable[[str], str]) -> None:
    """Raise what stopped VMs from being made, if anything did. `verb` ("create") and `made`
    ("created") word the messages; `no_room(done)` is the stockout's, with `done` (what was made)."""
    quota = [r for r in p.bad.values() if isinstance(r, QuotaError)]
    not_made = ", ".join(sorted(set(p.pending) | set(p.bad)))
    done = f"; {made}: {', '.join(sorted(p.placed)) or 'none'}"
    if quota:
        raise QuotaError(f"{quota[0]} (not {made}: {not_made}{done})") from quota[0]
    if p.bad and not p.placed and all(isinstance(r, ProvisionError) for r in p.bad.values()):
        # Nothing was made: almost always one cause (image, zone, API) worth one clear message.
        first = p.bad[sorted(p.bad)[0]]
        raise ProvisionError(f"{first} (not {made}: {not_made})") from first
    if p.bad:
        raise GroupError(f"could not {verb} {', '.join(sorted(p.bad))}: {first_failure(p.bad)}{done}",
                         {**p.placed, **p.bad})
    if p.pending:
        raise StockoutError(no_room(done))


def _unique(items: Any) -> list[Any]:
    """Each item once, sorted where they compare (places of one kind do), else in first-seen order."""
    seen = list(dict.fromkeys(items))
    try:
        return sorted(seen)
    except TypeError:
        return seen
