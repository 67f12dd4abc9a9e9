"""The package's layers point only down, and no imports go round in a cycle.

Every import of every module of `pipeline_src` counts: at module level and
inside functions and methods alike (a lazy import runs when the function
does), relative imports resolved (`pipeline_src.code_deps.import_graph`).

The layers, bottom to top; a module may import modules of its own layer or of
any layer below it, never above:

  0. base      the package root, errors, config, io, paths, runs (which runs
               a profile has), runtime (device, seeds, numerics), dag and
               snakemake_adapter (the workflow's description), code_deps:
               helpers that know no stage
  1. data      the CIFAR-10 cache, loaders, subsets
  2. models    architectures, activations, loading trained models
  3. spectral  operator norms, rotations, the similarity measures, the SVD export
  4. bounds    the bounds and the sound certifiers built on them
  5. methods   one module per certified-training method
  6. training  the vanilla and certified training stages
  7. certify   certification, the attack cross-check, the similarity stage
  8. report    tables, figures, REPORT.md (the benchmark's tables too)
  9. entry     benchmark, schedule_fit, cli and __main__: what a command runs, and
               stage_header (the first line of a stage's log)

A new top-level module or subpackage has no layer until it is added to
LAYERS below: the test says so rather than guess.
"""
from __future__ import annotations

import pytest

from pipeline_src.code_deps import PACKAGE, import_graph

LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"", "errors", "config", "io", "paths", "runs", "runtime", "dag", "snakemake_adapter", "code_deps"}),
    ("data", {"data"}),
    ("models", {"models"}),
    ("spectral", {"spectral"}),
    ("bounds", {"bounds"}),
    ("methods", {"methods"}),
    ("training", {"training"}),
    ("certify", {"certify"}),
    ("report", {"report"}),
    ("entry", {"benchmark", "schedule_fit", "cli", "__main__", "stage_header"}),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a `pipeline_src` module (by its top-level name under
    the package: `pipeline_src.bounds.bcp` is in `bounds`), or None when it has none."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    return next((index for index, (_, names) in enumerate(LAYERS) if top in names), None)


def unassigned(graph: dict[str, set[str]]) -> list[str]:
    return sorted(module for module in graph if layer_of(module) is None)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """One line per import that points up the layers, naming both ends and their layers."""
    lines = []
    for module in sorted(graph):
        here = layer_of(module)
        for imported in sorted(graph[module]):
            there = layer_of(imported)
            if here is not None and there is not None and there > here:
                lines.append(f"{module} ({LAYERS[here][0]}) imports {imported} ({LAYERS[there][0]}), "
                             f"a layer above it")
    return lines


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, one per strongly connected component of more than one module
    (or a module importing itself), each as a closed path `a -> b -> ... -> a`."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's algorithm
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in graph.get(module, ()):
                components.append(component)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [_closed_path(graph, set(component)) for component in components]


def _closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the component's first module, found by breadth-first search."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for imported in sorted(graph.get(module, ())):
                if imported == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if imported in component and imported not in previous:
                    previous[imported] = module
                    following.append(imported)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def _short(module: str) -> str:
    return module.removeprefix(f"{PACKAGE}.")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_has_a_layer(graph):
    missing = unassigned(graph)
    assert not missing, (f"modules without a layer: {', '.join(missing)}; add their top-level name to LAYERS "
                         f"in tests/test_layers.py (and the order to its docstring)")


def test_imports_point_only_down_the_layers(graph):
    upward = upward_imports(graph)
    assert not upward, ("imports that point up the layers (" + " < ".join(name for name, _ in LAYERS) + "):\n  "
                        + "\n  ".join(upward))


def test_no_import_cycles(graph):
    cycles = import_cycles(graph)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(map(_short, c)) for c in cycles)


def test_the_check_sees_a_function_level_import_up_and_a_cycle(tmp_path):
    """The walk and the checks on a small package of their own: an import inside a
    function of a bound module up into certify is named, and so is the cycle it closes."""
    from pipeline_src.code_deps import import_graph as walk

    package = tmp_path / PACKAGE
    for folder in ("", "bounds", "certify"):
        (package / folder).mkdir(parents=True, exist_ok=True)
        (package / folder / "__init__.py").write_text("")
    (package / "bounds" / "bcp.py").write_text(
        "import torch\n\n\ndef certify():\n    from ..certify.stage import run\n    return run\n")
    (package / "certify" / "stage.py").write_text("from ..bounds import bcp\n\n\ndef run():\n    return bcp\n")
    toy = walk(package)
    assert toy[f"{PACKAGE}.bounds.bcp"] == {f"{PACKAGE}.certify.stage"}
    assert upward_imports(toy) == [f"{PACKAGE}.bounds.bcp (bounds) imports {PACKAGE}.certify.stage (certify), "
                                   f"a layer above it"]
    assert import_cycles(toy) == [[f"{PACKAGE}.bounds.bcp", f"{PACKAGE}.certify.stage", f"{PACKAGE}.bounds.bcp"]]
    assert unassigned({f"{PACKAGE}.plugins.extra": set()}) == [f"{PACKAGE}.plugins.extra"]
