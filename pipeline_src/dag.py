"""One DAG, two runners: dvc.yaml is generated from the Snakemake workflow.

Each Snakemake rule (but `all`) becomes a DVC stage with the same command,
the rule's inputs as deps, its outputs (and log) as outs, and its `params:`
entries as params keys: a rule's params are named after the params.yaml
blocks they carry, so `params: vanilla=P["vanilla"]` becomes the DVC param
`vanilla`, and a double underscore names one key of a block
(`certify__test_images=P["certify"]["test_images"]`: `certify.test_images`).
The paper profile's stages go to ./dvc.yaml; another profile's to
config/<name>/dvc.yaml, run from the project root (`wdir`), with the
profile's override file as a second params file.

`tests/test_dag.py` regenerates them and fails when the committed files drift.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from itertools import product
from types import SimpleNamespace
from pathlib import Path

import yaml

from .snakemake_adapter import RuleView, apply_wildcards, load_rules
from .config import BASE_PARAMS, PAPER_PROFILE, PROJECT_ROOT, dvc_yaml_path, load_params, profile_override_path
from .runs import compose_runs_to_train, method_runs, runs_to_train

HEADER = ("# Generated from the Snakemake workflow by `python -m pipeline_src export-dvc`;\n"
          "# do not edit: change workflow/rules/*.smk and regenerate.\n")
# Both runners share one results folder (docs/runners.md): DVC neither caches an output
# (no copy, no relink, no new mtime) nor deletes one before its stage runs (a stage that
# refuses its params leaves every output in place). DVC's views get what a person
# can read: `dvc metrics` the report's per-row summary files (six numbers a row; the
# stages' detailed metrics.json files, 20 to 60 keys each, are plain outputs), `dvc
# plots` the per-epoch histories.
OUT_OPTIONS = {"cache": False, "persist": True}
PLOTS = ("history.csv",)


def out_kind(path: str) -> str:
    """`metrics` for a summary file of the report (RunLayout.summary), `plots` for a
    per-epoch history, `outs` for everything else."""
    if Path(path).parent.name == "summary" and path.endswith(".json"):
        return "metrics"
    return "plots" if path.endswith(PLOTS) else "outs"


@dataclass
class Stage:
    name: str
    cmd: str
    deps: list[str]
    outs: list[str]
    log: list[str]
    params: list[str]


# The committed CIFAR-10 sample (data.cifar.SAMPLE_ARCHIVE), from the project root;
# named here so that loading the workflow does not import torch.
SAMPLE_ARCHIVE = "pipeline_src/data/sample/cifar10-sample.tar.gz"


def data_inputs(data: dict) -> list[str]:
    """What the data stage reads, as an input of its rule (a DVC dep too): replacing the
    archive or folder at the same path reruns it (under Snakemake, unless the params pin its
    sha256: then its mtime is ignored, workflow/rules/common.smk `data_source`). The committed sample for `sample`,
    `data.path` for `images`; nothing for `torchvision`, whose download torchvision checks
    itself (and which need not exist before the first run)."""
    if data["source"] == "sample":
        return [SAMPLE_ARCHIVE]
    if data["source"] == "images" and data["path"]:
        return [os.path.expanduser(data["path"])]
    return []


def workflow_rules(profile: str = PAPER_PROFILE, root: Path = PROJECT_ROOT) -> dict[str, RuleView]:
    """The rules of the workflow as loaded for `profile`, by name (snakemake_adapter)."""
    return load_rules(root / "Snakefile", root, {"profile": profile})


# Where a wildcard's values come from: the DAG runs one job per value.
# A committed run (`committed_runs`) has no stage: its metrics files are plain deps of the report.
WILDCARD_VALUES = {"method": lambda params: list(runs_to_train(params))}
# A rule that runs for some of a wildcard's values only (as its Snakemake file selects them).
RULE_WILDCARD_VALUES = {
    "compose": {"method": compose_runs_to_train},
}


def stage_name(rule: str, wildcards: dict) -> str:
    """A job's DVC stage: the rule, then its wildcard values in name order (`train_bcp`)."""
    return "_".join([rule, *(str(wildcards[n]) for n in sorted(wildcards))])


def workflow_stages(profile: str = PAPER_PROFILE, root: Path = PROJECT_ROOT) -> list[Stage]:
    """The rules of the workflow (but `all`) as runner-neutral stages, one per
    job: a rule with a {method} wildcard gives a stage per method (`train_bcp`)."""
    params = load_params(profile, root)
    stages = []
    for rule in workflow_rules(profile, root).values():
        if rule.name == "all":
            continue
        names = sorted(rule.wildcard_names)
        unknown = [n for n in names if n not in WILDCARD_VALUES]
        if unknown:
            raise NotImplementedError(f"rule {rule.name}: wildcard(s) {unknown} have no values in "
                                      f"pipeline_src/dag.py WILDCARD_VALUES")
        values_of = {**WILDCARD_VALUES, **RULE_WILDCARD_VALUES.get(rule.name, {})}
        combos = [{}] if not names else [
            dict(zip(names, values)) for values in product(*(values_of[n](params) for n in names))]
        for wildcards in combos:
            log = [apply_wildcards(f, wildcards) for f in rule.log]
            stages.append(Stage(
                name=stage_name(rule.name, wildcards),
                cmd=rule.shellcmd.format(log=" ".join(log), wildcards=SimpleNamespace(**wildcards)),
                deps=rule.inputs_for(wildcards),
                outs=[apply_wildcards(f, wildcards) for f in rule.outputs],
                log=log,
                # A param named `method` carries the params block of the run's method.
                params=[method_runs(params)[wildcards["method"]].method if key == "method"
                        else key.replace("__", ".") for key in rule.params],
            ))
    return stages


def _sets(params: dict, dotted: str) -> bool:
    """Whether `params` holds the block or block.key `dotted`."""
    for part in dotted.split("."):
        if not isinstance(params, dict) or part not in params:
            return False
        params = params[part]
    return True


def dvc_document(profile: str = PAPER_PROFILE, root: Path = PROJECT_ROOT) -> str:
    params = load_params(profile, root)
    override = profile_override_path(profile, root)
    override_params = {} if override is None else (yaml.safe_load(override.read_text()) or {})
    stages = {}
    workflow = workflow_stages(profile, root)
    for stage in workflow:
        unknown = [key for key in stage.params if not _sets(params, key)]
        if unknown:
            raise ValueError(f"rule {stage.name}: params {unknown} are not params.yaml blocks; name "
                             f"each rule param after the block it carries (block__key for one key)")
        entry: dict = {}
        if override is not None:
            entry["wdir"] = "../.."
        entry["cmd"] = stage.cmd
        entry["deps"] = stage.deps
        stage_params: list = [{BASE_PARAMS: sorted(stage.params)}]
        in_override = sorted(key for key in stage.params if _sets(override_params, key))
        if in_override:
            stage_params.append({str(override.relative_to(root)): in_override})
        entry["params"] = stage_params
        uncached = lambda path: {path: dict(OUT_OPTIONS)}  # noqa: E731
        entry["outs"] = [uncached(out) for out in stage.outs
                         if out_kind(out) == "outs"] + [uncached(log) for log in stage.log]
        for kind in ("metrics", "plots"):
            declared = [uncached(out) for out in stage.outs if out_kind(out) == kind]
            if declared:
                entry[kind] = declared
        stages[stage.name] = entry
    # Top-level plot paths are relative to the dvc.yaml file, not to the stages' wdir.
    document = {"stages": stages, "plots": training_curves(workflow, "" if override is None else "../../")}
    target = "" if override is None else " " + dvc_yaml_path(profile, root).relative_to(root).as_posix()
    title = f"# Profile '{profile}': `dvc repro{target}`.\n"
    return HEADER + title + yaml.safe_dump(document, sort_keys=False, width=100, allow_unicode=True)


# `dvc plots show`: the certified runs' per-epoch curves, one plot per quantity.
TRAINING_CURVES = {"clean accuracy (%)": "clean_accuracy",
                   "certified accuracy on validation, sound certifier (%)": "val_certified_accuracy",
                   "robust loss": "robust_loss"}


def training_curves(stages: list[Stage], prefix: str = "") -> list[dict]:
    histories = [prefix + out for stage in stages if stage.name.startswith("train_")
                 for out in stage.outs if out.endswith(PLOTS)]
    return [{column: {"x": "epoch", "y": {path: column for path in histories}, "title": title,
                      "x_label": "epoch", "y_label": title}}
            for title, column in TRAINING_CURVES.items()]


def known_profiles(root: Path = PROJECT_ROOT) -> list[str]:
    return [PAPER_PROFILE] + sorted(p.parent.name for p in (root / "config").glob("*/params.yaml"))


def write_dvc_yaml(root: Path = PROJECT_ROOT, profiles: list[str] | None = None) -> list[Path]:
    written = []
    for profile in profiles or known_profiles(root):
        path = dvc_yaml_path(profile, root)
        path.write_text(dvc_document(profile, root))
        written.append(path)
    return written


# ---------------------------------------------------------------- one results folder
# Each runner records what the other ran (docs/runners.md), so that after either one the
# other has nothing to do until something it tracks changes.
def _dvc_importable() -> bool:
    return importlib.util.find_spec("dvc") is not None


def record_snakemake_jobs_for_dvc(jobs: list[tuple[str, dict]], profile: str, root: Path = PROJECT_ROOT) -> None:
    """Snakemake's `onsuccess:`: write the dvc.lock entries of every job of the finished
    run's DAG (each one is up to date now), as `dvc repro` would have: `dvc commit -f`.
    Outputs are not cached (OUT_OPTIONS), so this only hashes files. Nothing when DVC is
    not installed, when the project is no DVC repository, or when `dvc repro` itself ran
    this Snakemake (it records its own lock)."""
    dvc_file = dvc_yaml_path(profile, root)
    if os.environ.get("DVC_STAGE") or not _dvc_importable() or not (root / ".dvc").is_dir() \
            or not dvc_file.is_file():
        return
    defined = set((yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}))
    names = sorted({stage_name(rule, wildcards) for rule, wildcards in jobs if rule != "all"} & defined)
    if not names:
        return
    where = dvc_file.relative_to(root).as_posix()
    # Every stage of the file (a full run): the file as one target. DVC collects the
    # pipeline once per target, so naming the smoke DAG's 38 stages one by one took 103 s
    # on two cores where the file took 7.
    targets = ([where] if set(names) == defined
               else names if where == "dvc.yaml" else [f"{where}:{name}" for name in names])
    result = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *targets],
                            cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"warning: dvc commit of {len(names)} stage(s) failed; `dvc status {where}` will list "
              f"them as changed ({(result.stderr or result.stdout).strip()[-500:]})", file=sys.stderr)


def record_dvc_stage_for_snakemake(dvc_stage: str, profile: str, log: str | None,
                                   root: Path = PROJECT_ROOT) -> None:
    """After a stage that `dvc repro` ran (DVC_STAGE set): record its job in Snakemake's
    metadata (params, code, input set), as a Snakemake run would have, with `snakemake
    --touch --force` on its outputs. Nothing when Snakemake is not installed."""
    if importlib.util.find_spec("snakemake") is None:
        return
    where, _, name = dvc_stage.rpartition(":")
    dvc_file = root / (where or "dvc.yaml")
    entry = (yaml.safe_load(dvc_file.read_text()) or {}).get("stages", {}).get(name)
    if entry is None:
        return
    outs = [next(iter(out)) if isinstance(out, dict) else out
            for kind in ("outs", "metrics", "plots") for out in entry.get(kind, [])]
    targets = [out for out in outs if out != log]
    result = subprocess.run([sys.executable, "-m", "snakemake", "--touch", "--force", "--cores", "1",
                             "--quiet", "all", "--config", f"profile={profile}", "--", *targets],
                            cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"warning: could not record stage {name} for Snakemake; its next run may redo it "
              f"({(result.stderr or result.stdout).strip()[-500:]})", file=sys.stderr)
