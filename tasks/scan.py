"""Finding what is done: one directory listing per output folder, never one stat per key.

Over SSHFS every stat is a network round trip, while one listing returns a whole
folder; 20,000 outputs in one folder cost one listing.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tasks.keys import Item, shared_template


def scan_done(root: Path, items: Sequence[Item]) -> set[str]:
    """Keys whose output exists at its final path."""
    pair = shared_template(items)
    if pair is not None and "/" not in pair[1]:  # PRE{key}POST, a key without "/": one folder
        parent, _, left = pair[0].rpartition("/")
        names = _names(root / parent if parent else root)
        post = pair[1]
        return {it.key for it in items if left + it.key + post in names}
    folders = {it.out.rpartition("/")[0] for it in items}
    if len(folders) == 1:  # the common case, in set comprehensions (a million keys)
        parent = folders.pop()
        names = _names(root / parent if parent else root)
        cut = len(parent) + 1 if parent else 0
        return {it.key for it in items if it.out[cut:] in names}
    by_dir: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        parent, _, _ = item.out.rpartition("/")
        by_dir[parent].append(item)
    done: set[str] = set()
    for parent, group in by_dir.items():
        try:
            names = set(os.listdir(root / parent if parent else root))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for item in group:
            if item.out.rpartition("/")[2] in names:
                done.add(item.key)
    return done


def _names(folder: Path) -> set[str]:
    """Names in a folder; scandir, not listdir: no list of a million names beside the set."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries}
    except (FileNotFoundError, NotADirectoryError):
        return set()
