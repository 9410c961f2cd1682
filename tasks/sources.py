"""Sources: the input files a `--src` glob matches, and the placeholders each one gives.

A glob is walked with one listing per folder, never one stat per match (over SSHFS each
stat is a network round trip); keys are paths relative to the glob's leading folders.
"""
from __future__ import annotations

import fnmatch
import glob
import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tasks.keys import normal, relative, safe_relpath

HASH_THREADS = 8  # parallel readers for content-hash keys (I/O bound, hashlib drops the GIL)
HASH_CHUNK = 1 << 20
HASH_LEN = 16  # hex digits of sha256 kept for a content-hash key


def glob_base(pattern: str) -> str:
    """The leading folders of a glob that hold no wildcard: keys are relative to them."""
    parts = normal(relative(pattern)).split("/")
    base: list[str] = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        base.append(part)
    return "/".join(base)


@dataclass(frozen=True)
class Sources:
    """What a source glob matched: its files, and how many folders it matched (not inputs)."""

    files: list[str]  # root-relative paths of matched files, sorted
    folders: int  # matched folders, skipped as inputs


def glob_sources(root: Path, pattern: str) -> Sources:
    """Files matching `pattern` under root, like `glob.glob(pattern, recursive=True)`; folders
    it matches are skipped, not inputs.

    Each folder is listed once (`os.scandir`) and whether an entry is a folder comes from
    that listing (d_type), never from a stat per match: over SSHFS each stat is a network
    round trip. Only a symlink costs a stat (to see what it points to). Like `glob`, `*`
    and `**` skip names that start with "."; unlike it, `**` does not descend into
    symlinked folders (a symlink loop would never end).
    """
    pattern = safe_relpath(relative(pattern), what="source glob")
    parts: list[str] = []
    for part in pattern.split("/"):
        if not (part == "**" and parts and parts[-1] == "**"):  # a/**/**/b is a/**/b
            parts.append(part)
    walk = _Walk(str(root))
    files = sorted(walk.match("", parts, None))
    return Sources(files, walk.folders)


class _Walk:
    """One glob's walk over the root: one listing per folder, entry types from the listing."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.folders = 0  # matched folders skipped as inputs

    def listing(self, folder: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(os.path.join(self.root, folder) if folder else self.root) as it:
                return list(it)
        except (FileNotFoundError, NotADirectoryError):
            return []  # glob's rule: a folder that is not there matches nothing

    def match(self, folder: str, parts: list[str],
              entries: list[os.DirEntry[str]] | None) -> Iterator[str]:
        """Root-relative paths of files under `folder` that match `parts` ("**" included);
        `entries` is the folder's listing when the caller already has it."""
        part, rest = parts[0], parts[1:]
        join = (lambda name: f"{folder}/{name}") if folder else (lambda name: name)
        if part == "**":
            entries = self.listing(folder) if entries is None else entries
            if rest:
                yield from self.match(folder, rest, entries)  # "**" as zero folders
            else:
                yield from (join(e.name) for e in entries
                            if not e.name.startswith(".") and not _is_folder(e, self))
            for e in entries:
                if not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
                    yield from self.match(join(e.name), parts, None)
            return
        if not glob.has_magic(part):
            if rest:
                yield from self.match(join(part), rest, None)  # listed when a wildcard needs it
                return
            if entries is not None:
                found = [e for e in entries if e.name == part]
                if found and not _is_folder(found[0], self):
                    yield join(part)
                return
            path = os.path.join(self.root, join(part))
            if os.path.isdir(path):
                self.folders += 1
            elif os.path.lexists(path):
                yield join(part)
            return
        matches = re.compile(fnmatch.translate(part)).match
        hidden_ok = part.startswith(".")
        entries = self.listing(folder) if entries is None else entries
        for e in entries:
            if (hidden_ok or not e.name.startswith(".")) and matches(e.name):
                if rest:
                    if e.is_dir():
                        yield from self.match(join(e.name), rest, None)
                elif not _is_folder(e, self):
                    yield join(e.name)


def _is_folder(entry: os.DirEntry[str], walk: _Walk) -> bool:
    """Whether a matched entry is a folder (counted as skipped); a symlink is judged by
    what it points to, so a link to a file is an input."""
    try:
        folder = entry.is_dir()
    except OSError:
        folder = False  # a broken link: an input, as glob returns it (its task will say why)
    if folder:
        walk.folders += 1
    return folder


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
