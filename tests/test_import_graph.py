"""facekd's import graph: no cycles between modules, data flows one way between stages.

Every ``import`` in every facekd module counts, the ones inside functions too: a lazy
import still ties the two modules together, it only hides the cycle until run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facekd"
STAGES = ("data", "models", "distill", "train", "evaluate", "export")  # pipeline order


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The facekd module ``name`` refers to: itself, or its longest importable prefix."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> facekd modules it imports (a package's ``__init__`` is the package)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # ``from pkg import sub`` imports the submodule when there is one.
                wanted = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in wanted:
                found = resolve(target, modules)
                if found is not None and found != name:
                    targets.add(found)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    # function-level imports are edges too (the CLI handlers import lazily)
    assert "facekd.train.cache" in graph["facekd.train.commands"]
    assert "facekd.data.shards.writer" in graph["facekd.data.shards"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_between_modules():
    # A package importing its own submodules (``__init__`` re-exports) is not a cycle
    # unless a submodule imports the package back.
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_stages_import_only_earlier_stages():
    order = {stage: i for i, stage in enumerate(STAGES)}
    upward = sorted(
        f"{src} imports {dst}" for src, targets in import_graph().items()
        for dst in targets
        if stage_of(src) and stage_of(dst) and order[stage_of(dst)] > order[stage_of(src)])
    assert not upward, "upward imports between stages:\n" + "\n".join(upward)


def test_no_cycle_between_stage_packages():
    stages: dict[str, set[str]] = {stage: set() for stage in STAGES}
    for src, targets in import_graph().items():
        for dst in targets:
            a, b = stage_of(src), stage_of(dst)
            if a and b and a != b:
                stages[a].add(b)
    cycle = find_cycle(stages)
    assert cycle is None, "cycle between stages: " + " -> ".join(cycle or [])
