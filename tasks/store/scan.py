"""Finding what is done on an object-store root: one LIST per output folder (1,000 names a
request), never a request per key, as tasks/scan.py does with one listing per folder.

A file output is done when its object exists; a directory output when its marker
`OUT/.spotfan-done` does (tasks/store/publish.py). An output of the wrong kind (a prefix
where the task writes a file, an object where it writes a folder) is refused with all
the offenders at once, as on a folder.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from tasks.items import Item
from tasks.scan import DoneKeys, _items_of, _keys, _refuse, _wrong_kind
from tasks.store.root import DIR_MARKER, BucketRoot


def scan_done(root: BucketRoot, items: Sequence[Item]) -> DoneKeys:
    """Keys whose output is published (and the items left); SpecError for outputs of the
    wrong kind."""
    if not items:
        return DoneKeys(items, [], set())
    is_dir = items[0].is_dir
    by_dir: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_dir[item.out.rpartition("/")[0]].append(item)
    missing: set[str] = set()
    wrong: list[str] = []
    for parent, group in by_dir.items():
        same, other = _published(root, parent, is_dir)
        cut = len(parent) + 1 if parent else 0
        for it in group:
            name = it.out[cut:]
            if name in same:
                continue
            if name in other:
                wrong.append(_wrong_kind(it))
            missing.add(it.key)
    _refuse(wrong, is_dir)
    left = _items_of(items, _keys(items), missing) if missing else []
    return DoneKeys(items, left, missing)


def _published(root: BucketRoot, parent: str, is_dir: bool) -> tuple[set[str], set[str]]:
    """(names published as the kind asked for, names there as the other kind) in `parent`."""
    if not is_dir:
        files, folders = root.kinds(parent)
        return files, folders
    done: set[str] = set()
    files: set[str] = set()
    for e in root.tree(parent):
        name, sep, rest = e.name.partition("/")
        if not sep:
            files.add(name)
        elif rest == DIR_MARKER:
            done.add(name)
    return done, files - done

