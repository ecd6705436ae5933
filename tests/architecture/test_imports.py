"""The package's import graph, read from the source with ast (every import, at module level or inside a function).

No module may reach itself through imports (a cycle), and the layers point one way:
cli -> (store, analysis, release, policy, ...) -> (format, codecs, storage) -> errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ckptstore

ROOT = Path(ckptstore.__file__).parent
PKG = "ckptstore"

# Lower layers never import a higher one. Each entry: a module prefix, and the prefixes it must not import.
FORBIDDEN = {
    "ckptstore.format": ("ckptstore.store", "ckptstore.cli", "ckptstore.analysis", "ckptstore.release",
                         "ckptstore.policy", "ckptstore.codecs", "ckptstore.torch"),
    "ckptstore.codecs": ("ckptstore.store", "ckptstore.cli", "ckptstore.analysis", "ckptstore.release",
                         "ckptstore.policy", "ckptstore.storage", "ckptstore.format.manifest", "ckptstore.format.pack"),
    "ckptstore.storage": ("ckptstore.store", "ckptstore.cli", "ckptstore.analysis", "ckptstore.release",
                          "ckptstore.policy", "ckptstore.codecs", "ckptstore.format.manifest"),
    "ckptstore.store": ("ckptstore.cli", "ckptstore.analysis", "ckptstore.release", "ckptstore.policy"),
    "ckptstore.analysis": ("ckptstore.cli",),
    "ckptstore.release": ("ckptstore.cli",),
    "ckptstore.policy": ("ckptstore.cli",),
    "ckptstore.demo": ("ckptstore.cli",),
    "ckptstore.metadata": ("ckptstore.cli",),
    "ckptstore.query": ("ckptstore.cli",),
}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                # the longest known module a target names (``from pkg import sub`` names the submodule)
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t.startswith(PKG) and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None. Importing a package runs its
    ``__init__``, so an edge into ``a.b`` implies nothing about ``a``: edges are taken as written."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "ckptstore.format.manifest" in graph["ckptstore.store"]
    # A package's __init__ re-exports its modules, and they import siblings through it: leave those edges out
    # (ckptstore.codecs -> ckptstore.codecs.chain is the package's surface, not a dependency of chain).
    packages = {module_name(p) for p in ROOT.rglob("__init__.py")}
    inner = {n: {d for d in ds if not (d in packages and n.startswith(d + "."))} for n, ds in graph.items()}
    cycle = find_cycle(inner)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way() -> None:
    wrong = []
    for name, deps in import_graph().items():
        for prefix, banned in FORBIDDEN.items():
            if name == prefix or name.startswith(prefix + "."):
                wrong += [f"{name} -> {d}" for d in deps for b in banned if d == b or d.startswith(b + ".")]
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))
