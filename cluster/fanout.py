"""One function over many items at once: every item's result or exception, and one GroupError at the end.

A fan-out never stops half-way: each item runs to its end, and the caller gets
`{key: result | exception}` (Fabric's GroupResult), or, from `all_ok`, the results once
every item succeeded and else one GroupError that carries all of them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from cluster.errors import ClusterError, GroupError

logger = logging.getLogger(__name__)

MAX_PARALLEL = 32  # threads of one fan-out (each mostly waits on the network)

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def fan_out(items: Iterable[T], fn: Callable[[T], R], *, key: Callable[[T], K],
            max_parallel: int = MAX_PARALLEL) -> dict[K, R | Exception]:
    """`fn(item)` for every item in parallel; `{key(item): result or the exception it raised}`.

    An exception that is not one of ours (a bug, an unexpected library error) is logged
    with its traceback, and kept like any other: it never hides what the others did.
    """
    items = list(items)
    if not items:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(items)))) as pool:
        futures = {key(item): pool.submit(fn, item) for item in items}
    results: dict[K, R | Exception] = {}
    for k, future in futures.items():
        error = future.exception()
        if error is None:
            results[k] = future.result()
        elif isinstance(error, Exception):
            if not isinstance(error, ClusterError):
                logger.error("%s failed unexpectedly", k, exc_info=error)
            results[k] = error
        else:
            raise error  # KeyboardInterrupt, SystemExit: not a result
    return results


def failed(results: Mapping[K, object]) -> dict[K, Exception]:
    """The items of a fan-out that raised."""
    return {k: r for k, r in results.items() if isinstance(r, Exception)}


def all_ok(results: Mapping[K, R | Exception], *, what: str, of: str = "VMs") -> dict[K, R]:
    """The results when no item failed; else one GroupError naming each failure."""
    bad = failed(results)
    if bad:
        lines = "\n".join(f"  {k}: {e}" for k, e in bad.items())
        raise GroupError(f"{what} failed on {len(bad)} of {len(results)} {of}:\n{lines}", dict(results))
    return dict(results)  # type: ignore[arg-type]


def first_failure(bad: Mapping[K, Exception]) -> str:
    """"NAME: error" of the first failed item, by key order, for one-line messages."""
    k = sorted(bad, key=str)[0]
    return f"{k}: {bad[k]}"
