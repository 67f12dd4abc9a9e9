"""Which package files a stage runs, read from the imports of the code itself.

Every rule of the workflow (and every stage of the generated dvc.yaml) lists
the code of its stage as inputs, so that editing a file reruns exactly the
stages that run it. The lists are derived here, not kept by hand.

The convention a developer must know: a rule's code inputs are the import
closure of its stage's handler in `cli` (`_stage_<name>`), with `cli`'s own
module-level imports and `main`. Every `pipeline_src` import counts, at module
level or inside a function alike (a lazy import still runs when the stage
does), so where an import is written decides what reruns: moving an import
into or out of a handler, or adding one anywhere in a module a stage imports,
changes that stage's inputs. An import inside another stage's handler is not
followed for this one. Code a stage reaches without an import statement is
invisible unless it is declared here: a package that imports its modules by
discovery (IMPORTS_EVERY_MODULE) and non-Python files a module reads as code
(DATA_FILES). docs/dag.md, "Code inputs", says the same for the workflow's user.
Outside cli's handlers an import belongs at the top of its module, unless a comment
beside it says why (a measured start-up cost, an optional package): tests/test_imports.py.
The same import graph checks the package's layering (tests/test_layers.py).

Only `pipeline_src` modules are followed; a package's `__init__.py` counts
as imported with any of its modules, since Python runs it first.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path
from typing import Iterable

PACKAGE = "pipeline_src"
PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
# Files that are not Python but that a module reads as code: changing them changes what it does
# (the schema: what config validates, and each method's facts that runs reads from it).
DATA_FILES = {f"{PACKAGE}.config": ("workflow/schemas/params.schema.yaml",),
              f"{PACKAGE}.runs": ("workflow/schemas/params.schema.yaml",)}
# Packages whose __init__ imports every module of its folder by discovery (pkgutil), not by
# name: importing one counts as importing all its modules (methods: each module registers one).
IMPORTS_EVERY_MODULE = {f"{PACKAGE}.methods"}


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of a `pipeline_src` module or package, or None when there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package(module: str, package_dir: Path) -> bool:
    path = module_file(module, package_dir)
    return path is not None and path.name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom, package_dir: Path) -> str:
    """The absolute module name an `ImportFrom` node refers to, seen from `module`."""
    if not node.level:
        return node.module or ""
    here = module.split(".")
    # A package's __init__ is its own anchor; a module's anchor is its package.
    anchor = here if _is_package(module, package_dir) else here[:-1]
    anchor = anchor[:len(anchor) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _imports_of_nodes(module: str, nodes: Iterable[ast.AST], package_dir: Path) -> set[str]:
    found: set[str] = set()
    for node in nodes:
        for child in ast.walk(node):
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(module, child, package_dir)
                for alias in child.names:
                    # `from .pkg import name` imports the submodule pkg.name when there is one.
                    sub = f"{base}.{alias.name}"
                    found.add(sub if module_file(sub, package_dir) else base)
    return {name for name in found if module_file(name, package_dir)}


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(module: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Every `pipeline_src` module that `module` imports anywhere in its source
    (module level, functions, methods), relative imports resolved."""
    path = module_file(module, package_dir)
    if path is None:
        raise ValueError(f"{module}: not a module of {PACKAGE} under {package_dir}")
    found = _imports_of_nodes(module, [_parse(path)], package_dir)
    if module in IMPORTS_EVERY_MODULE:
        found |= {f"{module}.{file.stem}" for file in path.parent.glob("*.py") if file.stem != "__init__"}
    return found - {module}


def function_imports(module: str, function: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The `pipeline_src` modules imported inside one top-level function of `module`."""
    tree = _parse(module_file(module, package_dir))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return _imports_of_nodes(module, [node], package_dir)
    raise ValueError(f"{module} has no top-level function {function}")


def module_level_imports(module: str, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """The `pipeline_src` modules `module` imports when it is imported (not inside its functions)."""
    tree = _parse(module_file(module, package_dir))
    top = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.ClassDef))]
    return _imports_of_nodes(module, top, package_dir)


def all_modules(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Every module and package of `pipeline_src`, by dotted name."""
    names = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((PACKAGE,) + parts))
    return names


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """{module: the modules it imports anywhere}, for every module of the package."""
    return {module: imported_modules(module, package_dir) for module in all_modules(package_dir)}


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def closure(modules: Iterable[str], package_dir: Path = PACKAGE_DIR) -> set[str]:
    """`modules`, their parent packages and everything they import, transitively."""
    seen: set[str] = set()
    todo = [m for module in modules for m in _with_parents(module)]
    while todo:
        module = todo.pop()
        if module in seen or module_file(module, package_dir) is None:
            continue
        seen.add(module)
        todo.extend(m for imported in imported_modules(module, package_dir) for m in _with_parents(imported))
    return seen


def code_files(modules: Iterable[str], package_dir: Path = PACKAGE_DIR,
               root: Path = PROJECT_ROOT) -> list[str]:
    """The files (project-relative, sorted) that running `modules` executes or reads."""
    files = set()
    for module in closure(modules, package_dir):
        files.add(module_file(module, package_dir).relative_to(root).as_posix())
        files.update(DATA_FILES.get(module, ()))
    return sorted(files)


def stage_code(handler: str, package_dir: Path = PACKAGE_DIR, root: Path = PROJECT_ROOT) -> list[str]:
    """The files a stage runs: `python -m pipeline_src` (`__main__`, and `cli`
    with what it imports at module level and in `main`) and whatever the
    stage's handler in `cli`, a function named `handler`, imports. The other
    stages' handlers are not followed: their lazy imports never run here."""
    cli = f"{PACKAGE}.cli"
    entry = {*module_level_imports(cli, package_dir), *function_imports(cli, "main", package_dir),
             *function_imports(cli, handler, package_dir)}
    own = {module_file(m, package_dir).relative_to(root).as_posix() for m in (cli, f"{PACKAGE}.__main__")}
    return sorted(set(code_files(entry, package_dir, root)) | own)
