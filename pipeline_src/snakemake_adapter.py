"""The one place that reads Snakemake's internals.

DVC's stage files are generated from the Snakemake workflow (pipeline_src/dag.py),
and tests check every rule's log, benchmark and resources. Both need the loaded
rules, which Snakemake's public API does not expose: this module loads the
workflow through the API, reaches into its private objects once, and hands
back plain `RuleView`s. Snakemake may change those objects in any release, so
the version is checked first against the minor version this was tested with
(requirements.txt pins the same one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from .errors import StageError

# The Snakemake minor version whose private objects this module reads (requirements.txt pins it).
TESTED_SNAKEMAKE = "9.27"


class SnakemakeVersionError(StageError):
    """The installed Snakemake is not the one this adapter was written against."""


def check_snakemake_version(version: str | None = None) -> str:
    """The installed Snakemake version, if its major.minor is TESTED_SNAKEMAKE."""
    if version is None:
        try:  # optional: the GPU machine runs the stages without Snakemake
            from snakemake import __version__ as version
        except ImportError as err:
            raise SnakemakeVersionError("Snakemake is not installed: pip install -r requirements.txt") from err
    if ".".join(version.split(".")[:2]) != TESTED_SNAKEMAKE:
        raise SnakemakeVersionError(
            f"Snakemake {version} is installed; pipeline_src/snakemake_adapter.py reads Snakemake's "
            f"internal rule objects and was tested with {TESTED_SNAKEMAKE}.x. Install the pinned one "
            f"(pip install -r requirements.txt), or check the adapter against {version} "
            f"(pytest tests/test_snakemake_adapter.py tests/test_dag.py) and move TESTED_SNAKEMAKE.")
    return version


@dataclass
class RuleView:
    """What the project reads of one Snakemake rule, as plain Python values."""
    name: str
    shellcmd: str
    # Input files as written, or functions of the job's wildcards (plain or unpack()ed).
    inputs: list[str | Callable[[Any], Any]]
    outputs: list[str]
    log: list[str]
    benchmark: str | None
    params: list[str]
    wildcard_names: set[str]
    resources: dict[str, Any] = field(default_factory=dict)

    def inputs_for(self, wildcards: dict[str, str]) -> list[str]:
        """The job's input files: input functions called with its wildcards, patterns filled."""
        files: list[str] = []
        for item in self.inputs:
            if callable(item):
                value = item(SimpleNamespace(**wildcards))
                values = value.values() if isinstance(value, dict) else (
                    value if isinstance(value, (list, tuple)) else [value])
                for v in values:
                    files.extend(v if isinstance(v, (list, tuple)) else [v])
            else:
                files.append(item)
        return [apply_wildcards(str(f), wildcards) for f in files]


def apply_wildcards(pattern: str, wildcards: dict[str, str]) -> str:
    # Lazy, like every Snakemake import here: the stages import this module (through dag.py)
    # where Snakemake is not installed, and snakemake.api takes 1.7 s to import (measured).
    from snakemake.io import apply_wildcards as snakemake_apply

    return snakemake_apply(str(pattern), wildcards)


def _view(rule) -> RuleView:
    inputs: list = []
    for item in rule.input:
        # Snakemake wraps an unpack()ed input function in its file type (the function is the
        # private `_file`); a named one may stay a plain function.
        if hasattr(item, "is_callable") and item.is_callable():
            inputs.append(item._file.callable)
        else:
            inputs.append(item if callable(item) else str(item))
    resources = {}
    for name, value in rule.resources.items():
        # Defaults such as disk_mb are functions of a job's inputs: they have no value per rule.
        if hasattr(value, "is_evaluable") and value.is_evaluable():
            continue
        resources[name] = getattr(value, "value", value)
    return RuleView(name=rule.name, shellcmd=(rule.shellcmd or "").strip(), inputs=inputs,
                    outputs=[str(f) for f in rule.output], log=[str(f) for f in rule.log],
                    benchmark=str(rule.benchmark) if rule.benchmark else None,
                    params=list(rule.params.keys()), wildcard_names=set(rule.wildcard_names),
                    resources=resources)


def load_rules(snakefile: Path, workdir: Path, config: dict[str, Any]) -> dict[str, RuleView]:
    """The rules of the workflow in `snakefile` as loaded with `config`, by name."""
    check_snakemake_version()
    # lazy: see apply_wildcards
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, OutputSettings, Quietness, ResourceSettings,
                                          StorageSettings)

    cwd = os.getcwd()  # the workflow API changes into its workdir
    try:
        with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
            workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                                        config_settings=ConfigSettings(config=config),
                                        storage_settings=StorageSettings(),
                                        snakefile=Path(snakefile), workdir=Path(workdir))
            return {rule.name: _view(rule) for rule in workflow_api._workflow.rules}
    finally:
        os.chdir(cwd)


def dag_jobs(workflow) -> list[tuple[str, dict[str, str]]]:
    """(rule name, wildcards) of every job in the DAG of a running workflow (the
    `workflow` object of a Snakefile's onsuccess: handler)."""
    check_snakemake_version()
    return [(job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.jobs]
