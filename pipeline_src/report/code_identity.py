"""Whether the seeds of a row ran the same code, stage by stage.

A row of the tables averages the seeds of one run group; seeds trained in
different sessions (committed runs, GPU windows) may come from different
commits. Each metrics file records the commit of the code that made it
(`io.git_commit`); two commits ran the same code for a stage when the files
that stage runs (`code_deps.stage_code`, derived from the imports at that
commit) are byte for byte the same at both. Only the stage's own files count:
a commit that edits the report or the README leaves a training comparable.

The files are read from git, so the comparison needs the repository's history
(a clean clone has it). A recorded commit that git cannot resolve, or one made
from a tree with uncommitted code ('+dirty'), cannot be compared with another
commit: the report refuses to average it rather than guess. Identical recorded
strings need no lookup and count as the same code, '+dirty' ones included: the
runs of one DAG invocation share one tree (and REPORT.md lists every commit)."""
from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from ..code_deps import PACKAGE, stage_code

# What `stage_code` reads besides the package itself (the schema that config reads as code).
_ARCHIVED = (PACKAGE, "workflow/schemas")


class CodeUnknown(Exception):
    """The code behind a recorded commit cannot be read back; says why."""


def _git(root: Path, *args: str) -> bytes:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout
    except FileNotFoundError:
        raise CodeUnknown("git is not installed") from None
    except subprocess.CalledProcessError as err:
        raise CodeUnknown(err.stderr.decode(errors="replace").strip().splitlines()[-1]
                          if err.stderr else f"git {' '.join(args)} failed") from None


def _commit_of(recorded: str) -> str:
    """The commit to read: '+copy' names a copy of that commit's tree run elsewhere."""
    if recorded.endswith("+copy"):
        recorded = recorded[:-len("+copy")]
    if recorded == "unknown" or "+" in recorded:
        raise CodeUnknown(f"'{recorded}' is not a committed tree")
    return recorded


@lru_cache(maxsize=None)
def stage_files(recorded: str, stage: str, root: Path) -> dict[str, str]:
    """{file: sha256} of what `stage` ran at the recorded commit, read from git."""
    commit = _commit_of(recorded)
    archive = _git(root, "archive", "--format=tar", commit, *_ARCHIVED)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tree = Path(tmp)
        try:
            files = stage_code(f"_stage_{stage}", package_dir=tree / PACKAGE, root=tree)
        except (ValueError, SyntaxError) as err:
            raise CodeUnknown(f"the {stage} stage's files at {commit[:12]} cannot be derived ({err})") from None
        return {name: hashlib.sha256((tree / name).read_bytes()).hexdigest() for name in files}


def code_difference(first: str, second: str, stage: str, root: Path) -> list[str]:
    """The files of `stage` that differ between two recorded commits (present at one
    only, or changed); empty when the stage ran the same code at both. Raises
    CodeUnknown when either side cannot be read."""
    if first == second:
        return []
    a, b = stage_files(first, stage, Path(root)), stage_files(second, stage, Path(root))
    return sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))
