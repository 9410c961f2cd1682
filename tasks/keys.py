"""Keys and paths: enumerate a task's keys, render output paths, and refuse unsafe ones.

A key is a string; each key has one output path, rendered from a template such as
`features/{stem}.npy`. Everything here is relative to the run root and checked so that
no key, source or output can reach outside it. One function, `name_problem`, says
whether a string can be one entry of a folder; every name that becomes a path (task
names, each component of an output or source path) goes through it.
"""
from __future__ import annotations

import gc
import os
import shlex
import string
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import OutputCollision, SpecError, UnsafePath
from tasks.items import Item, KeyItems
from tasks.layout import BOOKKEEPING_DIR

# Placeholders an output template may use, by where the keys come from.
SRC_FIELDS = frozenset({"key", "src", "stem", "name", "suffix", "parent"})
KEY_FIELDS = frozenset({"key"})
SHOWN_EXAMPLES = 3  # how many offending keys an error message lists
SHOWN_NAME = 60  # characters of an over-long name or key shown in a message
NAME_MAX = 255  # bytes in one file name (Linux filesystems; used where pathconf cannot say)
PATH_MAX = 4096  # bytes in a whole path, its terminating NUL included (Linux)
# Room a run needs under the root for its temporaries, .spotfan/tmp/<owner>/<pid>-<n>.<name>:
# the owner id is at most ~56 bytes and tasks.publish.temp_path keeps at most the last 200
# bytes of an output's name, so a temporary's name is never longer than an output's limit.
TEMP_PATH_RESERVE = 320


def name_problem(name: str, *, name_max: int = NAME_MAX) -> str | None:
    """Why `name` cannot be one entry of a folder (a file or folder name), or None if it can.

    Refused: empty, `.` and `..` (they name a folder itself or its parent), a NUL byte or
    a "/" (no single name holds them), and more than `name_max` bytes.
    """
    if not name:
        return "is empty"
    if name == "..":
        return "is '..', which would escape its folder"
    if name == ".":
        return "is '.', which names its folder itself, not an entry in it"
    if "\0" in name:
        return "contains a NUL byte, which no file name can hold"
    if "/" in name:
        return "contains '/', which no single file name can hold"
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        return "holds a character that cannot be written in a file name (a lone surrogate)"
    if size > name_max:
        return f"is {size} bytes long; a file name holds at most {name_max} bytes here"
    return None


def path_problem(path: str, *, name_max: int = NAME_MAX) -> str | None:
    """Why a root-relative path cannot be used, or None if it can: absolute, `..`, inside
    `.spotfan/`, or a part that `name_problem` refuses (`.`, over-long). Empty parts ("a//b",
    a trailing "/") are not refused: they name what "a/b" names (see `normal`)."""
    if "\0" in path:
        return "contains a NUL byte, which no file name can hold"
    if path.startswith("/"):
        return "is absolute; outputs and sources must be relative to the run root (--root)"
    parts = [part for part in path.split("/") if part]
    if not parts:
        return "is empty; give every key a non-empty path under the root"
    if ".." in parts:
        return "contains '..' and would escape the run root; remove '..' from the key or template"
    if parts[0] == BOOKKEEPING_DIR:
        return (f"is inside {BOOKKEEPING_DIR}/, which holds spotfan's bookkeeping; choose "
                "another output folder")
    for part in parts:
        if part == ".":
            return ("has the part '.', which names its folder itself: a key '.' would collapse "
                    "onto the output folder")
        why = name_problem(part, name_max=name_max)
        if why is not None:
            return f"has the part {shown(part)}, which {why}"
    return None


def normal(path: str) -> str:
    """A path that `path_problem` accepts, without empty parts: "a//b/" -> "a/b"."""
    return "/".join(part for part in path.split("/") if part)


def check_name(name: str, *, what: str) -> str:
    """`name` if it can be one folder entry (e.g. a task's folder under .spotfan/tasks/);
    UnsafePath otherwise."""
    why = name_problem(name)
    if why is not None:
        raise UnsafePath(f"{what} {shown(name)} {why}; a name must be usable as one folder name")
    return name


def safe_relpath(path: str, *, what: str) -> str:
    """`path`, normalised, if it stays under the root; UnsafePath otherwise."""
    parts = path.split("/")
    if ("\0" not in path and parts[0] not in ("", BOOKKEEPING_DIR) and "" not in parts
            and "." not in parts and ".." not in parts and len(path) <= NAME_MAX // 4):
        return path  # already normal and safe, each part short: the common case, cheap
    why = path_problem(path)
    if why is not None:
        raise UnsafePath(f"{what} {shown(path)} {why}")
    return normal(path)


def shown(text: str) -> str:
    """`text` quoted for a message, cut short if it is long."""
    if len(text) <= SHOWN_NAME:
        return repr(text)
    return f"{text[:SHOWN_NAME]!r}... ({len(text)} characters)"


def relative(template: str) -> str:
    """A root-relative template or glob without its leading "./" (which names the root)."""
    while template.startswith("./"):
        template = template[2:]
    return template


def template_fields(template: str, *, what: str) -> set[str]:
    """The placeholder names used in a template; SpecError if it cannot be parsed."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SpecError(f"{what} {template!r} is not a valid template ({e}); "
                        "write literal braces as {{ and }}") from e
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field == "" or not field.isidentifier():
            raise SpecError(f"{what} {template!r} has placeholder {{{field}}}, which is not a "
                            "plain name; use one of {key}, {src}, {stem}, {name}, {suffix}, {parent}")
        if conversion is not None or spec:
            # A --cmd value is shell-quoted before it is formatted in: `!r` would quote the
            # quoted value again and `:.3` cut its closing quote, so a file name could run
            # as a command. An output path is checked as rendered; keep both plain.
            written = ("{" + field + (f"!{conversion}" if conversion else "")
                       + (f":{spec}" if spec else "") + "}")
            raise SpecError(f"{what} {template!r} has {written}: conversions (!r, !s, !a) and format "
                            "specs (:...) are not allowed in placeholders, because they would "
                            "change a value after it was shell-quoted or checked as a path; "
                            f"write {{{field}}} (to shorten or reformat a value, do it in the "
                            "command or in a key function)")
        names.add(field)
    return names


def check_template(template: str, allowed: frozenset[str], *, what: str, hint: str = "") -> set[str]:
    """The template's placeholders; unknown ones are refused before any work starts."""
    used = template_fields(template, what=what)
    unknown = used - allowed
    if unknown:
        names = ", ".join("{" + n + "}" for n in sorted(unknown))
        ok = ", ".join("{" + n + "}" for n in sorted(allowed))
        raise SpecError(f"{what} {template!r} uses unknown placeholder {names}; "
                        f"allowed here: {ok}.{(' ' + hint) if hint else ''}")
    return used


def render(template: str, fields: dict[str, str], *, what: str = "output template") -> str:
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise SpecError(f"{what} {template!r} cannot be rendered for key "
                        f"{fields.get('key')!r}: {e}") from e


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


def check_nesting(items: list[Item]) -> list[Item]:
    """Refuse an output that would be another output's folder ('o/a' and 'o/a/b'): a path
    cannot be a file and a folder at once, and a directory output is published whole."""
    outs = {item.out: item.key for item in items}
    clashes: list[str] = []
    for item in items:
        cut = item.out.rfind("/")
        while cut > 0:
            folder = item.out[:cut]
            if folder in outs:
                clashes.append(f"{shown(outs[folder])} -> {shown(folder)} is the folder of "
                               f"{shown(item.key)} -> {shown(item.out)}")
                break
            cut = item.out.rfind("/", 0, cut)
    if clashes:
        raise OutputCollision(f"{len(clashes)} output path(s) would be the folder of another "
                              f"key's output: {_few(clashes)}. Give every output its own path "
                              "that is no other output's folder, e.g. out=\"o/{key}.txt\"")
    return items


@dataclass(frozen=True)
class Limits:
    """How long names and paths may be under one run root (its filesystem's limits)."""

    name_max: int  # bytes in one file name
    path_max: int  # bytes in a whole path, root included (its terminating NUL not)
    room: int  # bytes left for a root-relative path after ROOT + "/"

    @classmethod
    def of(cls, root: Path) -> "Limits":
        name_max, path_max = NAME_MAX, PATH_MAX
        try:
            name_max = os.pathconf(root, "PC_NAME_MAX")
            path_max = os.pathconf(root, "PC_PATH_MAX")
        except (OSError, ValueError):
            pass  # no root (yet): the run refuses it with its own message
        base = len(os.fsencode(str(root)))
        if base + TEMP_PATH_RESERVE > path_max - 1:
            raise UnsafePath(f"the run root {shown(str(root))} is {base} bytes long: its "
                             f"bookkeeping would not fit in a path of at most {path_max - 1} "
                             f"bytes; use a root of at most {path_max - 1 - TEMP_PATH_RESERVE} bytes")
        return cls(name_max, path_max - 1, path_max - 1 - base - 1)

    def problem(self, out: str) -> str | None:
        """Why `out` (as rendered) cannot be an output under this root, or None."""
        why = path_problem(out, name_max=self.name_max)
        size = len(os.fsencode(normal(out))) if why is None else 0
        if size > self.room:
            why = (f"is {size} bytes long; with the root in front it would pass the "
                   f"{self.path_max}-byte limit of a whole path (at most {self.room} bytes fit "
                   "under this root)")
        return why


def unsafe_outputs(bad: Sequence[tuple[str, str, str]]) -> UnsafePath:
    """One error naming the first few (key, output, why) whose output cannot be used, and how many."""
    few = _few([f"key {shown(key)} -> {shown(out)} {why}" for key, out, why in bad])
    return UnsafePath(f"{len(bad)} key(s) have an output path that cannot be used: {few}. "
                      "Nothing was run: change these keys or the output template")


def _few(offenders: Sequence[str]) -> str:
    more = len(offenders) - SHOWN_EXAMPLES
    return "; ".join(offenders[:SHOWN_EXAMPLES]) + (f" (and {more} more)" if more > 0 else "")


def _all_plain(keys: list[str], left: str, right: str, *, first: bool, fixed_bytes: int,
               limits: Limits) -> bool:
    """True if every key is a non-empty ASCII string without "/" or NUL whose output name
    (left + key + right) fits and is not ".", ".." or the bookkeeping folder. Checked in C
    loops (a million keys in tens of milliseconds); on False the caller looks at each key."""
    if not keys or set(map(type, keys)) != {str} or min(map(len, keys)) == 0:
        return False
    joined = "".join(keys)
    if not joined.isascii() or "/" in joined or "\0" in joined:
        return False
    size = max(map(len, keys)) + len(os.fsencode(left + right))
    if size > limits.name_max or fixed_bytes + size > limits.room:
        return False
    special = {".", ".."} | ({BOOKKEEPING_DIR} if first else set())
    could = [n[len(left):len(n) - len(right)] for n in special  # the key that would make n
             if len(n) > len(left) + len(right) and n.startswith(left) and n.endswith(right)]
    return not any(k in keys for k in could)


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the items are made, then as it was. A million
    tuples made with the collector on cost 0.7-0.9 s, with it off 0.15-0.25 s (measured
    here): each growth of the heap by a quarter triggers a full collection that walks
    every item made so far. Items hold only strings and tuples: no cycles to miss."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def key_items(template: str, keys: list[str], *, limits: Limits, is_dir: bool,
              unsafe: list[tuple[str, str, str]],
              unique: set[str] | None = None) -> tuple[Sequence[Item], bool]:
    """The items of a keys= task, and whether they may collide or nest (then the caller
    checks). A template whose one placeholder is a plain {key} renders by concatenation; a
    key without "/" then changes one path component only, which alone needs checking, and
    such outputs cannot collide or nest (the key is the only varying part): the common
    case, cheap for a million keys, whose items are then the keys alone (KeyItems). Keys
    whose output cannot be used go to `unsafe` as (key, output, why), so the caller names
    them all at once. `unique`, a set of the keys, is handed to the KeyItems (see key_set)."""
    pre, sep, post = template.partition("{key}")
    simple = bool(sep) and not any(c in pre + post for c in "{}\0")
    pre_parts, post_parts = pre.split("/"), post.split("/")
    left, right = pre_parts[-1], post_parts[0]
    first = len(pre_parts) == 1  # the key's component is the path's first
    fixed = pre_parts[:-1] + post_parts[1:]
    fast = simple and not any(p in ("", ".", "..") for p in fixed) and (
        first or pre_parts[0] != BOOKKEEPING_DIR)
    # Bytes the fixed parts take; a fast key's output fits if its own component does too.
    fixed_bytes = len(os.fsencode(pre + post)) - len(os.fsencode(left + right)) if fast else 0
    shared = (pre, post, is_dir)  # every fast item builds its path from this one triple
    if fast and _all_plain(keys, left, right, first=first, fixed_bytes=fixed_bytes, limits=limits):
        return KeyItems(keys, shared, unique=unique), False
    items: list[Item] = []
    checked = False  # some item went the slow way: the caller checks uniqueness and nesting
    for key in keys:
        if not isinstance(key, str) or not key:
            raise SpecError(f"keys must be non-empty strings, got {key!r}; convert with str()")
        if fast and "/" not in key and "\0" not in key:
            part = left + key + right if left or right else key
            size = len(part) if part.isascii() else len(os.fsencode(part))
            if (part not in (".", "..") and not (first and part == BOOKKEEPING_DIR)
                    and size <= limits.name_max
                    and fixed_bytes + size <= limits.room):
                items.append(tuple.__new__(Item, (key, shared)))
                continue
        checked = True
        out = pre + key + post if simple else render(template, {"key": key})
        why = limits.problem(out)
        if why is not None:
            unsafe.append((key, out, why))
        else:
            items.append(Item(key, None, normal(out), (("key", key),), is_dir))
    return items, checked

def read_keys(path: str) -> list[str]:
    """The keys of a --keys file: UTF-8 text, one key per "\\n"-separated line (a "\\r"
    before it is dropped, so Windows line ends work); blank lines are skipped. Nothing else
    splits a key: form feeds, U+2028 and friends stay part of it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read the keys file {path!r}: {e.strerror}; give a text file "
                        "with one key per line") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(f"the keys file {path!r} is not UTF-8 text: byte {data[e.start]:#04x} on "
                        f"line {line} ({e.reason}); convert it first, e.g. `iconv -f latin1 -t "
                        f"utf-8 {shlex.quote(path)} > keys-utf8.txt`") from e
    keys = (line.removesuffix("\r") for line in text.removeprefix("\ufeff").split("\n"))
    return [key for key in keys if key.strip()]
