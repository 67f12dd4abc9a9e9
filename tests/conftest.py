"""Shared fixtures: the project root, a throw-away copy of the project for the
runner tests, and an environment whose PATH finds this interpreter's tools."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_JPEG_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def tool_env() -> dict[str, str]:
    """Environment in which `python`, `snakemake` and `dvc` are this venv's."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def project_files(root: Path) -> list[str]:
    """What a clean clone holds: tracked files plus untracked, non-ignored ones."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_project(dest: Path) -> Path:
    for name in project_files(ROOT):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    # DVC wants an SCM; a commit also gives the outputs a code version to record.
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                 "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 1800) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return copy_project(tmp_path / "project")


# ---------------------------------------------------------------- test tiers
# `e2e`: runs the pipeline through Snakemake or DVC in a copy of the project (minutes each).
# `slow`: a test that trains for real, measured at 5 s or more on two idle cores
# (pytest --durations, 2026-12-01). The quick tier is `-m "not e2e and not slow"`
# (about 2.5 minutes on two cores); CI runs every test.
E2E_TESTS = {"tests/test_window.py::test_two_windows_add_a_seed_without_retraining",
             "tests/test_runners.py::test_dvc_then_snakemake_then_dvc_share_results_and_bits",
             "tests/test_runners.py::test_bad_params_value_leaves_every_output_in_place",
             "tests/test_runners.py::test_data_stage_reruns_when_its_archive_is_replaced",
             "tests/test_runners.py::test_a_missing_intermediate_output_is_rebuilt",
             "tests/test_runners.py::test_a_failed_run_says_how_to_recover"}
SLOW_TESTS = {
    "tests/test_duet_local.py::test_lambda_zero_is_localbcp_bit_for_bit",
    "tests/test_duet_local.py::test_duet_local_and_localbcp_start_from_the_same_weights_and_batches",
    "tests/test_training.py::test_certified_run_resumes_to_the_same_weights",
    "tests/test_duet.py::test_training_stays_finite",
    "tests/test_duet.py::test_lambda_zero_is_bcp_bit_for_bit",
    "tests/test_duet.py::test_vanilla_init_starts_from_the_vanilla_models_initial_weights",
    "tests/test_duet.py::test_duet_and_bcp_start_from_the_same_weights_and_batches",
    "tests/test_window.py::test_concurrency_benchmark_plumbing_on_cpu",
    "tests/test_data.py::test_shared_jpeg_archive",
    "tests/test_benchmark.py::test_benchmark_depth_times_every_method_at_every_architecture",
    "tests/test_vanilla_checks.py::test_vanilla_stage_reports_the_subset_and_stops_below_the_threshold",
    # Plain commands in a copy of the project (about 2 CPU-minutes in all).
    "tests/test_reliability.py::test_bad_params_values_give_one_line_errors_and_lose_nothing",
    "tests/test_reliability.py::test_open_bad_params_values",
    "tests/test_reliability.py::test_bad_data_inputs_give_one_line_errors_and_leave_no_stale_cache",
    "tests/test_reliability.py::test_kills_at_random_points_resume_to_the_same_weights",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the pipeline through Snakemake or DVC (minutes)")
    config.addinivalue_line("markers", "slow: trains for real (5 s or more on two cores)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        test_id = item.nodeid.split("[")[0]
        if item.nodeid.startswith("tests/test_e2e.py") or test_id in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)
        elif test_id in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def save_cut_cache(cache: dict, path: Path, data_params: dict) -> None:
    """Write a test's cut of a data cache (a few images of the sample, or synthetic ones)
    where a stage reads it, stamped as built from `data_params`: the stages refuse a
    cache whose recorded data params differ from the run's (data.cifar.load_cache)."""
    import torch

    from pipeline_src.data.cifar import data_fingerprint

    provenance = {**cache.get("provenance", {}), "data_params": dict(data_params),
                  "params_fingerprint": data_fingerprint(data_params)}
    provenance.pop("source_bytes", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**cache, "provenance": provenance}, path)
