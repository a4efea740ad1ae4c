"""The package layout: each sub-package imports only from those below it, no import cycle, no re-exports."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "soupkit"
# bottom to top; a module may import from its own layer and the ones before it
LAYERS = [
    ("base", {"soupkit.errors", "soupkit.io", "soupkit.config"}),
    ("runtime", {"soupkit.runtime"}),
    ("engine", {"soupkit.engine"}),
    ("pool", {"soupkit.pool"}),
    ("methods", {"soupkit.methods"}),
    ("zoo", {"soupkit.zoo"}),
    ("experiments", {"soupkit.experiments"}),
    ("entry points", {"soupkit.cli", "soupkit.__main__", "soupkit"}),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    for rank, (_, members) in enumerate(LAYERS):
        if module in members or any(module.startswith(m + ".") for m in members if m != "soupkit"):
            return rank
    raise AssertionError(f"{module} belongs to no layer of tests/test_layout.py")


def imports_of(module: str) -> set[str]:
    """soupkit modules that ``module`` imports anywhere (module level, functions, TYPE_CHECKING blocks)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            # the longest prefix that is one of our modules: "soupkit.zoo.files" from "from soupkit.zoo import files"
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("soupkit") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    up = sorted(d for d in GRAPH[module] if layer(d) > layer(module) and not (module == "soupkit" and d.startswith("soupkit")))
    assert not up, f"{module} ({LAYERS[layer(module)][0]}) imports from a layer above it: {up}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports) as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    # the package __init__s are entry points (they re-export), not part of the layering
    graph = {m: {d for d in deps if MODULES[d].name != "__init__.py"} for m, deps in GRAPH.items()
             if MODULES[m].name != "__init__.py"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_is_found():
    """The cycle check can fail: a back edge is found, a tree is not refused."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize("module", sorted(m for m, p in MODULES.items() if p.name != "__init__.py"))
def test_no_reexports(module):
    """A module's ``__all__`` lists only names it defines: every name has one home (package __init__s aside)."""
    tree = ast.parse(MODULES[module].read_text())
    defined, exported = set(), []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                defined.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
                if isinstance(target, ast.Name) and target.id == "__all__":
                    exported = list(ast.literal_eval(node.value))
    foreign = [n for n in exported if n not in defined]
    assert not foreign, f"{module}.__all__ lists names defined elsewhere: {foreign}"
