"""A runner's picture of a task's claim units: which peers finished or hold (from two
listings), and which to claim next.

Units to claim are walked in one order that every runner shares (their names, sorted),
each runner from a random start. A runner that meets a unit a peer holds jumps to the
middle of the longest stretch of units nobody holds, so runners spread out over the
units and rarely reach for the same one: a claim seldom finds its unit finished already.
"""
from __future__ import annotations

import math
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path

from tasks.claims import Folder, listing, parse_claim_name

VIEW_REFRESH_S = 0.05  # list done/ and claims/ again before claiming, at most this often,
VIEW_REFRESH_PER_NAME_S = 1e-4  # ... plus this per name listed (a listing of 100 names is
#                                 one round trip over SSHFS: big listings are looked at less)
OWNERS_REFRESH_S = 1.0  # count the live runners (owners/) at most this often


class UnitView:
    """Which units peers finished since this run listed the outputs, and which are held,
    from two listings (`done/`, `claims/`), refreshed at most every VIEW_REFRESH_S; and how
    many runners the root has (`owners/`, every OWNERS_REFRESH_S), for sizing the last chunks."""

    def __init__(self, done: Folder, claims: Folder, markers_before: set[str], *,
                 lister: Callable[[list[Path]], list[set[str]]] | None = None,
                 owners: Path | None = None) -> None:
        self.done = done
        self.claims = claims
        self.owners_dir = owners
        self.owners = 1  # live runners on the root (all tasks), this one included
        self.owners_at = -math.inf
        self.lister = lister  # lists folders in order over the runner's session (tasks.direct)
        self.markers_before = markers_before  # markers older than our output listing: ignored
        self.finished: set[str] = set()
        self.new: set[str] = set()  # finished since take_new() was last called
        self.held: set[str] = set()
        self.at = -math.inf
        self.interval = VIEW_REFRESH_S

    def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.at < self.interval:
            return
        # claims/ before done/: a peer marks a unit done before it drops the claim, so a
        # unit missing from both listings was not finished before the first one.
        now = time.monotonic()
        extra = ([self.owners_dir] if self.owners_dir is not None
                 and now - self.owners_at >= OWNERS_REFRESH_S else [])
        if self.lister is not None:
            claims, names, *owners = self.lister([self.claims.path, self.done.path, *extra])
        else:
            claims, names = self.claims.names(), self.done.names()
            owners = [listing(p) for p in extra]
        if owners:
            self.owners = max(1, sum(1 for n in owners[0] if n.endswith(".json")))
            self.owners_at = now
        self.held = {p[0] for p in map(parse_claim_name, claims) if p}
        finished = names - self.markers_before
        self.new |= finished - self.finished
        self.finished = finished
        self.at = time.monotonic()
        self.interval = VIEW_REFRESH_S + (len(names) + len(claims)) * VIEW_REFRESH_PER_NAME_S

    def take_new(self) -> set[str]:
        new, self.new = self.new, set()
        return new


class UnitRing:
    """Units still to claim, in the shared order, and where this runner walks."""

    def __init__(self, units: Iterable[str], rng: random.Random) -> None:
        self.ring = sorted(units)
        self.index = {u: i for i, u in enumerate(self.ring)}
        self.todo = list(range(len(self.ring)))  # sorted indices into ring
        self.pos = rng.randrange(len(self.ring)) if self.ring else 0

    def __bool__(self) -> bool:
        return bool(self.todo)

    def __len__(self) -> int:
        return len(self.todo)

    def add(self, unit: str) -> None:
        i = self.index[unit]
        at = bisect_left(self.todo, i)
        if at == len(self.todo) or self.todo[at] != i:
            self.todo.insert(at, i)

    def discard(self, unit: str) -> None:
        i = self.index[unit]
        at = bisect_left(self.todo, i)
        if at < len(self.todo) and self.todo[at] == i:
            del self.todo[at]

    def take(self, want: int, held: set[str]) -> tuple[list[str], list[str]]:
        """Up to `want` units to try next, and the units skipped because they are held."""
        picked: list[str] = []
        skipped: list[str] = []
        jumped = False
        while len(picked) < want and self.todo:
            at = bisect_left(self.todo, self.pos) % len(self.todo)
            i = self.todo.pop(at)
            unit = self.ring[i]
            if unit in held:
                skipped.append(unit)
                if not jumped:
                    self.pos = self._middle_of_longest_gap(held)
                    jumped = True
                continue
            picked.append(unit)
            self.pos = i + 1
        return picked, skipped

    def jump(self, held: set[str]) -> None:
        """Walk on from the middle of the longest stretch nobody holds (after meeting a
        unit a peer just finished: that peer walks the same way, just ahead)."""
        self.pos = self._middle_of_longest_gap(held)

    def _middle_of_longest_gap(self, held: set[str]) -> int:
        """The ring index in the middle of the longest circular run of units to claim
        between two units someone holds (where runners are working now)."""
        blockers = {self.index[u] for u in held if u in self.index}
        if not blockers or not self.todo:
            return self.pos
        merged = sorted(set(self.todo) | blockers)
        n = len(merged)
        first = next(k for k, i in enumerate(merged) if i in blockers)
        best_len, best_mid, run = 0, self.pos, []
        for step in range(1, n + 1):  # once around, starting after a blocker
            i = merged[(first + step) % n]
            if i in blockers:
                if len(run) > best_len:
                    best_len, best_mid = len(run), run[len(run) // 2]
                run = []
            else:
                run.append(i)
        return best_mid
