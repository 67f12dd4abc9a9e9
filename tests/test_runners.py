"""Snakemake, `dvc repro` and the plain commands on one results folder (docs/runners.md):
the same bits under each, nothing to do for one runner after the other, a real change
seen by both, no output lost to a bad params value, the data stage's input tracked, and
no missing intermediate file left behind a "Nothing to be done"."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from conftest import run

SMOKE = Path("results/smoke")
DVC_YAML = "config/smoke/dvc.yaml"
SNAKEMAKE = ["snakemake", "--cores", "1", "--config", "profile=smoke"]
NOTHING = "Nothing to be done"


def _dvc_status(project: Path, *stages: str) -> str:
    return run(["dvc", "status", *(f"{DVC_YAML}:{s}" for s in stages)], project).stdout


def _snakemake_dry(project: Path, *targets: str) -> str:
    result = run(SNAKEMAKE + ["-n", "--", *targets], project)
    return result.stdout + result.stderr


def _weights(project: Path) -> str:
    return json.loads((project / SMOKE / "vanilla/metrics.json").read_text())["weights_sha256"]


def _set_override(project: Path, old: str, new: str) -> None:
    override = project / "config/smoke/params.yaml"
    text = override.read_text()
    assert old in text, old
    override.write_text(text.replace(old, new))


def test_dvc_then_snakemake_then_dvc_share_results_and_bits(project_copy: Path):
    """DVC builds data, vanilla and SVD; Snakemake then has nothing to do, and the reverse;
    a params change is seen by both and rebuilds only its stage; Snakemake and the plain
    command (two OpenMP threads asked for in the environment, the copy's profile sets 1,
    conftest.TEST_STAGE_THREADS) give DVC's weights bit for bit."""
    stages = ("data", "vanilla", "svd")
    summary = str(SMOKE / "svd/summary.json")
    # 200 images of the sample: what is compared is which runner reruns what, and the bits.
    _set_override(project_copy, "val_size: 100", "per_class: {train: 20, test: 10}\n  val_size: 40")
    _set_override(project_copy, "min_test_accuracy: 15.0", "min_test_accuracy: 0.0")
    run(["dvc", "repro", f"{DVC_YAML}:svd"], project_copy)
    dvc_weights = _weights(project_copy)
    assert "up to date" in _dvc_status(project_copy, *stages)
    assert NOTHING in _snakemake_dry(project_copy, summary)

    # A params value of the SVD stage: both runners see it, and only that stage.
    _set_override(project_copy, "power_iterations: 100", "power_iterations: 90")
    status = _dvc_status(project_copy, *stages)
    assert f"{DVC_YAML}:svd" in status and f"{DVC_YAML}:vanilla" not in status, status
    dry = _snakemake_dry(project_copy, summary)
    assert "rule svd:" in dry and "rule vanilla:" not in dry and "rule data:" not in dry, dry

    # Snakemake runs it; DVC then has nothing to do, nor has Snakemake.
    run(SNAKEMAKE + ["--", summary], project_copy)
    assert "up to date" in _dvc_status(project_copy, *stages)
    assert NOTHING in _snakemake_dry(project_copy, summary)
    dry_repro = run(["dvc", "repro", "--dry", f"{DVC_YAML}:svd"], project_copy).stdout
    assert "Running stage" not in dry_repro and "didn't change, skipping" in dry_repro, dry_repro

    # The same vanilla weights under Snakemake (which exports OMP_NUM_THREADS=1) and the plain command.
    run(SNAKEMAKE + ["--forcerun", "vanilla", "--", str(SMOKE / "vanilla/metrics.json")], project_copy)
    assert _weights(project_copy) == dvc_weights
    (project_copy / SMOKE / "vanilla/metrics.json").unlink()
    run(["env", "OMP_NUM_THREADS=2", "MKL_NUM_THREADS=2", "python", "-m", "pipeline_src", "vanilla",
         "--profile", "smoke"], project_copy)
    assert _weights(project_copy) == dvc_weights


def _outputs(project: Path, stage: str) -> dict[Path, bytes]:
    import yaml

    entry = yaml.safe_load((project / DVC_YAML).read_text())["stages"][stage]
    paths = [next(iter(o)) for kind in ("outs", "metrics", "plots") for o in entry.get(kind, [])]
    return {project / p: (project / p).read_bytes() for p in paths}


def test_bad_params_value_leaves_every_output_in_place(project_copy: Path):
    """Under DVC (which deletes a stage's outputs before running it unless they persist),
    under Snakemake and with the plain command's --log: a value the schema refuses stops
    the stage and every output of it, its log included, keeps its bytes."""
    import yaml

    entry = yaml.safe_load((project_copy / DVC_YAML).read_text())["stages"]["svd"]
    made = [next(iter(o)) for kind in ("outs", "metrics", "plots") for o in entry.get(kind, [])]
    for name in made + [dep for dep in entry["deps"] if not (project_copy / dep).exists()]:
        path = project_copy / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"an earlier run's {path.name}\n")
    before = _outputs(project_copy, "svd")
    _set_override(project_copy, "power_iterations: 100", "power_iterations: -3")

    dvc = run(["dvc", "repro", "--single-item", f"{DVC_YAML}:svd"], project_copy, check=False)
    assert dvc.returncode != 0 and "svd.power_iterations" in dvc.stdout + dvc.stderr
    snakemake = run(SNAKEMAKE + ["--forcerun", "svd", "--", str(SMOKE / "svd/summary.json")], project_copy,
                    check=False)
    assert snakemake.returncode != 0 and "svd.power_iterations" in snakemake.stdout + snakemake.stderr
    plain = run(["python", "-m", "pipeline_src", "svd", "--profile", "smoke", "--log",
                 str(SMOKE / "logs/svd.log")], project_copy, check=False)
    assert plain.returncode == 2 and "svd.power_iterations" in plain.stderr
    assert _outputs(project_copy, "svd") == before


def test_data_stage_reruns_when_its_archive_is_replaced(project_copy: Path):
    """The archive named in `data.path` is an input of the data stage under both runners:
    the same images re-compressed at the same path rerun it."""
    archive = project_copy / "incoming/cifar.tar.gz"
    archive.parent.mkdir()
    sample = project_copy / "pipeline_src/data/sample/cifar10-sample.tar.gz"
    archive.write_bytes(sample.read_bytes())
    _set_override(project_copy, "source: sample\n  path: null", "source: images\n  path: incoming/cifar.tar.gz")
    run(["python", "-m", "pipeline_src", "export-dvc", "--profiles", "smoke"], project_copy)
    cache = str(SMOKE / "data/cifar10.pt")
    run(SNAKEMAKE + ["--", cache], project_copy)
    assert NOTHING in _snakemake_dry(project_copy, cache)
    assert "up to date" in _dvc_status(project_copy, "data")

    archive.write_bytes(gzip.compress(gzip.decompress(archive.read_bytes()), compresslevel=1))
    assert archive.read_bytes() != sample.read_bytes()
    assert "rule data:" in _snakemake_dry(project_copy, cache)
    status = _dvc_status(project_copy, "data")
    assert "incoming/cifar.tar.gz" in status, status


def test_a_missing_intermediate_output_is_rebuilt(project_copy: Path):
    """`all` asks for every output, intermediate ones too: with every file of the smoke DAG
    present but a model.pt lost (a killed `--forcerun train`), the run is not "Nothing to
    be done" but retrains that run, and what reads the model follows."""
    from pipeline_src.dag import workflow_stages

    for stage in workflow_stages("smoke", project_copy):
        for out in stage.outs:
            path = project_copy / out
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("placeholder\n")
    assert NOTHING in _snakemake_dry(project_copy, "all")
    (project_copy / SMOKE / "train/bcp/model.pt").unlink()
    dry = _snakemake_dry(project_copy, "all")
    jobs = [line for line in dry.splitlines() if line.strip().startswith("wildcards:")]
    assert "method=bcp" in "".join(jobs) and "rule train:" in dry, dry
    for rule in ("certify", "pgd", "similarity", "tables", "report"):
        assert f"rule {rule}:" in dry, rule


def test_a_failed_run_says_how_to_recover(project_copy: Path):
    """A stage that fails (an unreadable archive) ends the Snakemake run with the recovery:
    --unlock, --rerun-incomplete, docs/runners.md."""
    bad = project_copy / "incoming/cifar.tar.gz"
    bad.parent.mkdir()
    bad.write_text("not an archive\n")
    _set_override(project_copy, "source: sample\n  path: null", "source: images\n  path: incoming/cifar.tar.gz")
    result = run(SNAKEMAKE + ["--", str(SMOKE / "data/cifar10.pt")], project_copy, check=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "not a readable" in text
    for hint in ("--unlock", "--rerun-incomplete", "docs/runners.md"):
        assert hint in text, hint


def test_a_stage_sets_its_own_numerics(tmp_path: Path):
    """Whatever the environment asks for, a stage runs with `run.cpu_threads` threads,
    deterministic algorithms and the cuBLAS workspace they need on a GPU."""
    import subprocess
    import sys

    from conftest import ROOT, tool_env

    script = ("import os, torch\n"
              "from pipeline_src.cli import set_numerics\n"
              "from pipeline_src.config import load_params\n"
              "params = load_params('smoke')\n"
              "params['run']['cpu_threads'] = 3\n"
              "set_numerics(params)\n"
              "print(torch.get_num_threads(), torch.get_num_interop_threads(),\n"
              "      torch.are_deterministic_algorithms_enabled(),\n"
              "      torch.is_deterministic_algorithms_warn_only_enabled(),\n"
              "      os.environ['CUBLAS_WORKSPACE_CONFIG'], os.environ['OMP_NUM_THREADS'])\n"
              "import torch._inductor.config as inductor\n"
              "print(inductor.deterministic)\n")
    env = {**tool_env(), "OMP_NUM_THREADS": "2"}
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["3", "3", "True", "True", ":4096:8", "3", "True"]   # the last: torch.compile's
    script = script.replace("= 3\n", "= 3\nparams['run']['deterministic'] = False\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[2] == "False" and out[-1] == "False"


def test_every_stage_log_opens_with_what_it_will_do(tmp_path: Path):
    """One header line per stage: device and threads, the data's sizes, the schedule, and
    the time its training steps should take from the run's benchmark (when measured)."""
    import json

    from pipeline_src.config import load_params
    from pipeline_src.paths import RunLayout
    from pipeline_src.stage_header import stage_header

    params = load_params("smoke")
    layout = RunLayout.of(params)
    assert "data not built yet" in stage_header(params, "train", "bcp", tmp_path, "cpu")
    provenance = tmp_path / layout.data_provenance
    provenance.parent.mkdir(parents=True)
    provenance.write_text(json.dumps({"images": {"train": 900, "val": 100, "test": 500}}))
    header = stage_header(params, "train", "bcp", tmp_path, "cpu")
    assert header.startswith("[train] bcp | cpu, 2 CPU threads | 900 train / 100 val / 500 test images | "
                             "2 epochs, batch 64 (1 warm-up, 1 ramp)")
    assert header.endswith("no estimate (no benchmark of this run measured)") and "\n" not in header
    benchmark = tmp_path / layout.root / "benchmark" / "benchmark_6C2F.json"
    benchmark.parent.mkdir(parents=True)
    benchmark.write_text(json.dumps({"device": "cpu (test)", "rows": [
        {"method": "floor", "seconds_per_step": 0.1}, {"method": "bcp", "seconds_per_step": 0.5}]}))
    # 2 epochs x 14 steps (900 // 64) x 0.5 s.
    assert "about 14 s of training steps (28 steps at 0.5 s each, measured by the benchmark on cpu (test)" \
        in stage_header(params, "train", "bcp", tmp_path, "cpu")
    assert "about 4 s of training steps (45 steps" in stage_header(params, "vanilla", None, tmp_path, "cpu")
    assert "certify 50 test images" in stage_header(params, "certify", "bcp", tmp_path, "cpu")
    assert "on the correctly classified test images" in stage_header(params, "pgd", "bcp", tmp_path, "cpu")
