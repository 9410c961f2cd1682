"""Keys and paths: enumerate a task's keys, render output paths, and refuse unsafe ones.

A key is a string; each key has one output path, rendered from a template such as
`features/{stem}.npy`. Everything here is relative to the run root and checked so that
no key, source or output can reach outside it.
"""
from __future__ import annotations

import glob
import hashlib
import string
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from tasks.errors import OutputCollision, SpecError, UnsafePath
from tasks.layout import BOOKKEEPING_DIR

# Placeholders an output template may use, by where the keys come from.
SRC_FIELDS = frozenset({"key", "src", "stem", "name", "suffix", "parent"})
KEY_FIELDS = frozenset({"key"})
HASH_THREADS = 8  # parallel readers for content-hash keys (I/O bound, hashlib drops the GIL)
HASH_CHUNK = 1 << 20
HASH_LEN = 16  # hex digits of sha256 kept for a content-hash key
SHOWN_EXAMPLES = 3  # how many offending keys an error message lists


class Item:
    """One unit of work: a key, its source and its output path (all root-relative).

    Immutable. Small, because a million are made at every start: for a keys= task whose
    template is `PRE{key}POST` the output path is not stored but built on access from a
    (PRE, POST) pair shared by every item."""

    __slots__ = ("key", "src", "_out", "fields")
    key: str  # the task's key for this item
    src: str | None  # source path relative to the root, or None for keys= tasks
    fields: tuple[tuple[str, str], ...]  # placeholder values, for --cmd rendering

    def __init__(self, key: str, src: str | None, out: str | tuple[str, str],
                 fields: tuple[tuple[str, str], ...] = ()) -> None:
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "src", src)
        object.__setattr__(self, "_out", out)
        object.__setattr__(self, "fields", fields)

    @property
    def out(self) -> str:
        """The final output path relative to the root (no trailing slash)."""
        o = self._out
        return o if isinstance(o, str) else o[0] + self.key + o[1]

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Item is immutable (tried to set {name})")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return Item, (self.key, self.src, self._out, self.fields)

    def _tuple(self) -> tuple[object, ...]:
        return self.key, self.src, self.out, self.fields

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Item) and self._tuple() == other._tuple()

    def __hash__(self) -> int:
        return hash(self._tuple())

    def __repr__(self) -> str:
        return f"Item(key={self.key!r}, src={self.src!r}, out={self.out!r})"


def shared_template(items: Sequence[Item]) -> tuple[str, str] | None:
    """(PRE, POST) if every item's output is PRE + key + POST from one shared pair (see
    key_items), so callers can work on keys without building a million paths; else None."""
    if not items or isinstance(items[0]._out, str):
        return None
    first = items[0]._out
    return first if all(it._out is first for it in items) else None  # type: ignore[return-value]


def template_fields(template: str, *, what: str) -> set[str]:
    """The placeholder names used in a template; SpecError if it cannot be parsed."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SpecError(f"{what} {template!r} is not a valid template ({e}); "
                        "write literal braces as {{ and }}") from e
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise SpecError(f"{what} {template!r} has placeholder {{{field}}}, which is not a "
                            "plain name; use one of {key}, {src}, {stem}, {name}, {suffix}, {parent}")
        names.add(field)
    return names


def check_template(template: str, allowed: frozenset[str], *, what: str, hint: str = "") -> None:
    """Refuse unknown placeholders before any work starts."""
    unknown = template_fields(template, what=what) - allowed
    if unknown:
        names = ", ".join("{" + n + "}" for n in sorted(unknown))
        ok = ", ".join("{" + n + "}" for n in sorted(allowed))
        raise SpecError(f"{what} {template!r} uses unknown placeholder {names}; "
                        f"allowed here: {ok}.{(' ' + hint) if hint else ''}")


def safe_relpath(path: str, *, what: str) -> str:
    """Normalise a root-relative path, refusing anything that could leave the root."""
    parts = path.split("/")
    if ("\0" not in path and parts[0] not in ("", BOOKKEEPING_DIR)
            and "" not in parts and "." not in parts and ".." not in parts):
        return path  # already normal and safe: the common case, without PurePosixPath
    if not path or path in (".", "./"):
        raise UnsafePath(f"{what} is empty; give every key a non-empty path under the root")
    if "\0" in path:
        raise UnsafePath(f"{what} {path!r} contains a NUL byte, which no file name can hold")
    p = PurePosixPath(path)
    if p.is_absolute():
        raise UnsafePath(f"{what} {path!r} is absolute; outputs and sources must be relative "
                         "to the run root (--root)")
    parts = [part for part in p.parts if part != "."]
    if ".." in parts:
        raise UnsafePath(f"{what} {path!r} contains '..' and would escape the run root; "
                         "remove '..' from the key or template")
    if parts and parts[0] == BOOKKEEPING_DIR:
        raise UnsafePath(f"{what} {path!r} is inside {BOOKKEEPING_DIR}/, which holds spotfan's "
                         "bookkeeping; choose another output folder")
    return "/".join(parts)


def render(template: str, fields: dict[str, str], *, what: str = "output template") -> str:
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise SpecError(f"{what} {template!r} cannot be rendered for key "
                        f"{fields.get('key')!r}: {e}") from e


def glob_base(pattern: str) -> str:
    """The leading folders of a glob that hold no wildcard: keys are relative to them."""
    parts = PurePosixPath(pattern).parts
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return "/".join(base)


def glob_sources(root: Path, pattern: str) -> list[str]:
    """Files matching `pattern` under root, as sorted root-relative paths; one listing per folder."""
    safe_relpath(pattern, what="source glob")
    found = glob.glob(pattern, root_dir=root, recursive=True)
    # glob never returns dot-files for `*`, so the bookkeeping folder is never a source.
    return sorted(p for p in found if not p.endswith("/"))


def src_fields(src: str, base: str) -> dict[str, str]:
    """Placeholder values for one source file."""
    rel = src[len(base) + 1:] if base and src.startswith(base + "/") else src
    p = PurePosixPath(rel)
    parent = str(p.parent)
    return {
        "src": src,
        "stem": p.stem,
        "name": p.name,
        "suffix": p.suffix,
        "parent": "" if parent == "." else parent,
        "rel": rel,
    }


def content_hashes(root: Path, srcs: Sequence[str]) -> list[str]:
    """A short sha256 of each source's bytes, read in parallel."""

    def one(src: str) -> str:
        h = hashlib.sha256()
        with open(root / src, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        return h.hexdigest()[:HASH_LEN]

    with ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(one, srcs))


def check_unique(items: Iterable[Item]) -> list[Item]:
    """Refuse two keys that map to one output path (one would silently overwrite the other)."""
    seen: dict[str, str] = {}
    clashes: list[tuple[str, str, str]] = []
    out: list[Item] = []
    for item in items:
        other = seen.setdefault(item.out, item.key)
        if other != item.key:
            clashes.append((other, item.key, item.out))
        out.append(item)
    if clashes:
        shown = "; ".join(f"{a!r} and {b!r} -> {o!r}" for a, b, o in clashes[:SHOWN_EXAMPLES])
        more = f" (and {len(clashes) - SHOWN_EXAMPLES} more)" if len(clashes) > SHOWN_EXAMPLES else ""
        raise OutputCollision(f"{len(clashes)} output path(s) are shared by two keys: {shown}{more}. "
                              "Put a placeholder that differs per key in the output template, "
                              "e.g. {key} or {parent}/{stem}")
    return out


def key_items(template: str, keys: list[str]) -> list[Item]:
    """The items of a keys= task: output paths rendered, checked and unique. A template
    whose one placeholder is a plain {key} renders by concatenation; a key without "/"
    then changes one path component only, which alone needs checking, and outputs that
    are already normal paths cannot collide (the key is the only varying part): the
    common case, cheap for a million keys. (An item's fields are just its key.)"""
    pre, sep, post = template.partition("{key}")
    simple = bool(sep) and not any(c in pre + post for c in "{}\0")
    pre_parts, post_parts = pre.split("/"), post.split("/")
    left, right = pre_parts[-1], post_parts[0]
    first = len(pre_parts) == 1  # the key's component is the path's first
    fixed = pre_parts[:-1] + post_parts[1:]
    fast = simple and not any(p in ("", ".", "..") for p in fixed) and (
        first or pre_parts[0] != BOOKKEEPING_DIR)
    items: list[Item] = []
    normalised = not simple
    shared = (pre, post)  # every fast item builds its path from this one pair
    for key in keys:
        if not isinstance(key, str) or not key:
            raise SpecError(f"keys must be non-empty strings, got {key!r}; convert with str()")
        if fast and "/" not in key and "\0" not in key:
            part = left + key + right if left or right else key
            if part not in (".", "..") and not (first and part == BOOKKEEPING_DIR):
                items.append(Item(key, None, shared))
                continue
        raw = pre + key + post if simple else render(template, {"key": key})
        out = safe_relpath(raw, what=f"output path for key {key!r}")
        normalised = normalised or out != raw
        items.append(Item(key, None, out))
    return check_unique(items) if normalised else items
