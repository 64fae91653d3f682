"""The import graph read from the source: ``kernels/`` (``fastopt.kernels``) is the bottom
layer and imports nothing else of fastopt, and no two modules import each other, directly
or round a loop (function-local imports count: they are dependencies too)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fastopt": ROOT / "fastopt", "fastopt.kernels": ROOT / "kernels"}


def _modules():
    """module name -> source path, for every module of the installed packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if package == "fastopt" and parts[:1] == ["kernels"]:
                continue  # a link to kernels/ in a working tree: the kernels are listed once
            out[name] = path
    return out


def _imports(name, path, modules):
    """The fastopt modules ``name`` imports (a name imported from a package counts as the
    submodule of that name when there is one, else as the package itself)."""
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_kernels_import_nothing_above_them():
    up = {name: sorted(t for t in deps if not t.startswith("fastopt.kernels"))
          for name, deps in _graph().items() if name.startswith("fastopt.kernels")}
    assert not {k: v for k, v in up.items() if v}, "kernels/ must be the bottom layer"


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components; a component of two or more modules is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_imports():
    """The parser finds what it is meant to: a known downward edge and the module count."""
    graph = _graph()
    assert "fastopt.kernels._dispatch" in graph["fastopt.optimizer"]
    assert "fastopt.kernels._engine" in graph["fastopt.kernels._rule"]
    assert len(graph) > 30
