"""No committed file names a folder of the machine it was made on (issue 21, item 5):
paths in code, docs, params, logs and results are project-relative (`../shared/...`,
`results/...`), so the repository reads the same from any clone."""
from __future__ import annotations

import re
import subprocess

import pytest

from conftest import ROOT

# An absolute path into a home or work folder, not part of a URL or a longer word.
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])/(?:work|home|Users|root|mnt)/[\w.-]+")


def machine_paths(text: str) -> list[str]:
    return MACHINE_PATH.findall(text)


def test_the_pattern_finds_machine_paths_and_leaves_urls_and_relative_paths():
    work, home = "/" + "work/campaign", "/" + "home/ana"   # split, or this file would hold them
    assert machine_paths(f'"path": "{work}/../shared/data.tar.gz"') == [work]
    assert machine_paths(f"[benchmark] wrote {home}/duet/results/x.json") == [home]
    assert machine_paths("see https://example.org/home/page and ../shared/data and results/work/x") == []


def test_no_committed_file_holds_a_machine_path():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    found = []
    for name in listed.stdout.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file() or path.stat().st_size > 4_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:   # binary: weights are not committed, figures hold no paths
            continue
        found += [f"{name}: {hit}" for hit in machine_paths(text)]
    assert not found, "machine paths in committed files:\n" + "\n".join(found[:20])
