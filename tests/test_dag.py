"""One DAG, two runners: the committed dvc.yaml files are what the Snakemake
workflow generates, and every rule carries what the runners need."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline_src.config import load_params
from pipeline_src.runs import compose_runs, method_runs
from pipeline_src.config import dvc_yaml_path
from pipeline_src.dag import dvc_document, known_profiles, workflow_rules, workflow_stages

STAGE_MODULES = {
    "data": "pipeline_src.data.cifar",
    "vanilla": "pipeline_src.training.vanilla",
    "svd": "pipeline_src.spectral.svd_export",
    "train": "pipeline_src.training.certified",
    "certify": "pipeline_src.certify.stage",
    "pgd": "pipeline_src.certify.attack",
    "similarity": "pipeline_src.certify.similarity",
    "compose": "pipeline_src.certify.compose",   # the runs of compose.methods only
    # Table 1's control rows (similarity.controls, on in the smoke profile)
    "vanilla_control": "pipeline_src.training.vanilla",
    "similarity_control": "pipeline_src.certify.similarity",
    "tables": "pipeline_src.report.tables",
    "figures": "pipeline_src.report.figures",
    "report": "pipeline_src.report.document",
    "timing": "pipeline_src.benchmark",
}
PER_METHOD = ("train", "certify", "pgd", "similarity")


@pytest.mark.parametrize("profile", known_profiles())
def test_committed_dvc_yaml_matches_the_workflow(profile: str):
    path = dvc_yaml_path(profile)
    assert path.is_file(), f"{path} missing: run `python -m pipeline_src export-dvc`"
    assert path.read_text() == dvc_document(profile), (
        f"{path.relative_to(ROOT)} drifted from workflow/rules/*.smk: "
        f"run `python -m pipeline_src export-dvc` and commit the result")


def test_dvc_stages_mirror_rules():
    stages = {s.name: s for s in workflow_stages("smoke")}
    document = yaml.safe_load(dvc_yaml_path("smoke").read_text())["stages"]
    methods = list(method_runs(load_params("smoke")))
    expected = {n for n in STAGE_MODULES if n not in (*PER_METHOD, "compose")} | {
        f"{n}_{m}" for n in PER_METHOD for m in methods} | {f"compose_{m}" for m in compose_runs(load_params("smoke"))}
    assert set(stages) == set(document) == expected
    for name, stage in stages.items():
        entry = document[name]
        assert entry["cmd"] == stage.cmd and "--profile smoke" in entry["cmd"]
        assert entry["deps"] == stage.deps
        outs = [next(iter(o)) if isinstance(o, dict) else o
                for key in ("outs", "metrics", "plots") for o in entry.get(key, [])]
        assert set(outs) == set(stage.outs) | set(stage.log)
        assert entry["params"][0]["params.yaml"] == sorted(stage.params)
        if name.startswith("train_"):
            run_name = name.split("_", 1)[1]
            method = method_runs(load_params("smoke"))[run_name].method
            assert f"--method {run_name}" in entry["cmd"] and method in entry["params"][0]["params.yaml"]


def test_every_rule_has_log_benchmark_and_resources():
    rules = workflow_rules("smoke")
    for name, rule in rules.items():
        if name == "all":
            continue
        assert rule.log, f"rule {name} has no log:"
        assert rule.benchmark, f"rule {name} has no benchmark:"
        assert rule.resources["mem_mb"] > 0 and rule.resources["runtime"] > 0, name
    for name in ("vanilla", "vanilla_control", "train", "certify", "pgd"):
        assert rules[name].resources["gpu"] == 1, name
    assert "gpu" not in rules["data"].resources


@pytest.mark.parametrize("stage, module", sorted(STAGE_MODULES.items()))
def test_rule_inputs_list_all_the_code_the_stage_imports(stage: str, module: str):
    script = (f"import sys, pipeline_src.cli, {module}\n"
              "for name, mod in sorted(sys.modules.items()):\n"
              "    if name.startswith('pipeline_src') and getattr(mod, '__file__', None):\n"
              "        print(mod.__file__)")
    files = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    imported = {Path(f).resolve().relative_to(ROOT).as_posix() for f in files
                if not f.endswith("__init__.py")}
    declared = set(next(s for s in workflow_stages("smoke")
                        if s.name == stage or s.name.startswith(f"{stage}_")).deps)
    missing = imported - declared
    assert not missing, f"rule {stage} runs {sorted(missing)} but does not list them as inputs"


def test_seeds_give_one_job_per_run_and_seed_and_tables_read_them_all(tmp_path: Path):
    from conftest import copy_project

    project = copy_project(tmp_path / "project")
    override = project / "config/smoke/params.yaml"
    override.write_text(override.read_text() + "\nseeds: [0, 1]\n")
    stages = {s.name: s for s in workflow_stages("smoke", project)}
    groups = list(method_runs(load_params("smoke")))
    for group in groups:
        for seed in (0, 1):
            assert f"train_{group}-s{seed}" in stages and f"pgd_{group}-s{seed}" in stages
        assert f"train_{group}" not in stages
    assert "--method bcp-s1" in stages["train_bcp-s1"].cmd
    for rule in ("tables", "figures", "report"):
        assert {f"results/smoke/certify/{g}-s{s}/metrics.json" for g in groups for s in (0, 1)} <= set(
            stages[rule].deps), rule
    assert "seeds" in stages["tables"].params


def test_control_stages_follow_similarity_controls(tmp_path: Path):
    """Table 1's control rows are stages of the DAG, read by the report stages, and
    leave it when `similarity.controls` is off."""
    from conftest import copy_project

    controls = {"vanilla_control", "similarity_control"}
    stages = {s.name: s for s in workflow_stages("smoke")}
    assert controls <= set(stages)
    assert {"results/smoke/similarity_control/random/metrics.json",
            "results/smoke/similarity_control/vanilla_control/metrics.json"} <= set(stages["similarity_control"].outs)
    assert "results/smoke/vanilla_control/model.pt" in stages["similarity_control"].deps
    assert "--profile smoke" in stages["vanilla_control"].cmd and "similarity" in stages["vanilla_control"].params
    for rule in ("tables", "figures", "report"):
        assert {"results/smoke/similarity_control/vanilla_control/metrics.json",
                "results/smoke/similarity_control/random/metrics.json"} <= set(stages[rule].deps), rule
    all_inputs = {str(f) for f in workflow_rules("smoke")["all"].inputs_for({})}
    assert "results/smoke/similarity_control/random/metrics.json" in all_inputs

    project = copy_project(tmp_path / "project")
    override = project / "config/smoke/params.yaml"
    override.write_text(override.read_text().replace("compose:\n", "compose:\n  guides: [vanilla, untrained]\n")
                        + "\nsimilarity: {controls: false}\n")
    off = {s.name for s in workflow_stages("smoke", project)}
    assert not controls & off and "similarity_bcp" in off


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_dvc_never_deletes_or_caches_an_output(profile: str):
    """Every DVC output is `cache: false` (DVC neither copies nor relinks it: the file and
    its mtime are the stage's, which Snakemake reads) and `persist: true` (not deleted
    before its stage runs, so a stage that refuses its params loses nothing)."""
    document = yaml.safe_load(dvc_yaml_path(profile).read_text())["stages"]
    for name, entry in document.items():
        for kind in ("outs", "metrics", "plots"):
            for out in entry.get(kind, []):
                assert isinstance(out, dict), f"{name}: {out} has no options"
                assert next(iter(out.values())) == {"cache": False, "persist": True}, (name, out)


def test_data_stage_depends_on_the_data_it_reads():
    from pipeline_src.dag import SAMPLE_ARCHIVE
    from pipeline_src.data.cifar import SAMPLE_ARCHIVE as sample

    assert sample == ROOT / SAMPLE_ARCHIVE
    deps = {profile: next(s for s in workflow_stages(profile) if s.name == "data").deps
            for profile in ("smoke", "gpu", "paper")}
    assert "pipeline_src/data/sample/cifar10-sample.tar.gz" in deps["smoke"]
    assert load_params("gpu")["data"]["path"] in deps["gpu"]
    # torchvision downloads and checks its own files; they may not exist before the first run.
    assert not any(d.startswith(("data/", "../")) or d.endswith(".tar.gz") for d in deps["paper"])


def test_an_archive_pinned_by_its_hash_is_not_rerun_for_its_mtime():
    """The cpu profile pins its archive's sha256: Snakemake ignores the archive's mtime
    (`ancient`; a touched or re-copied archive reran the whole campaign on 2026-12-06).
    The sample archive (no pinned hash) still reruns the stage when it is newer."""
    from snakemake.io import is_flagged

    def source(profile):
        rule = workflow_rules(profile)["data"]
        return [value for item in rule.inputs if callable(item) for value in item(None)]

    assert load_params("cpu")["data"]["sha256"] and source("cpu") == [load_params("cpu")["data"]["path"]]
    assert all(is_flagged(path, "ancient") for path in source("cpu"))
    assert source("smoke") and not any(is_flagged(path, "ancient") for path in source("smoke"))
    assert load_params("cpu")["data"]["path"] in next(s for s in workflow_stages("cpu") if s.name == "data").deps


def test_all_asks_for_every_output_of_every_job():
    """A missing intermediate file (a model.pt) is rebuilt rather than hidden behind
    downstream files that exist."""
    wanted = {str(f) for f in workflow_rules("smoke")["all"].inputs_for({})}
    made = {out for stage in workflow_stages("smoke") for out in stage.outs}
    assert made - wanted == set()
