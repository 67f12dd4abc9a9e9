"""Snakemake's rule objects, read in one place (pipeline_src/snakemake_adapter.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline_src.snakemake_adapter import (TESTED_SNAKEMAKE, SnakemakeVersionError, check_snakemake_version,
                                            load_rules)

SNAKEFILE = '''
def sources(wildcards):
    return {"table": f"in/{wildcards.name}.csv", "extra": ["a.txt", "b.txt"]}

rule all:
    input: expand("out/{name}.txt", name=["x"])

rule make:
    input: "code.py", unpack(sources)
    output: "out/{name}.txt"
    log: "logs/{name}.log"
    benchmark: "bench/{name}.tsv"
    params: block=config["block"]
    resources: gpu=1, mem_mb=300
    shell: "python code.py {wildcards.name} > {log}"
'''


def test_rules_come_back_as_plain_values(tmp_path: Path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    rules = load_rules(tmp_path / "Snakefile", tmp_path, {"block": {"lr": 0.1}})
    assert set(rules) == {"all", "make"}
    make = rules["make"]
    assert make.wildcard_names == {"name"} and make.params == ["block"]
    assert make.outputs == ["out/{name}.txt"] and make.log == ["logs/{name}.log"]
    assert make.benchmark == "bench/{name}.tsv"
    assert make.resources["gpu"] == 1 and make.resources["mem_mb"] == 300
    assert make.inputs_for({"name": "y"}) == ["code.py", "in/y.csv", "a.txt", "b.txt"]
    assert make.shellcmd == "python code.py {wildcards.name} > {log}"
    assert rules["all"].inputs_for({}) == ["out/x.txt"]


def test_another_snakemake_minor_version_is_refused_with_what_to_do():
    assert check_snakemake_version(f"{TESTED_SNAKEMAKE}.9") == f"{TESTED_SNAKEMAKE}.9"
    major, minor = TESTED_SNAKEMAKE.split(".")
    for other in (f"{major}.{int(minor) + 1}.0", f"{int(major) + 1}.0.0", f"{major}.{int(minor) - 1}.3"):
        with pytest.raises(SnakemakeVersionError, match=rf"Snakemake {other} is installed.*{TESTED_SNAKEMAKE}\.x"):
            check_snakemake_version(other)


def test_the_installed_snakemake_is_the_tested_one_and_requirements_pin_it():
    check_snakemake_version()
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    major, minor = TESTED_SNAKEMAKE.split(".")
    assert f"snakemake>={major}.{minor},<{major}.{int(minor) + 1}" in requirements
