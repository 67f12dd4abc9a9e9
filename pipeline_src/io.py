"""Files written by the stages: always atomically, so an interrupted stage
never leaves a partial output that a runner could mistake for a finished one."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_torch(obj: Any, path: str | Path) -> None:
    import torch  # lazy: the report stages and the Snakefile import this module without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_json(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def git_commit(root: str | Path) -> str:
    """The commit of the code that made an output ('+dirty' when the code or
    params have uncommitted changes), or 'unknown' outside a git checkout.

    $PIPELINE_GIT_COMMIT, when set, names the commit instead, with '+copy': for a
    copy of the tree run elsewhere (a lent GPU machine), whose own .git, if it has
    one, may be older than the tree (seen: the session's first commit, '+dirty')."""
    named = os.environ.get("PIPELINE_GIT_COMMIT", "").strip()
    if named:
        return f"{named}+copy"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Runner bookkeeping (dvc.lock, results) does not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "pipeline_src", "workflow", "Snakefile", "params.yaml",
                                ":(glob)config/*/params.yaml"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def state_dict_sha256(state_dict: dict) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, values): unlike the
    hash of a torch.save file, it is the same for the same weights."""
    import torch  # lazy, as in save_torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
