"""Items, the units of work: a key, its source and its output path; and the compact items
of a keys= task, which a million keys make at every start.

Both are kept small because a runner holds one per key: an Item is a tuple (no per-field
setattr), and the items of a keys= task whose outputs are `PRE{key}POST` are the list of
keys alone (`KeyItems`), each Item made only when it is asked for.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import repeat
from operator import itemgetter
from typing import overload


class Item(tuple):  # type: ignore[type-arg]
    """One unit of work: a key, its source and its output path (all root-relative).

    Immutable. Small and quick to make: a tuple (no per-field setattr). For a keys= task whose template is `PRE{key}POST` it is
    the pair (key, (PRE, POST, is_dir)), the triple shared by every item, and the output
    path is built on access; any other item is (key, src, out, fields, is_dir)."""

    __slots__ = ()

    def __new__(cls, key: str, src: str | None, out: str | tuple[str, str],
                fields: tuple[tuple[str, str], ...] = (), is_dir: bool = False) -> Item:
        if isinstance(out, tuple):
            assert src is None and not fields, "a shared template is for keys= items only"
            return tuple.__new__(cls, (key, (out[0], out[1], is_dir)))
        return tuple.__new__(cls, (key, src, out, fields, is_dir))

    key: str = property(itemgetter(0))  # type: ignore[assignment]  # the task's key

    @property
    def src(self) -> str | None:
        """The source path relative to the root, or None for keys= tasks."""
        return self[1] if len(self) == 5 else None

    @property
    def out(self) -> str:
        """The final output path relative to the root (no trailing slash)."""
        if len(self) == 5:
            return self[2]
        shared = self[1]
        return shared[0] + self[0] + shared[1]

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """Placeholder values, for --cmd rendering."""
        return self[3] if len(self) == 5 else ()

    @property
    def is_dir(self) -> bool:
        """The output is a directory (the template ends in "/")."""
        return self[4] if len(self) == 5 else self[1][2]

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return _item, (tuple(self),)

    def _tuple(self) -> tuple[object, ...]:
        return self.key, self.src, self.out, self.fields, self.is_dir

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Item) and self._tuple() == other._tuple()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return f"Item(key={self.key!r}, src={self.src!r}, out={self.out!r})"


def _item(t: tuple[object, ...]) -> Item:
    """An Item from its tuple (unpickling)."""
    return tuple.__new__(Item, t)


class KeyItems(Sequence[Item]):
    """The items of a keys= task whose every output is PRE + key + POST, held as the list
    of keys and the one (PRE, POST, is_dir) triple every such item shares; an Item is made
    when it is asked for. A million keys are then a million strings and one list, not a
    million tuples too (~60 MB and ~0.25 s at every start), and a scan that finds every
    output in place makes no Item at all."""

    __slots__ = ("keys", "shared", "_unique")

    def __init__(self, keys: list[str], shared: tuple[str, str, bool], *,
                 unique: set[str] | None = None) -> None:
        self.keys = keys  # unique, in the task's order; never changed
        self.shared = shared  # (PRE, POST, is_dir)
        self._unique = unique  # a set of the keys, if one was made already; see key_set

    def key_set(self) -> set[str]:
        """A set of the keys, the caller's to change: the first call is handed the one the
        keys were de-duplicated with (a million keys: ~0.2 s and ~60 MB not spent twice),
        later calls get a new one."""
        unique, self._unique = self._unique, None
        return unique if unique is not None else set(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> KeyItems: ...

    def __getitem__(self, index: int | slice) -> Item | KeyItems:
        if isinstance(index, slice):
            return KeyItems(self.keys[index], self.shared)
        return tuple.__new__(Item, (self.keys[index], self.shared))

    def __iter__(self) -> Iterator[Item]:
        return map(tuple.__new__, repeat(Item), zip(self.keys, repeat(self.shared)))

    def of(self, keys: list[str]) -> list[Item]:
        """The items of some of these keys (e.g. those whose output is missing)."""
        return list(map(tuple.__new__, repeat(Item), zip(keys, repeat(self.shared))))

    def __repr__(self) -> str:
        return f"KeyItems({len(self.keys)} keys, out={self.shared[0]!r}+key+{self.shared[1]!r})"


def shared_template(items: Sequence[Item]) -> tuple[str, str] | None:
    """(PRE, POST) if every item's output is PRE + key + POST from one shared pair (see
    KeyItems), so callers can work on keys without building a million paths; else None."""
    if isinstance(items, KeyItems):
        return items.shared[0], items.shared[1]
    if not items or len(items[0]) != 2:
        return None
    shared = items[0][1]
    if not all(len(it) == 2 and it[1] is shared for it in items):
        return None
    return shared[0], shared[1]
