"""Whether two commits ran the same code in a stage, read from a real git history:
a commit that edits a file of the stage differs, one that edits the report or
the README does not, and a dirty or unknown commit cannot be compared."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline_src.report.code_identity import CodeUnknown, code_difference, stage_files

PROJECT = Path(__file__).resolve().parents[1]


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()


def _commit(repo: Path, message: str) -> str:
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A repository with the package at four commits: the base, an edit of the BCP
    bound (train and certify run it), an edit of the report, an edit of the README."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(PROJECT / "pipeline_src", repo / "pipeline_src",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "workflow" / "schemas", repo / "workflow" / "schemas")
    _git(repo, "init", "-q")
    commits = {"base": _commit(repo, "base")}
    bcp = repo / "pipeline_src" / "bounds" / "bcp.py"
    bcp.write_text(bcp.read_text() + "\n# an edit of a bound\n")
    commits["bound"] = _commit(repo, "bound")
    tables = repo / "pipeline_src" / "report" / "tables.py"
    tables.write_text(tables.read_text() + "\n# an edit of a table\n")
    commits["report"] = _commit(repo, "report")
    (repo / "README.md").write_text("readme\n")
    commits["readme"] = _commit(repo, "readme")
    return repo, commits


def test_a_stage_runs_its_own_files_only(history):
    repo, commits = history
    train = stage_files(commits["base"], "train", repo)
    assert "pipeline_src/bounds/bcp.py" in train and "pipeline_src/training/certified.py" in train
    assert not any(name.startswith("pipeline_src/report/") for name in train)


@pytest.mark.parametrize("stage", ["train", "certify"])
def test_an_edit_of_a_file_the_stage_runs_is_a_difference(history, stage):
    repo, commits = history
    assert code_difference(commits["base"], commits["bound"], stage, repo) == ["pipeline_src/bounds/bcp.py"]


@pytest.mark.parametrize("stage", ["train", "certify", "pgd", "similarity"])
def test_edits_outside_the_stage_leave_it_the_same(history, stage):
    repo, commits = history
    assert code_difference(commits["bound"], commits["readme"], stage, repo) == []
    assert code_difference(commits["bound"][:10], commits["report"] + "+copy", stage, repo) == []


def test_dirty_or_unknown_commits_cannot_be_compared(history):
    repo, commits = history
    with pytest.raises(CodeUnknown, match="not a committed tree"):
        code_difference(commits["base"], commits["base"] + "+dirty", "train", repo)
    with pytest.raises(CodeUnknown):
        code_difference(commits["base"], "0" * 40, "train", repo)
    assert code_difference("abc+dirty", "abc+dirty", "train", repo) == []  # one tree, one invocation
