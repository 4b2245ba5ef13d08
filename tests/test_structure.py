"""The package's layering, read from its source with ``ast``: no import cycle between its modules, no import
inside a function from within the package (the sign of a dodged cycle), an explicit ``__all__`` in every module,
and no documentation that points outside the repository."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_lrpqvit"
NAME = PACKAGE.name


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The package modules an import statement of ``module`` loads (a package's ``__init__`` included)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    found = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            candidate = ".".join(parts[:i])
            if candidate in MODULES and candidate != NAME:
                found.add(candidate)
    return sorted(found)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    nested: list[str] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = _resolve(module, node, is_package)
                edges[module].update(t for t in targets if t != module)
        for func in ast.walk(tree):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and _resolve(module, node, is_package):
                        nested.append(f"{module}:{node.lineno}")
    return edges, nested


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _parent_package_edges_removed(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Importing ``a.b`` runs ``a/__init__`` first; a package's ``__init__`` re-exporting its own submodules is
    not a cycle, so a module's edge to a package that contains it is dropped."""
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}


def test_the_package_has_no_import_cycle():
    edges, _ = _graph()
    assert _cycles(_parent_package_edges_removed(edges)) == []


def test_the_cycle_check_finds_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_no_module_imports_the_package_inside_a_function():
    _, nested = _graph()
    assert nested == []


def test_the_core_does_not_import_the_layers_above_it():
    edges, _ = _graph()
    above = {f"{NAME}.integrations", f"{NAME}.integrations.transformers", f"{NAME}.integrations.optimum",
             f"{NAME}.cli", f"{NAME}.hub"}
    core = [m for m in MODULES if m.startswith(f"{NAME}.serialization") or m in {
        f"{NAME}.quantize", f"{NAME}.config", f"{NAME}.nn", f"{NAME}.lrp", f"{NAME}.bit_plan", f"{NAME}.jobs"}]
    assert {m: sorted(edges[m] & above) for m in core if edges[m] & above} == {}


def test_every_module_declares_all():
    missing = [m for m, path in MODULES.items()
               if not any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                          for node in ast.parse(path.read_text()).body)]
    assert missing == []


def test_sources_cite_papers_and_docs_not_files_outside_the_repository():
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if "SPEC" in p.read_text() or "../shared" in p.read_text()]
    assert offenders == []
