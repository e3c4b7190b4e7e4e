"""The shape the code keeps: small functions, no import cycles (ruff's complexity rules run in CI too)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "captune"


def test_no_function_over_100_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over 100 lines: " + "; ".join(long)


def test_module_level_imports_form_no_cycle():
    """captune's modules import each other (at module level) without a cycle."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        mod = "captune." + ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports may cross
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captune"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("captune"))
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    # a package's __init__ re-exporting its own modules is not a cycle of the pipeline
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for d in graph[m]:
            if seen.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in seen:
                visit(d, [*stack, d])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
