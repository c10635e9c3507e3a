"""The package's rooms and the one direction of imports between them.

LAYERS below is the layer order, written down once: a module may import from its own room,
from a room of a lower layer, and from nothing above. Rooms of one layer are independent
of each other, and no imports go round in a circle, in ``pipeline/`` and ``benchmarks/``.
Every import statement counts, those inside functions too (an AST walk, not a look at
module-level imports alone).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A room is a package or a module; the longest matching prefix decides.
LAYERS: list[tuple[str, ...]] = [
    ("pipeline.deq", "pipeline.io", "pipeline.signals", "pipeline.progress", "pipeline.memory",
     "pipeline.environment"),
    ("pipeline.models", "pipeline.data", "pipeline.tracking"),
    ("pipeline.experiments", "pipeline.figures"),
    ("pipeline.config", "pipeline.cli", "pipeline", "benchmarks"),
    ("pipeline.__main__",),  # python -m pipeline: the CLI's entry point
]
# The small helpers of the bottom layer may use each other (the deq maths uses none).
SHARED_BOTTOM = {"pipeline.io", "pipeline.signals", "pipeline.progress", "pipeline.memory",
                 "pipeline.environment"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("benchmarks/**/*.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def project(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name
        else:
            continue
        for target in targets:
            hit = project(target)
            if hit and hit != name:
                found.add(hit)
    return found


def room(name: str) -> str:
    rooms = [r for layer in LAYERS for r in layer]
    best = max((r for r in rooms if name == r or name.startswith(r + ".")), key=len, default=None)
    assert best, f"{name} is in no room of LAYERS: add it there"
    return best


def layer(room_: str) -> int:
    return next(i for i, rooms in enumerate(LAYERS) if room_ in rooms)


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_go_down_or_stay_in_the_room(name):
    mine = room(name)
    for target in sorted(GRAPH[name]):
        theirs = room(target)
        if theirs == mine or (mine in SHARED_BOTTOM and theirs in SHARED_BOTTOM):
            continue
        assert layer(theirs) < layer(mine), (
            f"{name} imports {target}: room {mine} (layer {layer(mine)}) may not import room "
            f"{theirs} (layer {layer(theirs)}); see LAYERS in {Path(__file__).name}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert cycles(GRAPH) == []


def test_the_checks_see_a_circle_and_an_upward_import_inside_a_function(tmp_path):
    """The walk finds imports inside functions: a circle hidden in two function bodies
    is one component, and an upward import made inside a function is seen."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from pipeline.experiments import train\n")
    found = imports("pipeline.deq.fake", a, set(modules()))
    assert found == {"pipeline.experiments.train"}
    assert layer(room("pipeline.experiments.train")) > layer(room("pipeline.deq.fake"))
    assert cycles({"x": {"y"}, "y": {"x"}, "z": {"x"}}) == [["x", "y"]]
