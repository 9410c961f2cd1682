"""What a task is: a top-level function (`@filetask`) or an unmodified program (`--cmd`),
plus where its keys come from and where each key's output goes.

    @filetask(src="data/images/*.jpg", out="features/{stem}.npy")
    def features(src: Path, out: Path) -> None: ...

A task function is called with the keyword arguments it names among `src`, `out`,
`key`, `ctx` (what the per-process initializer returned) and `root` (the run root, for
reading other files under it whatever the current directory). `out` is a temporary path
that keeps the output's name and suffix; the engine moves it into place when the call
returns. An output template ending in "/" makes the output a directory.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import shlex
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from tasks.bounds import MAX_TIMEOUT_S
from tasks import cmdout
from tasks.errors import SpecError, UnsafePath, misspelled_option
from tasks.items import Item
from tasks.keys import (KEY_FIELDS, SRC_FIELDS, Limits, check_name, check_nesting,
                        check_template, check_unique, gc_paused, key_items, normal, path_problem,
                        read_keys,
                        relative, render, safe_relpath, template_fields, unsafe_outputs)
from tasks.sources import content_hashes, glob_base, glob_sources, src_fields

if TYPE_CHECKING:
    from tasks.store.root import BucketRoot

KeyMode = Union[Literal["path", "stem", "hash"], Callable[[str], str]]
KeysArg = Union[Iterable[str], Callable[[], Iterable[str]], None]
TASK_ARGS = ("src", "out", "key", "ctx", "root")
STDERR_TAIL = 4000  # characters of a failed command's stderr kept in its failure record


class CommandFailed(Exception):
    """A --cmd task exited non-zero; carries the tail of its stderr."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"command exited with status {returncode}")
        self.returncode = returncode
        self.stderr = stderr


@dataclass(frozen=True)
class KeySource:
    """Where a task's keys come from: a source glob or an explicit key list."""

    src: str | None = None  # glob relative to the root, e.g. "data/*.jpg"
    keys: KeysArg = None  # iterable of keys, or a zero-argument callable returning one
    key: KeyMode = "path"  # for src tasks: how a source path becomes its key
    out: str = ""  # output template relative to the root; a trailing "/" means a directory

    def validate(self, *, what: str) -> None:
        if (self.src is None) == (self.keys is None):
            raise SpecError(f"{what}: give exactly one of src= (a glob of input files) or "
                            "keys= (a list of keys or a function returning one)")
        if not self.out:
            raise SpecError(f"{what}: out= is required, e.g. out=\"features/{{stem}}.npy\"")
        if self.src is not None:
            safe_relpath(relative(self.src), what=f"{what}: source glob")
            fields = check_template(self.out, SRC_FIELDS, what=f"{what}: output template")
            if not (callable(self.key) or self.key in ("path", "stem", "hash")):
                raise SpecError(f"{what}: key={self.key!r} is not known; use \"path\" (default), "
                                "\"stem\", \"hash\" (content hash) or a function of the source path")
        else:
            fields = check_template(self.out, KEY_FIELDS, what=f"{what}: output template",
                                    hint="{stem}, {name} ... need src= (input files); with keys= use {key}")
        # What the template itself puts in every path ("../x/{key}", "/tmp/{key}", ".spotfan/")
        # is refused here, once, before any key is listed.
        example = render(self.template, dict.fromkeys(fields, "x"))
        why = path_problem(example)
        if why is not None:
            raise UnsafePath(f"{what}: output template {self.out!r} gives paths such as "
                             f"{example!r}, which {why}")

    @property
    def is_dir(self) -> bool:
        return self.out.endswith("/")

    @property
    def template(self) -> str:
        """The output template as rendered: no leading "./", no trailing "/"."""
        return relative(self.out).rstrip("/")

    def items(self, root: Path | BucketRoot) -> Sequence[Item]:
        """Every key with its output path, checked all at once before any work: a message
        names the first few keys whose output cannot be used (outside the root, `.`, too
        long for the filesystem), that share one output, or whose output is another's folder."""
        with gc_paused():
            return self._items(root)

    def _items(self, root: Path | BucketRoot) -> Sequence[Item]:
        template, is_dir = self.template, self.is_dir
        folder = isinstance(root, Path)  # else an object-store root (tasks.store.root.BucketRoot)
        limits = Limits.of(root) if folder else root.limits()
        items: list[Item] = []
        unsafe: list[tuple[str, str, str]] = []

        def add(key: str, src: str | None, fields: dict[str, str]) -> None:
            out = render(template, fields)
            why = limits.problem(out)
            if why is not None:
                unsafe.append((key, out, why))
            else:
                items.append(Item(key, src, normal(out), tuple(sorted(fields.items())), is_dir))

        if self.src is not None:
            pattern = safe_relpath(relative(self.src), what="source glob")
            if self.key == "hash" and not folder:
                raise SpecError("key=\"hash\" reads every input to hash it, which an object-store "
                                "root would download: use key=\"path\" or \"stem\" there")
            found = glob_sources(root, pattern) if folder else root.glob(pattern)
            srcs = found.files
            if not srcs:
                folders = (f" ({found.folders} folder(s) matched: folders are not inputs)"
                           if found.folders else "")
                raise SpecError(f"source glob {self.src!r} matches no file under {root}{folders}; "
                                "check the pattern and --root (use ** for subfolders, e.g. "
                                "data/**/*.jpg)")
            base = glob_base(pattern)
            hashes = content_hashes(root, srcs) if self.key == "hash" else None
            seen: set[str] = set()
            for i, src in enumerate(srcs):
                f = src_fields(src, base)
                rel = f.pop("rel")
                if hashes is not None:
                    key = hashes[i]
                elif callable(self.key):
                    key = self.key(src)
                elif self.key == "stem":
                    key = rel[: len(rel) - len(f["suffix"])] if f["suffix"] else rel
                else:
                    key = rel
                if not isinstance(key, str) or not key:
                    raise SpecError(f"the key function returned {key!r} for {src!r}; "
                                    "it must return a non-empty string")
                if key in seen:
                    if hashes is not None:
                        continue  # identical content: one output serves both
                    raise SpecError(f"two sources give the same key {key!r} (one is {src!r}); "
                                    "use key=\"path\" or a key function that tells them apart")
                seen.add(key)
                f["key"] = key
                add(key, src, f)
        else:
            raw = self.keys() if callable(self.keys) else self.keys
            keys = list(raw)
            unique = set(keys)  # quicker than a dict; the scan strikes the done keys off it
            if len(unique) < len(keys):
                keys = list(dict.fromkeys(keys))  # keep order, drop repeats
            if not keys:
                raise SpecError("keys= produced no keys; check the function or list it names")
            made, checked = key_items(template, keys, limits=limits, is_dir=is_dir, unsafe=unsafe,
                                      unique=unique)
            if unsafe:
                raise unsafe_outputs(unsafe)
            return check_nesting(check_unique(made)) if checked else made
        if unsafe:
            raise unsafe_outputs(unsafe)
        return check_nesting(check_unique(items))


class FileTask:
    """A task function with its key source and output template; still callable as is."""

    def __init__(self, func: Callable[..., Any], source: KeySource, *, name: str | None,
                 init: Callable[[], Any] | None, fsync: bool,
                 timeout: float | None = None, fetch: bool = False) -> None:
        self.func = func
        self.source = source
        self.init = init
        self.fsync = fsync
        if fetch and source.src is None:  # the copy's source
            raise SpecError(f"@filetask {func.__qualname__}: fetch=True needs src= (a keys= task has no input)")
        self.fetch = fetch
        self.module = func.__module__
        self.qualname = func.__qualname__
        self.name = check_name(name or func.__name__, what=f"@filetask {self.qualname}: task name")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 < timeout <= MAX_TIMEOUT_S or timeout != timeout):
            raise SpecError(f"@filetask {self.qualname}: timeout={timeout!r} must be a number "
                            f"of seconds above 0 and at most {MAX_TIMEOUT_S:g}")
        self.timeout = float(timeout) if timeout is not None else None
        self._params = _task_params(func, self.qualname, has_src=source.src is not None)
        source.validate(what=f"@filetask {self.qualname}")
        functools.update_wrapper(self, func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<filetask {self.module}:{self.qualname} out={self.source.out!r}>"

    @property
    def is_dir(self) -> bool:
        return self.source.is_dir

    def items(self, root: Path | BucketRoot) -> Sequence[Item]:
        return self.source.items(root)

    def ref(self) -> "FuncRef":
        return FuncRef(self.module, self.qualname)

    def check_importable(self) -> None:
        """Fail early unless a fresh process can find this task by module and name."""
        how = ("move the function to a .py module (next to your notebook or in your project) "
               "and import it from there")
        if self.module == "__main__":
            raise SpecError(f"task {self.qualname} is defined in __main__ (a script run directly "
                            f"or a notebook), so worker processes cannot import it: {how}")
        if "<lambda>" in self.qualname or "<locals>" in self.qualname:
            raise SpecError(f"task {self.qualname} is a lambda or is defined inside another "
                            f"function, so worker processes cannot import it by name: {how}")
        found = FuncRef(self.module, self.qualname).load()
        if found is not self:
            raise SpecError(f"{self.module}:{self.qualname} names a different object than this "
                            "task (was it redefined or wrapped again?); decorate it once, at the "
                            "top level of its module")

    def open(self) -> Any:
        """Run the per-process initializer; its result is passed as `ctx`."""
        return self.init() if self.init is not None else None

    def execute(self, item: Item, out: Path, root: Path, ctx: Any, *, src: Path | None = None) -> None:
        values = {"src": src or (root / item.src if item.src is not None else None),
                  "out": out, "key": item.key, "ctx": ctx, "root": root}
        self.func(**{p: values[p] for p in self._params})


def _task_params(func: Callable[..., Any], qualname: str, *, has_src: bool) -> tuple[str, ...]:
    """The task arguments `func` takes, by name; SpecError if the engine could not call it."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError) as e:
        raise SpecError(f"task {qualname}: its signature cannot be read ({e}); decorate a "
                        "plain `def` function") from e
    if "out" not in params:
        raise SpecError(f"task function {qualname} must take an `out` argument: "
                        "the path it writes its output to")
    if not has_src and "src" in params:
        raise SpecError(f"task function {qualname} takes `src` but the task has keys= "
                        "and no input files; take `key` instead")
    offered = ", ".join(TASK_ARGS if has_src else (a for a in TASK_ARGS if a != "src"))
    for p in params.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in TASK_ARGS and p.kind is p.POSITIONAL_ONLY:
            raise SpecError(f"task function {qualname} takes `{p.name}` as positional-only "
                            "(before `/`), but the engine passes every argument by name; "
                            "remove the `/`")
        if p.name not in TASK_ARGS and p.default is p.empty:
            raise SpecError(f"task function {qualname} needs an argument `{p.name}` that the "
                            f"engine never passes: it passes only those it names among "
                            f"{offered}. Give `{p.name}` a default, or remove it")
    return tuple(a for a in TASK_ARGS if a in params)


def import_module(module: str, *, what: str) -> Any:
    """Import user code, saying what went wrong: the module not found (and where to put it),
    or the module's own error (a SyntaxError with its file and line, a missing dependency)."""
    try:
        return importlib.import_module(module)
    except SpecError as e:  # a @filetask in it is wrong: that message says how
        raise SpecError(f"{what} {module!r}: {e}") from e
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise SpecError(f"cannot import {what} {module!r}: no module named {e.name!r}. Run "
                            "from the folder that holds it, or add that folder to PYTHONPATH") from e
        raise SpecError(f"{what} {module!r} imports {e.name!r}, which is not installed here: "
                        "install the package that provides it (on a cluster, on the VMs)") from e
    except Exception as e:  # any import-time failure of user code: show where it happened
        from tasks.memo import memo

        takes = {f.__name__: [p for p in inspect.signature(f).parameters if p != "fn"] for f in (filetask, memo)}
        raise SpecError(f"{what} {module!r} failed while importing: {_where(e)}{misspelled_option(e, takes)}") from e


def _where(e: BaseException) -> str:
    """An exception as one line, with the file and line it was raised at."""
    if isinstance(e, SyntaxError):
        return f"{type(e).__name__}: {e.msg} ({e.filename}, line {e.lineno})"
    frames = traceback.extract_tb(e.__traceback__)
    at = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return f"{type(e).__name__}: {e}{at}"


@dataclass(frozen=True)
class FuncRef:
    """A picklable name for a FileTask; worker processes import it by this name."""

    module: str
    qualname: str

    def load(self) -> FileTask:
        mod = import_module(self.module, what="module")
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            found = sorted(n for n, v in vars(mod).items() if isinstance(v, FileTask))
            raise SpecError(f"module {self.module!r} has no {self.qualname!r}; tasks it "
                            f"defines: {', '.join(found) or 'none'}")
        if not isinstance(obj, FileTask):
            raise SpecError(f"{self.module}:{self.qualname} is not a task; decorate it with "
                            "@filetask(src=... or keys=..., out=...)")
        return obj


@dataclass(frozen=True)
class CmdTask:
    """An unmodified program run once per key; placeholders are substituted shell-quoted."""

    cmd: str  # e.g. "convert {src} -resize 64x64 {out}"
    source: KeySource = field(default_factory=KeySource)
    name: str = ""
    fsync: bool = False
    timeout: float | None = None  # seconds a key may run (tasks run --timeout overrides)
    keep_output: bool = False  # keep each key's stdout/stderr (tasks run --keep-output)
    fetch: bool = False  # it reads only {src}: give it a copy fetched in a batch (tasks.fetch)

    def __post_init__(self) -> None:
        what = "--cmd"
        if not self.cmd.strip():
            raise SpecError("--cmd is empty; give the command line to run per key")
        allowed = (SRC_FIELDS if self.source.src is not None else KEY_FIELDS) | {"out"}
        check_template(self.cmd, allowed, what=what)
        if "out" not in template_fields(self.cmd, what=what):
            raise SpecError("--cmd never mentions {out}: the command must write its result to "
                            "{out} (for example `prog {src} > {out}`)")
        self.source.validate(what=what)
        if not self.name:
            digest = hashlib.sha1("\0".join([self.cmd, self.source.out, str(self.source.src),
                                             str(self.source.key)]).encode()).hexdigest()
            object.__setattr__(self, "name", f"cmd-{digest[:10]}")
        check_name(self.name, what="--name")

    @property
    def is_dir(self) -> bool:
        return self.source.is_dir

    def items(self, root: Path | BucketRoot) -> Sequence[Item]:
        return self.source.items(root)

    def ref(self) -> "CmdTask":
        return self

    def load(self) -> "CmdTask":
        return self

    def check_importable(self) -> None:
        """A command needs no import."""

    def open(self) -> Any:
        return None

    def command_line(self, item: Item, out: Path, root: Path, *, src: Path | None = None) -> str:
        """The shell line run for `item` (placeholders shell-quoted); `src`: its input's copy."""
        values = dict(item.fields) if item.fields else {"key": item.key}
        if item.src is not None:
            values["src"] = str(src or root / item.src)
        values["out"] = str(out)
        return render(self.cmd, {k: shlex.quote(v) for k, v in values.items()}, what="--cmd")

    def execute(self, item: Item, out: Path, root: Path, ctx: Any, *, src: Path | None = None) -> None:
        done = cmdout.run_command(self.command_line(item, out, root, src=src), root=root, keep=self.keep_output)
        if self.keep_output:
            cmdout.keep_output(root, self.name, item.key, done)
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace")[-STDERR_TAIL:]
            raise CommandFailed(done.returncode, err)


Task = Union[FileTask, CmdTask]
TaskRef = Union[FuncRef, CmdTask]


def filetask(*, out: str, src: str | None = None, keys: KeysArg = None, key: KeyMode = "path",
             name: str | None = None, init: Callable[[], Any] | None = None,
             fsync: bool = False, timeout: float | None = None,
             fetch: bool = False) -> Callable[[Callable[..., Any]], FileTask]:
    """Declare a file-keyed task: one output per key, skipped when it exists.

    src:   glob of input files relative to the run root (keys are their paths below the
           glob's fixed folders); or
    keys:  the keys themselves, or a function returning them.
    key:   for src tasks, "path" (default), "stem" (path without suffix), "hash" (content
           hash, for inputs with no natural key) or a function of the source path.
    out:   output template relative to the root, e.g. "features/{stem}.npy"; end it with
           "/" for a directory output.
    init:  a top-level function run once per worker process (load a model, open a
           connection); the task receives its result as `ctx`.
    fsync: flush each output to stable storage before publishing it.
    timeout: seconds one key may run; a key running longer is killed (its worker
           process) and charged a failed attempt (`tasks run --timeout` overrides).
    fetch: the task reads only its `src`: on a cluster `src` is a local copy (tasks.fetch).
    """
    source = KeySource(src=src, keys=keys, key=key, out=out)

    def wrap(func: Callable[..., Any]) -> FileTask:
        return FileTask(func, source, name=name, init=init, fsync=fsync, timeout=timeout,
                        fetch=fetch)

    return wrap


def load_spec(spec: str | None, *, cmd: str | None = None, src: str | None = None,
              keys_file: str | None = None, out: str | None = None, name: str | None = None,
              key: str = "path") -> Task:
    """Build a task from the command line: `module:function`, or the --cmd form."""
    if spec and cmd:
        raise SpecError("give either SPEC (module:function) or --cmd, not both")
    if cmd:
        if out is None:
            raise SpecError("--cmd needs --out, e.g. --out 'thumbs/{stem}.png'")
        keys: KeysArg = None
        if keys_file is not None:
            keys = read_keys(keys_file)
        return CmdTask(cmd, KeySource(src=src, keys=keys, key=key, out=out),  # type: ignore[arg-type]
                       name=name or "")
    if not spec:
        raise SpecError("no task given: pass SPEC as module:function (a @filetask function), "
                        "or --cmd CMD --src GLOB --out TEMPLATE")
    if src or keys_file or out:
        raise SpecError("--src/--keys/--out go with --cmd; a @filetask function declares its own")
    module, sep, qualname = spec.partition(":")
    if not sep or not module or not qualname:
        raise SpecError(f"SPEC {spec!r} must be module:function, e.g. examples.images:features")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    return FuncRef(module, qualname).load()

