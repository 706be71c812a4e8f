"""The package's shape: import arrows point one way, and only the encodings know their classes."""

import ast
from pathlib import Path

import lookhere.position as position

ROOT = Path(__file__).resolve().parents[1] / "src" / "lookhere"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    modules = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # ``from . import x`` names a module; ``from .x import f`` a member of one
                    edges.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_find_cycles_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert graph["lookhere.vit"] >= {"lookhere.official", "lookhere.position"}  # the graph sees real imports
    assert find_cycles(graph) == []


def test_only_the_position_package_asks_which_encoding_class_it_holds():
    classes = {cls.__name__ for cls in vars(position).values() if isinstance(cls, type)
               and issubclass(cls, position.PositionEncoding)}
    assert {"LookHere", "Rope2d", "Fire", "LearnedAbsolute"} <= classes
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.parent.name == "position":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
                named = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None)
                         for n in ast.walk(node.args[1])}
                if named & classes:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
