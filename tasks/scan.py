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
from tasks.keys import SHOWN_EXAMPLES, Item, shown


def scan_done(root: Path, items: Sequence[Item]) -> set[str]:
    """Keys whose output exists at its final path. SpecError if any output path exists as
    the wrong kind (a folder for a file output, a file for a directory output), or if an
    output's folder is a file."""
    by_dir: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        parent, _, _ = item.out.rpartition("/")
        by_dir[parent].append(item)
    done: set[str] = set()
    wrong: list[str] = []
    for parent, group in by_dir.items():
        try:
            with os.scandir(root / parent if parent else root) as it:
                entries = {e.name: e for e in it}
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            wrong.append(f"{shown(parent)}, the folder of {shown(group[0].out)}, is a file")
            continue
        for item in group:
            entry = entries.get(item.out.rpartition("/")[2])
            if entry is None:
                continue
            done.add(item.key)
            if _is_dir(entry) != item.is_dir:
                kind = "a folder" if not item.is_dir else "a file"
                wrong.append(f"{shown(item.out)} (key {shown(item.key)}) is {kind}")
    if wrong:
        more = len(wrong) - SHOWN_EXAMPLES
        few = "; ".join(wrong[:SHOWN_EXAMPLES]) + (f" (and {more} more)" if more > 0 else "")
        writes = "directory outputs" if items[0].is_dir else "file outputs"
        raise SpecError(f"{len(wrong)} output path(s) exist, but not as what this task writes "
                        f"({writes}): {few}. Move them out of the way (or fix the output "
                        "template) and run again")
    return done


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """From the listing's d_type; only a symlink costs a stat (to see what it points to)."""
    try:
        return entry.is_dir()
    except OSError:
        return False  # a broken link is not a folder
