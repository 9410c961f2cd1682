"""Finding what is done: one directory listing per output folder, never one stat per key.

Over SSHFS every stat is a network round trip, while one listing returns a whole
folder; 20,000 outputs in one folder cost one listing. Whether an output is a file or a
folder comes from the same listing (d_type), so an output path that exists with the
wrong kind (a folder where the task writes a file, or the reverse) is refused with all
the offenders at once instead of counting as done.

What a scan keeps is what is left (the items whose output is missing), not what is done:
a re-run over a million finished keys holds no set of a million keys, and builds no path.
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence, Set
from itertools import filterfalse, repeat
from operator import getitem, methodcaller
from pathlib import Path

from tasks.errors import SpecError
from tasks.items import Item, KeyItems, shared_template
from tasks.keys import SHOWN_EXAMPLES, shown


class DoneKeys(Set[str]):
    """The keys of a task's items whose output exists, held as the items left: `len`, `in`
    and iteration as for a set, and `left`, the items whose output is missing, in order."""

    def __init__(self, items: Sequence[Item], left: list[Item], left_keys: set[str]) -> None:
        self.items = items
        self.left = left  # items whose output is missing, in the items' order
        self.left_keys = left_keys  # their keys
        self._keys: set[str] | None = None  # every key, made only if asked about one not left

    def __len__(self) -> int:
        return len(self.items) - len(self.left_keys)

    def __contains__(self, key: object) -> bool:
        if key in self.left_keys:
            return False
        if self._keys is None:  # is it one of the task's keys at all?
            self._keys = set(_keys(self.items))
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        if not len(self):
            return iter(())
        return filterfalse(self.left_keys.__contains__, _keys(self.items))

    @classmethod
    def _from_iterable(cls, it: Iterable[str]) -> set[str]:
        return set(it)  # what `done - other`, `done & other` return


def scan_done(root: Path, items: Sequence[Item]) -> DoneKeys:
    """Keys whose output exists at its final path (and the items left). SpecError if any
    output path exists as the wrong kind (a folder for a file output, a file for a
    directory output), or if an output's folder is a file."""
    if not items:
        return DoneKeys(items, [], set())
    is_dir = items[0].is_dir  # one task: every output is of one kind
    wrong: list[str] = []
    pair = shared_template(items)
    if pair is not None and "/" not in pair[1]:  # one folder, names PRE + key + POST
        keys = _keys(items)
        wrong_keys: list[str] = []
        missing = _missing_keys(root, items, pair, keys, is_dir, wrong, wrong_keys)
        if wrong_keys:
            wrong += [_wrong_kind(it) for it in _items_of(items, keys, set(wrong_keys))]
    else:
        missing = _missing_by_folder(root, items, is_dir, wrong)
    _refuse(wrong, is_dir)
    left = _items_of(items, _keys(items), missing) if missing else []
    return DoneKeys(items, left, missing)


def _keys(items: Sequence[Item]) -> Sequence[str]:
    return items.keys if isinstance(items, KeyItems) else [it.key for it in items]


def _items_of(items: Sequence[Item], keys: Sequence[str], chosen: set[str]) -> list[Item]:
    """The items whose key is in `chosen`, in the items' order."""
    if isinstance(items, KeyItems):
        return items.of(list(filter(chosen.__contains__, keys)))
    return [it for it in items if it.key in chosen]


def _missing_keys(root: Path, items: Sequence[Item], pair: tuple[str, str], keys: Sequence[str],
                  is_dir: bool, wrong: list[str], wrong_keys: list[str]) -> set[str]:
    """The keys whose output, PRE + key + POST (POST without "/"), is not in its folder's
    listing as the kind the task writes; keys whose output is of the other kind go to
    `wrong_keys`. Each listed name is turned back into its key in C loops (filter, slice)
    and struck off a set of the keys (KeyItems: the one they were de-duplicated with): a
    million names, no set of them, no path built."""
    parent, _, head = pair[0].rpartition("/")
    post = pair[1]
    missing = items.key_set() if isinstance(items, KeyItems) else set(keys)
    others: list[str] = []  # names of the other kind (a folder for a file output, ...)
    try:
        with os.scandir(root / parent if parent else root) as entries:
            missing.difference_update(_as_keys(_names(entries, is_dir, others), head, post))
    except FileNotFoundError:
        return missing
    except NotADirectoryError:
        wrong.append(f"{shown(parent)}, the folder of {shown(items[0].out)}, is a file")
        return missing
    if others:
        other_keys = set(_as_keys(others, head, post))
        wrong_keys += filter(other_keys.__contains__, keys)
    return missing


def _missing_by_folder(root: Path, items: Sequence[Item], is_dir: bool,
                       wrong: list[str]) -> set[str]:
    """The keys whose output is not in its folder's listing, one listing per folder."""
    by_dir: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_dir[item.out.rpartition("/")[0]].append(item)
    missing: set[str] = set()
    for parent, group in by_dir.items():
        listing = _listing(root, parent, group[0], wrong)
        if listing is None:
            missing.update(it.key for it in group)
            continue
        same, other = listing if not is_dir else (listing[1], listing[0])
        cut = len(parent) + 1 if parent else 0
        if other:
            wrong += [_wrong_kind(it) for it in group if it.out[cut:] in other]
        missing.update(it.key for it in group if it.out[cut:] not in same)
    return missing


def _names(entries: Iterable[os.DirEntry[str]], dirs: bool, others: list[str]) -> Iterator[str]:
    """Names of the listed entries of one kind (folders if `dirs`), the others' to `others`."""
    for e in entries:  # _is_dir inlined: this loop runs once per output
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False  # a broken link is not a folder
        if is_dir is dirs:
            yield e.name
        else:
            others.append(e.name)


def _as_keys(names: Iterable[str], head: str, post: str) -> Iterable[str]:
    """The key each name HEAD + key + POST stands for, in C loops; a name too short to hold
    a key gives "" (the slices of HEAD and POST overlap), which no key is."""
    if head:
        names = filter(methodcaller("startswith", head), names)
    if post:
        names = filter(methodcaller("endswith", post), names)
    if head or post:
        names = map(getitem, names, repeat(slice(len(head), -len(post) if post else None)))
    return names


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
