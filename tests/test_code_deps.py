"""The import graph that gives each rule its code inputs (pipeline_src/code_deps.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_src import cli, code_deps


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pipeline_src"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_package(tmp_path, {
        "__init__.py": "",
        "base.py": "X = 1\n",
        "lazy.py": "def f():\n    from .deep.leaf import Y\n    return Y\n",
        "deep/__init__.py": "from . import leaf\n",
        "deep/leaf.py": "from ..base import X\nY = X\n",
        "pkg_user.py": "from .deep import leaf\nimport pipeline_src.base\nimport os\n",
        "cli.py": ("from .base import X\n\n"
                   "def main():\n    from . import errors\n\n"
                   "def _stage_a(params):\n    from .lazy import f\n\n"
                   "def _stage_b(params):\n    from .pkg_user import leaf\n"),
        "errors.py": "",
        "__main__.py": "from .cli import main\n",
    })


def test_function_level_and_relative_imports_are_resolved(toy: Path):
    assert code_deps.imported_modules("pipeline_src.lazy", toy) == {"pipeline_src.deep.leaf"}
    # `from . import leaf` inside a package's __init__ is relative to the package itself.
    assert code_deps.imported_modules("pipeline_src.deep", toy) == {"pipeline_src.deep.leaf"}
    assert code_deps.imported_modules("pipeline_src.deep.leaf", toy) == {"pipeline_src.base"}
    # A submodule named in `from .pkg import name`, an absolute import; os is not followed.
    assert code_deps.imported_modules("pipeline_src.pkg_user", toy) == {"pipeline_src.deep.leaf",
                                                                        "pipeline_src.base"}


def test_closure_follows_lazy_imports_and_adds_parent_packages(toy: Path):
    assert code_deps.closure(["pipeline_src.lazy"], toy) == {
        "pipeline_src", "pipeline_src.lazy", "pipeline_src.deep", "pipeline_src.deep.leaf", "pipeline_src.base"}


def test_a_stage_runs_its_handler_and_main_but_not_the_other_handlers(toy: Path):
    files = code_deps.stage_code("_stage_a", toy, toy.parent)
    assert files == sorted(["pipeline_src/__init__.py", "pipeline_src/__main__.py", "pipeline_src/cli.py",
                            "pipeline_src/base.py", "pipeline_src/errors.py", "pipeline_src/lazy.py",
                            "pipeline_src/deep/__init__.py", "pipeline_src/deep/leaf.py"])
    assert "pipeline_src/pkg_user.py" not in files
    assert "pipeline_src/pkg_user.py" in code_deps.stage_code("_stage_b", toy, toy.parent)
    with pytest.raises(ValueError, match="no top-level function"):
        code_deps.stage_code("_stage_c", toy, toy.parent)
def stage(name: str) -> list[str]:
    return code_deps.stage_code({**cli.STAGES, **cli.TOOLS}[name][0].__name__)


def test_the_real_stages_run_what_they_import_and_no_more():
    data = stage("data")
    assert "pipeline_src/data/cifar.py" in data and "workflow/schemas/params.schema.yaml" in data
    # The data stage runs no model, training or report code: editing those must not rebuild the cache.
    assert not [f for f in data if f.split("/")[1] in ("models", "training", "methods", "report", "bounds")]
    # Duet is imported lazily through the methods package; the train stage still lists it.
    assert "pipeline_src/methods/duet.py" in stage("train")
    assert "pipeline_src/training/certified.py" not in stage("certify")
    assert "pipeline_src/report/figures.py" in stage("figures")
