"""Issue 12, the GPU window, on the CPU: committed runs leave the DAG but not the report,
seeds add up over windows without retraining, the certified runs share the machine
under Snakemake, the window's schedules fit its minutes, and the concurrency benchmark's
plumbing runs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, run
from pipeline_src.config import ParamsError, load_params
from pipeline_src.cli import main
from pipeline_src.runs import committed_seeds, method_runs, runs_to_train
from pipeline_src.schedule_fit import concurrency_slowdown, scaled_schedule, window_plan, write_window_plan


def _add_profile(project: Path, name: str, override: dict) -> None:
    folder = project / "config" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(override, sort_keys=False))


# A window on the CPU: BCP and the paper's Duet on 200 images of the committed sample, two
# steps an epoch.
TINY = {
    "run": {"name": "tinywin", "device": "cpu"},
    "data": {"source": "sample", "path": None, "per_class": {"train": 20, "test": 10}, "val_size": 40},
    "seeds": [0],
    "committed_runs": None,
    "methods": ["bcp", "duet"],
    "vanilla": {"epochs": 1, "batch_size": 128, "warmup_epochs": 0, "eval_batch_size": 250,
                "min_test_accuracy": 0.0},   # one epoch: no accuracy to require
    "svd": {"ranks": [4], "power_iterations": 20},
    **{m: {"epochs": 2, "warmup_epochs": 1, "ramp_epochs": 1, "batch_size": 128, "compile": False,
           "lr_schedule": {"kind": "step", "step_epochs": 1, "gamma": 0.5, "final_lr": 1.0e-6}}
       for m in ("bcp", "duet")},
    "similarity": {"controls": False},
    "certify": {"batch_size": 100, "power_iterations": 10, "reference_power_iterations": 10,
                "radius_points": 3, "test_images": 40},
    "pgd": {"steps": 3, "batch_size": 100, "apgd": False},
}
TINY["duet"]["rank"] = 4


def test_committed_runs_must_be_runs_of_the_profile(tmp_path: Path):
    project = copy_project(tmp_path / "project")
    _add_profile(project, "tinywin", {**TINY, "committed_runs": ["bcp-s0", "bcp-s7"]})
    with pytest.raises(ParamsError, match="committed_runs.*bcp-s7"):
        load_params("tinywin", project)
    _add_profile(project, "tinywin", {**TINY, "seeds": [0, 1], "committed_runs": ["bcp-s0", "duet-s0"]})
    params = load_params("tinywin", project)
    assert list(method_runs(params)) == ["bcp-s0", "bcp-s1", "duet-s0", "duet-s1"]
    assert list(runs_to_train(params)) == ["bcp-s1", "duet-s1"]



def test_committed_seeds_are_those_with_every_run_committed(tmp_path: Path, capsys):
    project = copy_project(tmp_path / "project")
    _add_profile(project, "tinywin", {**TINY, "seeds": [0, 1, 2], "committed_runs": ["bcp-s0", "duet-s0", "bcp-s2"]})
    assert committed_seeds(load_params("tinywin", project)) == [0]
    _add_profile(project, "tinywin", {**TINY, "seeds": [0, 1, 2], "committed_runs": ["bcp-s1", "duet-s2"]})
    assert committed_seeds(load_params("tinywin", project)) == []
    # The smoke profile commits no run: the report stages refuse to run on no seed.
    assert main(["tables", "--profile", "smoke", "--committed-seeds"]) == 2
    assert "--committed-seeds: no seed of profile smoke" in capsys.readouterr().err

def test_committed_runs_have_no_stage_but_the_report_reads_them(tmp_path: Path):
    from pipeline_src.dag import workflow_rules, workflow_stages

    project = copy_project(tmp_path / "project")
    _add_profile(project, "tinywin", {**TINY, "seeds": [0, 1], "committed_runs": ["bcp-s0", "duet-s0"]})
    stages = {s.name: s for s in workflow_stages("tinywin", project)}
    assert {"train_bcp-s1", "certify_duet-s1", "similarity_duet-s1"} <= set(stages)
    assert not [name for name in stages if name.endswith("-s0")]
    for rule in ("tables", "figures", "report"):
        assert {"results/tinywin/certify/bcp-s0/metrics.json", "results/tinywin/train/duet-s0/history.csv",
                "results/tinywin/certify/bcp-s1/metrics.json"} <= set(stages[rule].deps), rule
    all_inputs = workflow_rules("tinywin", project)["all"].inputs_for({})
    assert "results/tinywin/certify/bcp-s0/metrics.json" not in all_inputs


def test_gpu_rules_share_the_card_through_a_resource():
    from pipeline_src.dag import workflow_rules

    rules = workflow_rules("smoke")
    for name in ("vanilla", "vanilla_control", "train", "certify", "pgd", "timing"):
        assert rules[name].resources["gpu_jobs"] == 1, name
    assert "gpu_jobs" not in rules["data"].resources and "gpu_jobs" not in rules["report"].resources


def test_window_profile_is_valid_and_trains_the_papers_question():
    params = load_params("window")
    assert params["run"]["device"] == "cuda" and params["data"]["source"] == "images"
    assert list(method_runs(params)) == ["lmt-s0", "bcp-s0", "localbcp-s0", "duet-s0", "duet-r8-l1-direction-s0"]
    run_cfg = method_runs(params)["duet-r8-l1-direction-s0"].config
    assert run_cfg["sim_form"] == "direction" and params["duet"]["cert_rotation"] == "normalized_weight"
    # LMT, BCP and Duet share one schedule (Duet is paired with BCP), in the paper's shape.
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    shared = {k: params["bcp"][k] for k in ("epochs", "warmup_epochs", "ramp_epochs")}
    for method in ("lmt", "duet"):
        assert {k: params[method][k] for k in shared} == shared
    for method in ("bcp", "localbcp"):
        expected = scaled_schedule(base[method], params[method]["epochs"])
        assert params[method]["warmup_epochs"] == expected["warmup_epochs"]
        assert params[method]["ramp_epochs"] == expected["ramp_epochs"]
        assert params[method]["lr_schedule"]["step_epochs"] == expected["step_epochs"]
    assert params["benchmark"]["concurrency"] == [1, 2, 4, 6] and not params["benchmark"]["enabled"]


def test_concurrency_slowdown_interpolates_and_is_safe_without_a_measurement():
    result = {"concurrency": {"rows": [{"jobs": 1, "slowdown_each": 1.0}, {"jobs": 2, "slowdown_each": 1.2},
                                       {"jobs": 4, "slowdown_each": 2.0}]}}
    assert concurrency_slowdown(result, 1) == 1.0
    assert concurrency_slowdown(result, 3) == pytest.approx(1.6)
    assert concurrency_slowdown(result, 8) == pytest.approx(4.0)   # aggregate throughput saturated
    assert concurrency_slowdown({}, 5) == 5.0                      # unmeasured: as if one after another


def test_window_plan_fits_the_budget_and_is_written_into_the_profile(tmp_path: Path):
    project = copy_project(tmp_path / "project")
    params = load_params("window", project)
    seconds = {"floor": 0.94, "lmt": 1.68, "bcp": 3.81, "localbcp": 8.80, "duet": 5.0}
    plan = window_plan(params, seconds, 540.0, lambda k: 1.5, root=project)
    family, local = plan["families"]["bcp family"], plan["families"]["localbcp"]
    assert family["methods"] == ["bcp", "duet", "lmt"] and plan["jobs_sharing_the_card"] == 6
    # Duet starts after the vanilla model and the SVD, and ends in time for its evaluation.
    costs = plan["costs"]
    assert family["starts_at_s"] == pytest.approx(costs["start_s"] + costs["data_s"] + plan["vanilla_s"]
                                                  + costs["svd_s"])
    assert family["starts_at_s"] + family["epochs"] * family["seconds_per_epoch_shared"] <= (
        540 - costs["eval_s"] - costs["report_s"])
    assert 3 <= family["epochs"] < local["epochs"] * 10
    write_window_plan(params, project, plan)
    fitted = load_params("window", project)
    for method in ("lmt", "bcp", "duet"):
        assert fitted[method]["epochs"] == family["epochs"]
    assert fitted["localbcp"]["epochs"] == local["epochs"]
    assert "# GPU window profile" in (project / "config/window/params.yaml").read_text()


def test_concurrency_benchmark_plumbing_on_cpu(tmp_path: Path):
    """k BCP trainings at once, one process each: on a CPU only the plumbing means anything."""
    from pipeline_src.benchmark import concurrency_benchmark
    from pipeline_src.report.benchmark_tables import concurrency_markdown_table
    from pipeline_src.data.cifar import build_cache
    from pipeline_src.paths import RunLayout

    params = load_params("smoke")
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    result = concurrency_benchmark(params, tmp_path, [2], warmup_steps=0, steps=1)
    assert [row["jobs"] for row in result["rows"]] == [1, 2]
    one, two = result["rows"]
    assert one["slowdown_each"] == pytest.approx(1.0) and two["images_per_second"] > 0
    assert two["slowdown_each"] == pytest.approx(2 / two["speedup_over_one"])
    assert result["method"] == "bcp" and not result["mps"]
    assert "| 2 |" in concurrency_markdown_table(result)


def _hashes(project: Path, runs: list[str]) -> dict[str, str]:
    return {r: json.loads((project / f"results/tinywin/train/{r}/metrics.json").read_text())["weights_sha256"]
            for r in runs}


def test_two_windows_add_a_seed_without_retraining(tmp_path: Path):
    """Window 1 trains seed 0 with the runs sharing the machine (--cores 2, --resources
    gpu_jobs=2); its results are 'committed' (weights and data cache gone, as on a fresh
    machine); tools/window.py next-seed names seed 1; window 2 trains seed 1 only, and its
    report shows both seeds, paired."""
    project = copy_project(tmp_path / "project")
    _add_profile(project, "tinywin", TINY)
    command = ["snakemake", "all", "--cores", "2", "--resources", "gpu_jobs=2", "--scheduler", "greedy",
               "--config", "profile=tinywin"]
    run(command, project)
    first_vanilla = json.loads((project / "results/tinywin/vanilla/metrics.json").read_text())["weights_sha256"]

    # What git keeps of window 1: no weights, no data cache, no Snakemake state.
    results = project / "results/tinywin"
    for path in list(results.rglob("*.pt")):
        path.unlink()
    subprocess.run(["rm", "-rf", str(project / ".snakemake")], check=True)
    committed = {p: p.read_bytes() for p in results.rglob("*") if p.is_file() and "/train/" in str(p)
                 or p.is_file() and any(f"/{s}/" in str(p) for s in ("certify", "pgd", "similarity"))}
    assert committed

    nxt = run(["python", "tools/window.py", "next-seed", "--profile", "tinywin"], project)
    assert "the next window trains: bcp-s1, duet-s1" in nxt.stdout
    params = load_params("tinywin", project)
    assert params["seeds"] == [0, 1] and params["committed_runs"] == ["bcp-s0", "duet-s0"]

    dry = run(command + ["-n"], project).stdout
    assert "train" in dry and "-s0" not in "".join(line for line in dry.splitlines() if "wildcards" in line)
    run(command, project)
    for path, content in committed.items():
        assert path.read_bytes() == content, f"{path} was rewritten"
    assert not (results / "train/bcp-s0/model.pt").exists(), "a committed run was retrained"
    # The vanilla model is retrained each window: the same weights, so the committed runs'
    # similarity files still match it (the report checks).
    assert json.loads((results / "vanilla/metrics.json").read_text())["weights_sha256"] == first_vanilla
    report = (results / "REPORT.md").read_text()
    assert "| seeds | 0, 1 |" in report
    table2 = (results / "tables/table2.csv").read_text()
    assert "duet" in table2
    again = run(["python", "tools/window.py", "next-seed", "--profile", "tinywin"], project)
    assert "the next window trains: bcp-s2, duet-s2" in again.stdout
