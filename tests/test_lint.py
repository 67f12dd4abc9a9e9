"""The linters CI runs, as tests: ruff over the code and `snakemake --lint` over the
workflow; and the conda environment that the lint asks each rule to name keeps
requirements.txt's pins."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_finds_nothing():
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent)) or "snakemake"
    result = subprocess.run([snakemake, "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "Lints for" not in result.stdout + result.stderr, (
        result.stdout[-3000:] + result.stderr[-3000:])


def test_the_rules_conda_environment_has_the_requirements_pins():
    env = yaml.safe_load((ROOT / "workflow/envs/pipeline.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert pip == requirement_lines("requirements.txt")
    post_deploy = (ROOT / "workflow/envs/pipeline.post-deploy.sh").read_text()
    no_deps = re.findall(r"pip install --no-deps (.+)", post_deploy)
    assert no_deps and no_deps[0].split() == requirement_lines("requirements-nodeps.txt")
