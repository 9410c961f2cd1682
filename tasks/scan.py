"""Finding what is done: one directory listing per output folder, never one stat per key.

Over SSHFS every stat is a network round trip, while one listing returns a whole
folder; 20,000 outputs in one folder cost one listing. Whether an output is a file or a
folder comes from the same listing (d_type), so an output path that exists with the
wrong kind (a folder where the task writes a file, or the reverse) is refused with all
the offenders at once instead of counting as done.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tasks.errors import SpecError
from tasks.items import Item, shared_template
from tasks.keys import SHOWN_EXAMPLES, shown


def scan_done(root: Path, items: Sequence[Item]) -> set[str]:
    """Keys whose output exists at its final path. SpecError if any output path exists as
    the wrong kind (a folder for a file output, a file for a directory output), or if an
    output's folder is a file."""
    if not items:
        return set()
    is_dir = items[0].is_dir  # one task: every output is of one kind
    wrong: list[str] = []
    pair = shared_template(items)
    folders = {pair[0].rpartition("/")[0]} if pair is not None and "/" not in pair[1] else (
        {it.out.rpartition("/")[0] for it in items})
    if len(folders) == 1:  # the common case, in set comprehensions (a million keys)
        parent = folders.pop()
        listing = _listing(root, parent, items[0], wrong)
        if listing is None:
            _refuse(wrong, is_dir)
            return set()
        same, other = listing if not is_dir else (listing[1], listing[0])
        if pair is not None and "/" not in pair[1]:
            left, post = pair[0].rpartition("/")[2], pair[1]
            done = {it.key for it in items if left + it.key + post in same}
            bad = [it for it in items if left + it.key + post in other] if other else []
        else:
            cut = len(parent) + 1 if parent else 0
            done = {it.key for it in items if it.out[cut:] in same}
            bad = [it for it in items if it.out[cut:] in other] if other else []
        wrong += [_wrong_kind(it) for it in bad]
        _refuse(wrong, is_dir)
        return done
    by_dir: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_dir[item.out.rpartition("/")[0]].append(item)
    done: set[str] = set()
    for parent, group in by_dir.items():
        listing = _listing(root, parent, group[0], wrong)
        if listing is None:
            continue
        same, other = listing if not is_dir else (listing[1], listing[0])
        for item in group:
            name = item.out.rpartition("/")[2]
            if name in same:
                done.add(item.key)
            elif name in other:
                wrong.append(_wrong_kind(item))
    _refuse(wrong, is_dir)
    return done


def _listing(root: Path, parent: str, first: Item, wrong: list[str]) -> tuple[set[str], set[str]] | None:
    """(names of non-folders, names of folders) in one output folder; None if it is missing,
    or if it is a file (then a problem is added to `wrong`)."""
    files: set[str] = set()
    folders: set[str] = set()
    try:
        with os.scandir(root / parent if parent else root) as entries:
            for e in entries:
                (folders if _is_dir(e) else files).add(e.name)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        wrong.append(f"{shown(parent)}, the folder of {shown(first.out)}, is a file")
        return None
    return files, folders


def _wrong_kind(item: Item) -> str:
    kind = "a folder" if not item.is_dir else "a file"
    return f"{shown(item.out)} (key {shown(item.key)}) is {kind}"


def _refuse(wrong: list[str], is_dir: bool) -> None:
    if not wrong:
        return
    more = len(wrong) - SHOWN_EXAMPLES
    few = "; ".join(wrong[:SHOWN_EXAMPLES]) + (f" (and {more} more)" if more > 0 else "")
    writes = "directory outputs" if is_dir else "file outputs"
    raise SpecError(f"{len(wrong)} output path(s) exist, but not as what this task writes "
                    f"({writes}): {few}. Move them out of the way (or fix the output "
                    "template) and run again")


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """From the listing's d_type; only a symlink costs a stat (to see what it points to)."""
    try:
        return entry.is_dir()
    except OSError:
        return False  # a broken link is not a folder
