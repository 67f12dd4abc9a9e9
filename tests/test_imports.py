"""Where pipeline_src's imports are written (issue 21, item 5): at the top of a module,
unless a comment says why not. A function-level import decides a stage's code inputs
(code_deps.py) and its start-up time, so each one must say which of the two it is for:
the handlers of cli.py (one comment above them explains theirs), an optional package
imported inside `try: ... except ImportError`, or a comment on the import's line or the
line above it."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pipeline_src"


def _handlers() -> set[str]:
    from pipeline_src.cli import STAGES, TOOLS

    return {handler.__name__ for handler, _ in {**STAGES, **TOOLS}.values()}


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        for sub in ast.walk(handler.type) if handler.type is not None else ():
            if isinstance(sub, ast.Name):
                names.add(sub.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def function_level_imports_without_reason(path: Path, exempt_functions: set[str]) -> list[str]:
    """`file:line: import` for each import inside a function that neither sits in an
    exempt function, nor in a try that catches ImportError, nor has a comment on its
    line or the line above."""
    lines = path.read_text().splitlines()
    found = []

    def visit(node: ast.AST, function: str | None, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if function is None else function, False)
            elif isinstance(child, ast.Try):
                visit(child, function, guarded or _catches_import_error(child))
            elif isinstance(child, (ast.Import, ast.ImportFrom)) and function is not None:
                here, above = lines[child.lineno - 1], child.lineno - 2
                while lines[above].strip().startswith(("import ", "from ")):   # one comment per group
                    above -= 1
                above = lines[above].strip()
                if not (guarded or function in exempt_functions or "#" in here or above.startswith("#")):
                    found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{child.lineno}: {here.strip()}")
            else:
                visit(child, function, guarded)

    visit(ast.parse("\n".join(lines)), None, False)
    return found


def test_the_checker_finds_an_unexplained_lazy_import_and_accepts_the_explained_ones(tmp_path: Path):
    module = tmp_path / "pipeline_src" / "toy.py"
    module.parent.mkdir()
    module.write_text("import os\n\n\ndef plain():\n    import json\n\n\n"
                      "def commented():\n    import json  # lazy: start-up\n\n\n"
                      "def above():\n    # lazy: start-up\n    import json\n\n\n"
                      "def optional():\n    try:\n        import markdown_it\n"
                      "    except ImportError:\n        pass\n\n\n"
                      "def _stage_toy():\n    import json\n")
    global PACKAGE_DIR
    saved, PACKAGE_DIR = PACKAGE_DIR, module.parent
    try:
        found = function_level_imports_without_reason(module, {"_stage_toy"})
    finally:
        PACKAGE_DIR = saved
    assert found == ["pipeline_src/toy.py:5: import json"]


def test_every_function_level_import_says_why():
    exempt = _handlers()
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        found += function_level_imports_without_reason(path, exempt if path.name == "cli.py" else set())
    assert not found, "imports inside functions without a reason (move them to the top, or comment):\n" + \
        "\n".join(found)


@pytest.mark.parametrize("stage", ["tables", "figures", "report"])
def test_the_torch_free_stages_import_no_torch(stage: str):
    """The report stages skip torch's numerics (cli.TORCH_FREE_STAGES): every module their
    stage runs (code_deps' closure of the handler) must import without torch, or the stage
    would run torch with its default threads."""
    from pipeline_src.cli import STAGES, TORCH_FREE_STAGES
    from pipeline_src.code_deps import stage_code

    assert stage in TORCH_FREE_STAGES
    modules = [Path(f).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
               for f in stage_code(STAGES[stage][0].__name__) if f.endswith(".py") and "__main__" not in f]
    assert f"pipeline_src.report.{ {'report': 'document'}.get(stage, stage)}" in modules
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PACKAGE_DIR.parent, check=True)
    assert result.stdout.strip() == "False"
