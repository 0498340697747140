"""No import cycles in editlab, deferred (function-level) imports included.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` of an
editlab module anywhere in a file is an edge (``from editlab.x import name`` goes to
``editlab.x.name`` if that is a module, else to ``editlab.x``; no implicit edge to parent
packages).  Two kinds of import the source does not spell are added by hand: ``editlab.methods``
imports every module of its package (pkgutil), and the cli imports its SUBCOMMANDS by name.
"""
from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` (a folder under ``root``) its file imports."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                parts = here[:len(here) - node.level + 1] if node.level else []
                base = ".".join(parts + ([node.module] if node.module else []))
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[mod] = {e for e in edges if e in files and e != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def editlab_graph() -> dict[str, set[str]]:
    import editlab.methods
    from editlab.cli import SUBCOMMANDS

    graph = import_graph(ROOT, "editlab")
    graph["editlab.methods"] |= {m.name for m in pkgutil.iter_modules(editlab.methods.__path__, "editlab.methods.")}
    graph["editlab.cli"] |= set(SUBCOMMANDS.values())
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_editlab_has_no_import_cycle():
    graph = editlab_graph()
    assert {"editlab.methods.rome", "editlab.mend.train"} <= graph["editlab.methods"] | graph["editlab.cli"]
    assert "editlab.methods" in graph["editlab.run"]  # the graph is not empty of edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_config_layer_and_the_registry_import_no_method():
    graph = editlab_graph()
    assert not {m for m in reachable(graph, "editlab.config") if m.startswith("editlab.methods")}
    assert graph["editlab.registry"] == set()
    assert "editlab.cli" not in reachable(graph, "editlab.mend.train")


def test_the_check_finds_deferred_and_relative_cycles_and_adds_no_parent_edges(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n    return g\n")  # deferred
    (pkg / "b.py").write_text("from . import a\n\ng = 1\n")  # relative, a module by name
    (pkg / "c.py").write_text("import pkg.sub.d\nfrom .sub.d import x\n")
    (pkg / "sub" / "__init__.py").write_text("from pkg import c\n")
    (pkg / "sub" / "d.py").write_text("from ..b import g as x\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.sub.d"},
                     "pkg.sub": {"pkg.c"}, "pkg.sub.d": {"pkg.b"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    del graph["pkg.b"]
    assert find_cycle(graph) is None  # pkg.c -> pkg.sub.d does not pass through pkg.sub
