"""Claims on an object-store root: the POSIX protocol (tasks/claims.py) with the store
deciding each step atomically.

    claim            create claims/<unit> only if absent (If-None-Match: * / ifGenerationMatch=0)
    heartbeat        rewrite it only if unchanged (If-Match: ETAG / ifGenerationMatch=GEN)
    take over        a claim whose `updated` is older than the lease on the store's clock:
                     create claims/<unit>.1, .2, ... only if absent, so of two takers one wins
    finish a unit    create done/<unit>, then delete our claim (only our version of it)

What a claim holds is its holder's stamp and a count of its writes, so that every write is
new bytes (an S3 ETag is the MD5 of the content: a rewrite of the same bytes would keep the
version, and a lost answer could not be told from a peer's write).
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

from tasks.claims import MAX_GENERATIONS, ClaimBook, Held, parse_claim_name
from tasks.layout import Layout
from tasks.records import Stamp
from tasks.store.bucket import ObjectInfo, Refused
from tasks.store.root import BucketRoot

logger = logging.getLogger(__name__)


class BucketFolder:
    """A claims or done "folder" under a bucket root, listed by name (UnitView's view)."""

    def __init__(self, root: BucketRoot, rel: Path) -> None:
        self.root = root
        self.path = rel

    def names(self) -> set[str]:
        return self.root.names(self.path)


def claim_rel(claims: Path, unit: str, gen: int) -> str:
    return f"{claims}/{unit if gen == 0 else f'{unit}.{gen}'}"


class BucketClaims(ClaimBook):
    """The claims one `run` process holds on one task's units, on a bucket root."""

    def __init__(self, root: BucketRoot, layout: Layout, *, lease_s: float) -> None:
        super().__init__(lease_s=lease_s, clock=root.clock, pipelined=True)
        self.root = root
        self.claims_rel = layout.claims
        self.done_rel = layout.done
        self.dir = root.name(layout.claims)  # the fence's claims prefix (tasks.store.publish)
        self.folder = BucketFolder(root, layout.claims)
        self.done = BucketFolder(root, layout.done)
        self._writes = itertools.count()

    def _data(self) -> bytes:
        stamp = json.loads(self.stamp)
        return json.dumps({**stamp, "write": next(self._writes), "at": time.time()}).encode()

    def _acquire_one(self, unit: str) -> tuple[Held, bool] | None:
        for gen in range(MAX_GENERATIONS):
            rel = claim_rel(self.claims_rel, unit, gen)
            made = self.root.create(rel, self._data())
            if made is None:
                got = self.root.bucket.get(self.root.name(rel))
                if got is None:  # released between our create and our look
                    made = self.root.create(rel, self._data())
                    if made is None:
                        return None
                else:
                    age = self.root.age(got.info)
                    if age < self.lease_s and not _gone(got.data):
                        return None  # a live owner holds it
                    logger.info("claim %s is %.0fs old (lease %.0fs) or its holder on this "
                                "host is gone: taking over", rel.rsplit("/", 1)[-1], age, self.lease_s)
                    continue
            held = Held(unit, rel.rsplit("/", 1)[-1], gen, made.version, time.monotonic())
            return held, self.root.bucket.stat(self.root.name(f"{self.done_rel}/{unit}")) is not None
        logger.warning("claim unit %s was taken over %d times; leaving it for this run",
                       unit, MAX_GENERATIONS)
        return None

    def _rewrite(self, held: Held) -> bool:
        rel = f"{self.claims_rel}/{held.name}"
        try:
            made = self.root.bucket.replace(self.root.name(rel), self._data(), version=held.handle)
        except Exception as e:  # a flaky store must not kill the heartbeat; the claim may expire
            logger.warning("could not refresh claim %s: %s", held.name, e)
            return False
        if isinstance(made, Refused):
            # Nobody rewrites a claim but its holder: it was removed (a sweep judged it stale)
            logger.warning("claim %s was %s meanwhile; leaving its keys to whoever holds it now",
                           held.name, "removed" if made.reason == "missing" else "replaced")
            held.touched = -float("inf")  # check_lost drops it
            return False
        self.root.learn(made)
        held.handle = made.version
        return True

    def _release_one(self, held: Held, done: bool) -> None:
        if done:
            try:
                self.root.create(f"{self.done_rel}/{held.unit}", b"")
            except Exception as e:
                logger.warning("could not mark unit %s done: %s", held.unit, e)
        if self._expired(held):
            return
        try:
            # Ours only if it is still our version; earlier generations are dead owners'.
            self.root.delete(f"{self.claims_rel}/{held.name}", version=held.handle)
            for gen in range(held.generation):
                self.root.delete(claim_rel(self.claims_rel, held.unit, gen))
        except Exception as e:
            logger.warning("could not remove claim %s: %s", held.name, e)


def _gone(data: bytes) -> bool:
    """The claim's holder ran on this host and its process is gone (a VM back from a
    preemption takes its own claims back at once)."""
    try:
        stamp = Stamp.from_json(data.decode("utf-8"))
    except UnicodeDecodeError:
        return False
    return stamp is not None and stamp.gone()


def live_claims(root: BucketRoot, layout: Layout, *, lease_s: float) -> dict[str, float]:
    """Unit -> age in seconds of its freshest claim, for claims younger than the lease."""
    live: dict[str, float] = {}
    for e in root.entries(layout.claims):
        parsed = parse_claim_name(e.name)
        if parsed is None:
            continue
        age = root.age(e.info)
        if age < lease_s:
            live[parsed[0]] = min(age, live.get(parsed[0], age))
    return live


def sweep_claims(root: BucketRoot, layout: Layout, finished: set[str], *, lease_s: float) -> int:
    """Remove stale claims on units this run saw finished (left by runners that died after
    publishing), each only if unchanged since listed. Returns how many were removed."""
    stale: list[tuple[str, ObjectInfo]] = []
    for e in root.entries(layout.claims):
        parsed = parse_claim_name(e.name)
        if parsed is not None and parsed[0] in finished and root.age(e.info) > lease_s:
            stale.append((e.name, e.info))
    gone = root.map(lambda s: root.delete(f"{layout.claims}/{s[0]}", version=s[1].version), stale)
    return sum(gone)
