"""The package's rooms and the one rule between them (docs/architecture.md, "The rule").

Every module's imports of lora_cli (module level and inside functions) are read from its AST;
the test fails on an import loop, on an import against the declared layer order, and on a
function-level lora_cli import outside cli.py (cli.py's exist for start-up speed, each says so).
"""
import ast
from pathlib import Path

import pytest

import lora_cli

PACKAGE_DIR = Path(lora_cli.__file__).parent

# Low to high: a module may import its own layer and the layers below it, never one above.
# A module belongs to the first layer with a pattern that matches it ("room.*" = any module of the room).
LAYERS = [
    ("errors", ["errors", "libraries"]),  # libraries: configures the third-party libraries (quiet, offline)
    ("files", ["files", "files.*", "ui", "ui.*"]),
    ("registries", ["tasks", "model.methods", "model.targets", "data.template", "data.sources", "data.formats", "data.batching",
                    "train.objectives", "eval.metrics",
                    "data.token_budget"]),  # not a registry: the tokens-to-characters rule the template cuts by
    ("recipe", ["recipe", "recipe.*"]),
    ("data", ["data", "data.*"]),
    ("tasks", ["tasks.*"]),
    ("model", ["model", "model.*"]),
    ("infer", ["infer", "infer.*"]),
    ("eval", ["eval", "eval.*"]),  # asks inference engines; train's end-of-run evaluation asks it
    ("train", ["train", "train.*"]),
    ("commands", ["export", "export.*", "tiny", "tiny.*"]),
    ("cli", ["cli", "json_output", "env_report", "*"]),  # the thin layer on top and its output helpers
]

# Imports against the order that the re-layout has not removed yet, each named. The list is exact:
# a new one fails, and so does one that is gone (delete its line). Emptying it is the goal.
KNOWN_UPWARD: set[tuple[str, str]] = set()

# Function-level lora_cli imports outside cli.py that are still there, each with its reason. Exact,
# like KNOWN_UPWARD.
KNOWN_FUNCTION_LEVEL: set[tuple[str, str]] = {
    ("train.sweep", "train.run"),  # train_rank: importing the run (transformers) at sweep's import changes
    # how typing prints the schema's Optional[Union[...]] keys afterwards; see train/sweep.py
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py")) if "__pycache__" not in p.parts}


ALL = modules()


def resolve(name: str) -> str | None:
    """The lora_cli module an import names (`lora_cli.model.load.load_base_model` -> `model.load`), or None."""
    if not name.startswith("lora_cli"):
        return None
    parts = name.split(".")[1:]
    while parts and ".".join(parts) not in ALL:
        parts.pop()
    return ".".join(parts) if parts else ""


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for each lora_cli import in the file."""
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((resolve(a.name), in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                assert not child.level, f"{path}: relative import; name lora_cli.* in full"
                base = child.module or ""
                found.extend((resolve(f"{base}.{a.name}"), in_function, child.lineno) for a in child.names)
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return [(m, f, line) for m, f, line in found if m is not None]


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if pattern == module or pattern == "*" or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return i
    raise AssertionError(f"{module}: in no layer")


def edges() -> dict[tuple[str, str], list[tuple[bool, int]]]:
    out: dict[tuple[str, str], list[tuple[bool, int]]] = {}
    for name, path in ALL.items():
        for target, in_function, line in imports(path):
            if target != name and target != "":
                out.setdefault((name, target), []).append((in_function, line))
    return out


EDGES = edges()


def upward_imports() -> set[tuple[str, str]]:
    return {(a, b) for a, b in EDGES if layer_of(b) > layer_of(a)}


def cycles(edge_set) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edge_set:
        graph.setdefault(a, []).append(b)
    index, low, stack, on, found = {}, {}, [], set(), []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            strong(v)
    return found


def test_every_module_has_a_layer():
    for name in ALL:
        layer_of(name)
    assert "cli" in ALL and layer_of("cli") == len(LAYERS) - 1


def test_no_import_against_the_layer_order():
    upward = upward_imports()
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, ("imports against the layer order (move the code down, or the import up; see "
                     f"docs/architecture.md): {['%s -> %s (line %s)' % (a, b, EDGES[a, b][0][1]) for a, b in new]}")
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"fixed, so delete from KNOWN_UPWARD: {gone}"


def test_no_import_loop_besides_the_known_upward_imports():
    assert not cycles(set(EDGES) - KNOWN_UPWARD), "an import loop among modules that keep to the order"


def test_function_level_imports_only_in_cli():
    inside = {(a, b) for (a, b), uses in EDGES.items() if a != "cli" and any(f for f, _ in uses)}
    new = sorted(inside - KNOWN_FUNCTION_LEVEL)
    assert not new, f"function-level lora_cli imports outside cli.py (import at the top; fix the layering): {new}"
    gone = sorted(KNOWN_FUNCTION_LEVEL - inside)
    assert not gone, f"fixed, so delete from KNOWN_FUNCTION_LEVEL: {gone}"


def test_cli_says_why_each_function_level_import_is_there():
    lines = ALL["cli"].read_text(encoding="utf-8").splitlines()

    def commented(line: int) -> bool:  # on the line, or above the block of imports it is part of
        i = line - 1
        while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
            i -= 1
        return "#" in lines[line - 1] or lines[i - 1].strip().startswith("#")

    silent = [line for _, in_function, line in imports(ALL["cli"]) if in_function and not commented(line)]
    assert not silent, f"cli.py: say why (start-up speed) on or above each function-level import: lines {silent}"


@pytest.mark.parametrize("case, expected", [
    ({("a", "b"), ("b", "a")}, [["a", "b"]]),
    ({("a", "b"), ("b", "c")}, []),
    ({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}, [["a", "b", "c"]]),
])
def test_the_loop_finder_finds_loops(case, expected):
    assert cycles(case) == expected


def test_the_walk_sees_function_level_and_dotted_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from lora_cli.errors import LoraError\n\ndef f():\n    import lora_cli.cli\n"
                      "    from lora_cli import errors\n")
    assert imports(module) == [("errors", False, 1), ("cli", True, 4), ("errors", True, 5)]
