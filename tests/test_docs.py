"""The README stays short, its commands are CI's, and no link in the docs is dangling.

Checks README.md, docs/*.md and results/README.md: every relative Markdown link
(`[text](path)`, `[text](path#anchor)`) points to a file or folder that exists,
and an anchor into a Markdown file to one of its headings; README.md is at most
220 lines; the install and test commands of `.ci/run`, and the quick test tier's
command, appear in README.md verbatim.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 220
QUICK_TESTS = 'python -m pytest -q -m "not e2e and not slow"'

# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_files() -> list[Path]:
    files = [README, ROOT / "results" / "README.md", ROOT / "config" / "README.md",
             *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def links(text: str) -> list[str]:
    """Link targets outside fenced code blocks and inline code."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out += LINK.findall(re.sub(r"`[^`]*`", "", line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    out: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = 0
            while (slug if n == 0 else f"{slug}-{n}") in out:
                n += 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("#")


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move details to docs/"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_exist(doc: Path):
    broken = []
    for target in links(doc.read_text(encoding="utf-8")):
        if is_external(target):
            continue
        path, _, anchor = target.partition("#")
        file = doc.parent / path.split("?", 1)[0]
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"


def test_link_parser_finds_links():
    text = "a [x](docs/a.md) b ![i](img.png \"t\") `[no](code.md)`\n```\n[no](fenced.md)\n```\n[y](b.md#part)"
    assert links(text) == ["docs/a.md", "img.png", "b.md#part"]


def test_anchor_slugs():
    text = "# Title\n## The benchmark command\n## What changed (issue 11, 2026-12-01)\n## Title\n```\n# not\n```"
    assert anchors(text) == {"title", "the-benchmark-command", "what-changed-issue-11-2026-12-01", "title-1"}


def ci_commands() -> list[str]:
    """The install and test command lines of .ci/run."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines
            if not line.lstrip().startswith("#") and ("pip install" in line or "pytest" in line)]


def test_ci_commands_are_in_readme():
    commands = ci_commands()
    assert any("pip install" in c for c in commands) and any("pytest" in c for c in commands)
    readme = README.read_text(encoding="utf-8")
    missing = [c for c in commands + [QUICK_TESTS] if c not in readme]
    assert not missing, f"commands of .ci/run not verbatim in README.md: {missing}"
