"""The shape of the code, checked from its source with `ast` (nothing is imported):

- no module of `lorax_server` imports itself in a circle, counting every import statement, those
  inside functions and under `if TYPE_CHECKING:` too;
- `layers/` never imports `models/` or `adapters/`, and `models/` never imports `adapters/` (models
  know nothing of LoRA: adapters find what to wrap through `CausalLM.adaptable_linears`);
- no product module (`lorax_server`, `scripts/*.py`) is over 600 lines, no function over 80.

`server/README.md` describes the layering these rules keep.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "server" / "lorax_server"
GENERATED = PACKAGE / "pb"  # gRPC stubs written by grpc_tools at install time
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
# (importer prefix, imported prefix): imports that must not exist.
FORBIDDEN = [
    ("lorax_server.layers", "lorax_server.models"),
    ("lorax_server.layers", "lorax_server.adapters"),
    ("lorax_server.models", "lorax_server.adapters"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The `lorax_server` modules that `name` imports anywhere in its source. `from pkg import x`
    counts as importing the submodule `pkg.x` when there is one, else `pkg` itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names}
            found.update(subs & known or {target})
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `[a, b, ..., a]`, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def product_files() -> list[Path]:
    package = [p for p in sorted(PACKAGE.rglob("*.py")) if GENERATED not in p.parents]
    return package + sorted((REPO / "scripts").glob("*.py"))


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "lorax_server.models.bloom" in graph["lorax_server.models.registry"]  # from . import bloom
    assert "lorax_server.forward" in graph["lorax_server.layers.moe"]  # under TYPE_CHECKING
    assert "lorax_server.adapters.merge" in graph["lorax_server.adapters.manager"]  # inside a method
    assert "lorax_server.utils.hub" in graph["lorax_server.cli"]  # inside a function


def test_no_module_imports_itself_in_a_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN)
def test_layering(importer: str, imported: str) -> None:
    bad = sorted(
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith(importer)
        for target in targets
        if target.startswith(imported)
    )
    assert not bad, bad


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in product_files():
        source = path.read_text()
        where = path.relative_to(REPO)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(source.splitlines())} lines")
        for fn in functions(ast.parse(source, str(path))):
            length = fn.end_lineno - fn.lineno + 1
            if length > MAX_FUNCTION_LINES:
                too_long.append(f"{where}:{fn.lineno} {fn.name}: {length} lines")
    assert not too_long, too_long
    assert any(p.name == "train_demo.py" for p in product_files())
