"""The smoke profile end to end: through Snakemake, again for determinism,
through `dvc repro`, and through a cluster executor for the resources."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run
from pipeline_src.config import load_params
from pipeline_src.runs import compose_runs, method_runs

SMOKE = Path("results/smoke")


def _metrics_without_timing(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("timing")
    metrics.pop("git_commit")
    return metrics


def _check_smoke_outputs(project: Path) -> None:
    params = load_params("smoke", project)
    run_dir = project / SMOKE

    provenance = json.loads((run_dir / "data/provenance.json").read_text())
    assert provenance["source"] == "sample" and provenance["lossy_jpeg"] is True
    assert provenance["images"] == {"train_total": 1000, "train": 900, "val": 100, "test": 500}
    cache = torch.load(run_dir / "data/cifar10.pt", weights_only=False)
    assert cache["train_x"].dtype == torch.uint8 and cache["train_x"].shape == (900, 3, 32, 32)

    metrics = json.loads((run_dir / "vanilla/metrics.json").read_text())
    assert metrics["arch"] == "6C2F" and metrics["epochs"] == params["vanilla"]["epochs"]
    assert 0.0 <= metrics["test_accuracy"] <= 100.0
    assert metrics["data"]["source"] == "sample" and metrics["data"]["lossy_jpeg"] is True
    with open(run_dir / "vanilla/history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == params["vanilla"]["epochs"]
    assert {"epoch", "train_loss", "train_accuracy", "val_accuracy", "lr", "seconds",
            "peak_memory_mb"} <= set(history[0])
    assert not (run_dir / "vanilla/checkpoint.pt").exists(), "a finished run leaves no checkpoint"

    summary = json.loads((run_dir / "svd/summary.json").read_text())
    assert len(summary["layers"]) == 8 and summary["ranks"] == params["svd"]["ranks"]
    factors = torch.load(run_dir / "svd/factors.pt", weights_only=False)
    model = torch.load(run_dir / "vanilla/model.pt", weights_only=False)["state_dict"]
    weights = [v for k, v in model.items() if k.endswith("weight")]
    for layer, weight in zip(factors["layers"], weights):
        matrix = weight.reshape(weight.shape[0], -1)
        rebuilt = layer["U"] @ torch.diag(layer["S"]) @ layer["V"].t()
        torch.testing.assert_close(rebuilt, matrix, atol=1e-4, rtol=1e-4)
    for method in load_params("smoke", project)["methods"]:
        _check_method_outputs(run_dir, method)
    for composed in compose_runs(params):
        _check_compose_outputs(run_dir, composed, params)
    for stage in ("data", "vanilla", "svd", "benchmark", "tables", "figures", "report"):
        assert (run_dir / "logs" / f"{stage}.log").stat().st_size > 0
    # Each stage's log opens with what it will do (conftest.TEST_STAGE_THREADS: one thread).
    assert (run_dir / "logs/train_bcp.log").read_text().startswith(
        "[train] bcp | cpu, 1 CPU thread | 900 train / 100 val / 500 test images | 2 epochs, batch 64")
    assert "\r" not in (run_dir / "logs/train_bcp.log").read_text()
    _check_report_outputs(run_dir, params)
    # The paper profile's folder is never touched by a smoke run.
    assert not (project / "results/paper").exists()


def _check_report_outputs(run_dir: Path, params: dict) -> None:
    """Every table in three formats, every figure in two, and REPORT.md with all of them."""
    from PIL import Image

    from pipeline_src.report.figures import DPI, FIGURES, SIZES

    report = (run_dir / "REPORT.md").read_text()
    benchmark = json.loads((run_dir / "benchmark" / f"benchmark_{params['model']['arch']}.json").read_text())
    assert [row["method"] for row in benchmark["rows"]] == ["floor", *params["methods"]]
    assert "## Cost, measured by the benchmark stage" in report and "| floor |" in report
    for number in (1, 2, 3):
        markdown = (run_dir / "tables" / f"table{number}.md").read_text()
        assert markdown in report
        assert (run_dir / "tables" / f"table{number}.tex").read_text().count(r"\begin{tabular}") == 1
        with open(run_dir / "tables" / f"table{number}.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert {row["run_group"] for row in rows} >= set(params["methods"])
    certify = json.loads((run_dir / "certify/bcp/metrics.json").read_text())
    bcp_row = next(line for line in (run_dir / "tables/table2.md").read_text().splitlines()
                   if line.startswith("| BCP |"))
    assert f"| {certify['clean_accuracy']:.2f} | 65.70 |" in bcp_row
    for name in FIGURES:
        with Image.open(run_dir / "figures" / f"{name}.png") as image:
            assert image.size == tuple(round(side * DPI) for side in SIZES[name])
        assert (run_dir / "figures" / f"{name}.pdf").stat().st_size > 0
        assert f"figures/{name}.png" in report


def _check_compose_outputs(run_dir: Path, run: str, params: dict) -> None:
    """Certify or predict: the curve starts at the run alone (tau = 0 is GloRo's certificate,
    the same number the certify stage reports), tau was chosen from the grid on validation,
    and the composite's attacked accuracy lies between its certified and clean accuracy."""
    compose = json.loads((run_dir / "compose" / run / "metrics.json").read_text())
    certify = json.loads((run_dir / "certify" / run / "metrics.json").read_text())
    train = json.loads((run_dir / "train" / run / "metrics.json").read_text())
    assert compose["weights_sha256"] == train["weights_sha256"] == certify["weights_sha256"]
    alone = compose["certified_model_alone"]
    assert alone["certified_accuracy"] == pytest.approx(certify["certified_accuracy"]["gloro"])
    assert alone["certified_model_answers"] == 100.0
    assert set(compose["curves"]) == set(params["compose"]["guides"])
    assert [p["tau"] for p in compose["curves"]["vanilla"]["val"]] == pytest.approx(
        [t * params["certify"]["eps"] for t in params["compose"]["taus"]])
    assert compose["chosen"]["tau_over_eps"] in params["compose"]["taus"]
    chosen = compose["chosen"]["test"]
    attacked = compose["attack"]["robust_accuracy"]
    assert chosen["certified_accuracy"] - 1e-9 <= attacked <= chosen["clean_accuracy"] + 1e-9
    assert compose["attack"]["certified_points_broken"] == 0
    assert "## Certify or predict" in (run_dir / "REPORT.md").read_text()


def _check_method_outputs(run_dir: Path, method: str) -> None:
    train = json.loads((run_dir / "train" / method / "metrics.json").read_text())
    assert train["method"] == method and train["selected_epoch"] >= 1
    with open(run_dir / "train" / method / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == train["epochs"]
    assert {"clean_loss", "clean_accuracy", "robust_loss", "certified_accuracy", "lipschitz", "eps",
            "kappa", "lr", "seconds", "peak_memory_mb", "val_certified_accuracy"} <= set(history[0])
    assert float(history[0]["kappa"]) == 1.0 and float(history[-1]["eps"]) > 0
    certify = json.loads((run_dir / "certify" / method / "metrics.json").read_text())
    assert set(certify["certified_accuracy"]) == (
        {"lipschitz", "gloro", "bcp", "local"} if method in ("localbcp", "duet_local")
        else {"lipschitz", "gloro", "bcp"})
    assert certify["headline_certifier"] == {"lmt": "lipschitz", "bcp": "bcp", "localbcp": "local",
                                             "duet": "bcp", "gloro": "gloro", "duet_local": "local"}[method]
    curve = certify["radius_curve"]
    assert curve["radii"][0] == 0 and curve["bcp"][0] == pytest.approx(certify["clean_accuracy"])
    for name in certify["certified_accuracy"]:
        assert all(a >= b for a, b in zip(curve[name], curve[name][1:])), "curve must not rise"
    spectral = certify["spectral_norms"]
    assert all(u >= e for u, e in zip(spectral["upper"], spectral["estimate"]))
    similarity = json.loads((run_dir / "similarity" / method / "metrics.json").read_text())
    assert len(similarity["similarity_per_layer"]) == 8
    assert all(-100.0 <= v <= 100.0 for v in similarity["similarity_per_layer"])
    assert similarity["lipschitz_upper"] >= similarity["lipschitz_estimate"]
    attack = json.loads((run_dir / "pgd" / method / "metrics.json").read_text())
    assert attack["certified_points_broken"] == 0
    assert attack["pgd_accuracy"] <= certify["clean_accuracy"] + 1e-9
    assert attack["pgd_accuracy"] >= certify["certified_accuracy"][certify["headline_certifier"]] - 1e-9


def test_snakemake_smoke_end_to_end_and_deterministic(smoke_copy: Path):
    """The shared build (`snakemake --cores 2 all`, conftest.smoke_build) holds every
    output; nothing is left to do; the HTML report; a code change reruns exactly its
    stages; the trained stages run again from scratch give the same numbers."""
    _check_smoke_outputs(smoke_copy)
    for stage in ("data", "vanilla", "svd", "train_bcp", "certify_bcp", "pgd_bcp"):
        assert (smoke_copy / SMOKE / "benchmarks" / f"{stage}.tsv").is_file()
    first = _metrics_without_timing(smoke_copy / SMOKE / "vanilla/metrics.json")
    first_bcp = _metrics_without_timing(smoke_copy / SMOKE / "train/bcp/metrics.json")
    first_svd = json.loads((smoke_copy / SMOKE / "svd/summary.json").read_text())

    # Nothing to do when nothing changed, for Snakemake nor for DVC (docs/runners.md).
    dry = run(["snakemake", "--cores", "1", "all", "--config", "profile=smoke", "-n"], smoke_copy)
    assert "Nothing to be done" in dry.stdout + dry.stderr
    status = run(["dvc", "status", "config/smoke/dvc.yaml"], smoke_copy).stdout
    assert "up to date" in status.lower(), status

    # The HTML report holds the tables, the figures and REPORT.md.
    run(["snakemake", "--cores", "1", "--config", "profile=smoke", "--report", "report.html"], smoke_copy)
    html = (smoke_copy / "report.html").read_text()
    for name in ("table1.html", "table2.html", "table3.html", "fig2_clean.png", "fig3_certified.png",
                 "radius_curve.png", "similarity_per_layer.png", "tradeoff.png", "REPORT.html"):
        assert name in html, name
    # Every table and figure with its caption (workflow/report/*.rst).
    for caption in ("Table 1: rotation similarity", "Table 2: clean, PGD and certified accuracy",
                    "Table 3: computation cost", "Figure 2: clean loss and accuracy", "Figure 3: robust loss",
                    "Certified accuracy against the l2 radius", "Rotation similarity per layer",
                    "a banner on top when the run"):
        assert caption in html, caption

    # A code change reruns exactly the stages that run that code.
    module = smoke_copy / "pipeline_src/certify/similarity.py"
    original = module.read_text()
    module.write_text(original + "\n# edited\n")
    dry = run(["snakemake", "--cores", "1", "all", "--config", "profile=smoke", "-n"], smoke_copy)
    text = dry.stdout + dry.stderr
    assert "rule similarity" in text
    for rule in ("data", "vanilla", "svd", "train", "certify", "pgd"):
        assert f"rule {rule}:" not in text, rule
    module.write_text(original)

    # The same run again (the trained stages, from scratch) gives the same numbers.
    run(["snakemake", "--cores", "1", "--config", "profile=smoke", "--forcerun", "vanilla", "train", "svd",
         "--", str(SMOKE / "vanilla/metrics.json"), str(SMOKE / "train/bcp/metrics.json"),
         str(SMOKE / "svd/summary.json")], smoke_copy)
    assert _metrics_without_timing(smoke_copy / SMOKE / "vanilla/metrics.json") == first
    assert json.loads((smoke_copy / SMOKE / "svd/summary.json").read_text()) == first_svd
    assert _metrics_without_timing(smoke_copy / SMOKE / "train/bcp/metrics.json") == first_bcp


def test_dvc_repro_smoke(smoke_copy: Path):
    """DVC on what Snakemake built: `dvc repro` of the whole smoke DAG has nothing to run,
    its views read every file; then LocalBCP trained again by DVC and by the plain command
    gives Snakemake's weights and metrics. (DVC building stages from nothing, and Snakemake
    then having nothing to do, is tests/test_runners.py's first test.)"""
    repro = run(["dvc", "repro", "config/smoke/dvc.yaml"], smoke_copy).stdout
    assert "Running stage" not in repro, repro[-3000:]
    _check_smoke_outputs(smoke_copy)
    status = run(["dvc", "status", "config/smoke/dvc.yaml"], smoke_copy)
    assert "up to date" in status.stdout.lower()
    dry = run(["snakemake", "--cores", "1", "all", "--config", "profile=smoke", "-n"], smoke_copy)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    # `dvc metrics show` of the profile: one narrow row per row of Table 2, no warning.
    shown = run(["dvc", "metrics", "show", "results/smoke/summary"], smoke_copy)
    lines = shown.stdout.splitlines()
    assert "failed" not in (shown.stdout + shown.stderr).lower(), shown.stdout + shown.stderr
    assert max(map(len, lines)) <= 120, lines
    assert lines[0].split() == ["Path", "certified", "clean", "lipschitz", "n", "pgd", "similarity"], lines[0]
    groups = {run.group for run in method_runs(load_params("smoke")).values()}
    assert {line.split()[0] for line in lines[1:]} == {f"results/smoke/summary/{g}.json" for g in groups}
    # Runner bookkeeping (dvc.lock) does not make the code dirty in what the stages record.
    assert "+dirty" not in json.loads((smoke_copy / SMOKE / "certify/duet/metrics.json").read_text())["git_commit"]
    # The training curves, and the runs side by side as an experiment table.
    run(["dvc", "plots", "show", "--out", "plots"], smoke_copy)
    page = (smoke_copy / "plots/index.html").read_text()
    assert "certified accuracy on validation, sound certifier" in page and "clean accuracy" in page
    diff = run(["dvc", "metrics", "diff", "--all"], smoke_copy).stdout
    assert "results/smoke/summary/duet.json" in diff and "certified" in diff
    experiments = run(["dvc", "exp", "show", "--csv", "--no-pager"], smoke_copy).stdout
    assert "results/smoke/summary/duet.json:certified" in experiments

    # The same training under Snakemake, DVC and the plain command (two OpenMP threads asked
    # for in the environment, the copy's run.cpu_threads is 1; the stage sets its own):
    # LocalBCP, whose clean and PGD accuracy once moved by 8-12 points with the thread
    # count, trained again. Its metrics name the weights (weights_sha256): the same bits
    # give the same certificates and attacks, which the certify and PGD stages of every
    # runner compute by the same command.
    trained = SMOKE / "train/localbcp/metrics.json"
    under_snakemake = _metrics_without_run_facts(smoke_copy / trained)
    run(["dvc", "repro", "--force", "--single-item", "config/smoke/dvc.yaml:train_localbcp"], smoke_copy)
    assert _metrics_without_run_facts(smoke_copy / trained) == under_snakemake
    run(["env", "OMP_NUM_THREADS=2", "MKL_NUM_THREADS=2", "python", "-m", "pipeline_src", "train",
         "--profile", "smoke", "--method", "localbcp"], smoke_copy)
    assert _metrics_without_run_facts(smoke_copy / trained) == under_snakemake


def _metrics_without_run_facts(path: Path) -> dict:
    """A metrics file less what differs between two runs of the same computation."""
    metrics = json.loads(path.read_text())
    for key in ("timing", "git_commit"):
        metrics.pop(key, None)
    return metrics


def test_training_killed_through_snakemake_resumes_to_the_same_weights(smoke_copy: Path):
    """SIGKILL to the whole snakemake process group once the first epoch's checkpoint is
    written; `--unlock`, then the same command continues from the checkpoint and ends
    with the weights of a run that was never interrupted (the shared build's)."""
    import os
    import signal
    import subprocess
    import time

    from conftest import tool_env

    target = str(SMOKE / "train/bcp/metrics.json")
    straight = json.loads((smoke_copy / target).read_text())
    for name in ("metrics.json", "history.csv", "model.pt"):
        (smoke_copy / SMOKE / "train/bcp" / name).unlink()
    command = ["snakemake", "--cores", "1", "--config", "profile=smoke", "--", target]
    checkpoint = smoke_copy / SMOKE / "train/bcp/checkpoint.pt"
    job = subprocess.Popen(command, cwd=smoke_copy, env=tool_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not checkpoint.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists() and job.poll() is None, "no checkpoint before the run ended"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (smoke_copy / target).exists()
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["epoch"] == 1

    run(["snakemake", "--unlock", "--config", "profile=smoke"], smoke_copy)
    resumed = run(command[:-2] + ["--rerun-incomplete", "--", target], smoke_copy)
    log = (smoke_copy / SMOKE / "logs/train_bcp.log").read_text()
    assert "resum" in log.lower(), log[-2000:]
    assert not checkpoint.exists(), "a finished run removes its checkpoint"
    resumed_metrics = json.loads((smoke_copy / target).read_text())
    assert resumed_metrics["weights_sha256"] == straight["weights_sha256"], resumed.stdout[-2000:]
    assert resumed_metrics["selected_epoch"] == straight["selected_epoch"]


FAKE_SUBMIT = '''\
import subprocess, sys
log, args, jobscript = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
with open(log, "a") as fh:
    fh.write(" ".join(args) + "\\n")
# A cluster runs the job script elsewhere; here it runs at once, in place.
subprocess.run(["bash", jobscript], check=True)
print("424242")
'''


def test_cluster_executor_receives_resources(project_copy: Path, tmp_path: Path):
    """The resources that the SLURM profile maps to sbatch reach a cluster submit command."""
    submit = tmp_path / "fake_submit.py"
    submit.write_text(FAKE_SUBMIT)
    record = tmp_path / "submitted.txt"
    profile = tmp_path / "cluster_profile"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump({
        "executor": "cluster-generic",
        "cluster-generic-submit-cmd": (f"{sys.executable} {submit} {record} "
                                       "--job={rule} --gpus={resources.gpu} --mem={resources.mem_mb} "
                                       "--time={resources.runtime}"),
        "jobs": 1,
        "latency-wait": 5,
        "default-resources": ["gpu=0"],
    }))
    # One job of every rule: the stages behind the LMT attack, and the SVD export, on 200
    # images of the sample (what is measured here is what reaches the submit command).
    override = project_copy / "config/smoke/params.yaml"
    override.write_text(override.read_text()
                        .replace("val_size: 100", "per_class: {train: 20, test: 10}\n  val_size: 40")
                        .replace("min_test_accuracy: 15.0", "min_test_accuracy: 0.0"))
    run(["snakemake", "--profile", str(profile), "--config", "profile=smoke", "--",
         str(SMOKE / "pgd/lmt/metrics.json"), str(SMOKE / "svd/summary.json")], project_copy)
    assert (project_copy / SMOKE / "pgd/lmt/metrics.json").is_file()
    submitted = {line.split()[0]: line.split() for line in record.read_text().splitlines()}
    assert set(submitted) == {f"--job={rule}" for rule in
                              ("data", "vanilla", "svd", "train", "certify", "pgd")}, submitted
    for rule in ("vanilla", "train", "certify", "pgd"):
        assert "--gpus=1" in submitted[f"--job={rule}"], rule
    assert "--gpus=0" in submitted["--job=data"] and "--gpus=0" in submitted["--job=svd"]
    slurm = yaml.safe_load((project_copy / "profiles/slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm"
    for job in submitted.values():
        assert any(arg.startswith("--mem=") and int(arg[6:]) > 0 for arg in job)
        assert any(arg.startswith("--time=") and int(arg[7:]) > 0 for arg in job)


@pytest.mark.parametrize("runner", ["snakemake", "cli"])
def test_bad_params_stop_with_the_key_named(project_copy: Path, runner: str):
    override = project_copy / "config/smoke/params.yaml"
    override.write_text(override.read_text().replace("val_size: 100", "val_sise: 100"))
    cmd = (["snakemake", "--cores", "1", "all", "--config", "profile=smoke", "-n"] if runner == "snakemake"
           else ["python", "-m", "pipeline_src", "data", "--profile", "smoke"])
    result = run(cmd, project_copy, check=False)
    assert result.returncode != 0
    assert "data.val_sise" in result.stdout + result.stderr


def test_command_line_config_other_than_profile_is_refused(project_copy: Path):
    result = run(["snakemake", "--cores", "1", "all", "-n", "--config", "profile=smoke", "seed=3"],
                 project_copy, check=False)
    assert result.returncode != 0 and "seed" in result.stdout + result.stderr
    # A profile's file given as --configfile: the error says how to select a profile.
    result = run(["snakemake", "--cores", "1", "all", "-n", "--configfile", "config/smoke/params.yaml"],
                 project_copy, check=False)
    assert result.returncode != 0 and "--config profile=<name>" in result.stdout + result.stderr


def test_bad_data_stops_the_stage_with_the_file_named(project_copy: Path, tmp_path: Path):
    missing = tmp_path / "no-such-cifar.tar.gz"
    override = project_copy / "config/smoke/params.yaml"
    override.write_text(override.read_text().replace("source: sample", "source: images")
                        .replace("path: null", f"path: {missing}"))
    result = run(["python", "-m", "pipeline_src", "data", "--profile", "smoke"], project_copy, check=False)
    assert result.returncode == 2
    assert str(missing) in result.stderr and result.stderr.count("\n") == 1
    assert not (project_copy / SMOKE / "data/cifar10.pt").exists()
