"""The shape of the packages, read from their source: no import cycle, small modules, a first line each.

Imports are read with `ast`, inside functions too; only those under `if TYPE_CHECKING:`
(never run) are left out. `import a.b.c` counts as an edge to the module `a.b.c` it
names (Python runs the parent packages' `__init__` first, which is never a cycle of
what the code says it needs).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "cluster")
MAX_LINES = 450
# Modules over MAX_LINES, each with why it still is; nothing else may grow past the limit.
TOO_LONG_FOR_NOW: dict[str, str] = {}


def modules() -> dict[str, Path]:
    """Every module of the packages, by dotted name (a package by its own name)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that module `name` imports (anywhere but under TYPE_CHECKING)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in known)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    here = name.split(".") if is_pkg else name.split(".")[:-1]
                    up = here[: len(here) - (child.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        out.add(sub)
                    elif base in known:
                        out.add(base)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycle_in_tasks_or_cluster():
    assert cycles(graph()) == []


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    # The check itself, on a made-up pair: a function-level import is an edge, a
    # TYPE_CHECKING one is not.
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\nimport a\n")
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n")
    known = {"a", "b", "c"}
    g = {n: imported(n, tmp_path / f"{n}.py", known) for n in known}
    assert g == {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(g) == [["a", "b"]]


def test_tasks_never_imports_cluster():
    g = graph()
    upward = {m: sorted(d for d in deps if d.startswith("cluster")) for m, deps in g.items() if m.startswith("tasks")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_providers_are_imported_by_the_registry_only():
    # Implementations import the base (and their own folder); only cluster.providers imports them.
    g = graph()
    impl = {m for m in g if m.startswith(("cluster.providers.lab", "cluster.providers.gce", "cluster.providers.aws"))}
    importers = {m for m, deps in g.items() for d in deps if d in impl and not m.startswith(tuple(
        f"{p}" for p in ("cluster.providers.lab", "cluster.providers.gce", "cluster.providers.aws")))}
    assert importers == {"cluster.providers"}
    base = g["cluster.providers.base"]
    assert not base & impl and "cluster.providers" not in base


def test_no_module_is_over_the_size_limit():
    too_long = {}
    for path in [*modules().values(), REPO / "fabfile.py"]:
        rel = str(path.relative_to(REPO))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in TOO_LONG_FOR_NOW:
            too_long[rel] = n
    assert too_long == {}
    for rel in TOO_LONG_FOR_NOW:  # an allowance that is no longer needed goes
        assert len((REPO / rel).read_text().splitlines()) > MAX_LINES, f"{rel} is short now: drop its allowance"


def test_every_module_and_script_starts_by_saying_what_it_is():
    missing = []
    for path in [*modules().values(), REPO / "fabfile.py"]:
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if not doc or not doc.splitlines()[0].strip():
            missing.append(str(path.relative_to(REPO)))
    scripts = [*(REPO / "cluster" / "vm").glob("*.sh"), *(REPO / "scripts").glob("*.sh")]
    for path in scripts:
        lines = path.read_text().splitlines()
        said = lines[1] if lines and lines[0].startswith("#!") else (lines[0] if lines else "")
        if not said.startswith("# ") or len(said) < 20:
            missing.append(str(path.relative_to(REPO)))
    assert missing == []


def test_scripts_holds_developer_scripts_only():
    # What runs on a VM is package data of cluster.vm, read with importlib.resources.
    assert sorted(p.name for p in (REPO / "scripts").iterdir()) == ["demo.py", "demo.sh", "setup.sh", "test.sh"]
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            assert '"scripts"' not in path.read_text() and "'scripts'" not in path.read_text(), path
