"""The package's shape, checked from its source: imports run one way, modules and classes stay
readable (docs/design.md). Parsed with `ast`, so nothing is imported and the test is fast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 360
MAX_CLASS_LINES = 250

# Modules of the op that are shared by every backend: they import no backend and not ops.py.
SHARED_OP_MODULES = ("luffy_fast.inputs", "luffy_fast.autograd", "luffy_fast.loss_math",
                     "luffy_fast.gemm", "luffy_fast.config")
BACKENDS = ("luffy_fast.reference", "luffy_fast.chunked", "luffy_fast.kernels")


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "luffy_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(p for p in parts if p != "__init__") if parts[-1] == "__init__"
              else ".".join(parts)] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        name = "luffy_fast.kernels" if path.stem == "__init__" else f"luffy_fast.kernels.{path.stem}"
        files[name] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom, files: dict[str, Path]) -> list[str]:
    """Modules of this project that an import statement in module `name` refers to."""
    if node.level:
        base = name.split(".")
        base = base if _is_package(name, files) else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:  # `from package import module` imports a module
        candidate = f"{target}.{alias.name}"
        if candidate in files:
            found.append(candidate)
    if target in files:
        found.append(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Every project module's imports of other project modules, lazy ones (inside functions)
    included; `if TYPE_CHECKING:` blocks are left out (they never run)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for block in node.body for child in ast.walk(block))
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in files)
            elif isinstance(node, ast.ImportFrom):
                edges.update(_resolve(name, node, files))
        # a package's __init__ importing its own submodules is not a dependency of the package
        graph[name] = {e for e in edges if e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (found := visit(child)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges through a package's __init__ re-exports (`from luffy_fast import X`) are real
    imports, but an __init__ that re-exports a submodule which imports the package back is the
    ordinary Python pattern; cycles are checked between submodules."""
    packages = {"luffy_fast", "luffy_fast.rollout", "luffy_fast.toy", "luffy_fast.kernels"}
    return {name: {e for e in edges if e not in packages}
            for name, edges in graph.items() if name not in packages}


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = _without_package_inits(import_graph())
    assert len(graph) > 20, "the parser found too few modules"
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


@pytest.mark.parametrize("module", SHARED_OP_MODULES + BACKENDS)
def test_no_backend_and_no_shared_module_imports_the_public_op(module):
    graph = import_graph()
    names = [m for m in graph if m == module or m.startswith(module + ".")]
    assert names, f"{module} not found"
    for name in names:
        assert "luffy_fast.ops" not in graph[name], f"{name} imports luffy_fast.ops"


@pytest.mark.parametrize("module", SHARED_OP_MODULES)
def test_shared_op_modules_import_no_backend(module):
    imported = import_graph()[module]
    assert not [m for m in imported if m.startswith(BACKENDS)], f"{module} imports {imported}"


def test_kernels_do_not_import_the_torch_backend():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("luffy_fast.kernels"):
            assert "luffy_fast.chunked" not in imported, name
            assert "luffy_fast.reference" not in imported, name


def test_config_modules_do_not_import_each_other():
    graph = import_graph()
    # train_config builds on vllm_config's section; the other way round would close a loop
    assert "luffy_fast.train_config" not in graph["luffy_fast.rollout.vllm_config"]


# Programs, not library: the command line runs the demo, which is the toy task's own program.
PROGRAMS = ("luffy_fast.cli", "luffy_fast.__main__")


def test_no_core_module_imports_the_toy_task():
    for name, imported in import_graph().items():
        if name.startswith("luffy_fast.toy") or name in PROGRAMS:
            continue
        toys = [m for m in imported if m.startswith("luffy_fast.toy")]
        assert not toys, f"{name} imports {toys}"


def test_modules_and_classes_stay_readable():
    too_long = []
    for name, path in _module_files().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
