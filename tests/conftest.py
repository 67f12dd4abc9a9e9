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
    # A stage's OpenMP threads wait for work asleep, not spinning: beside a busy pytest-xdist
    # worker, spinning threads of two cores' stages slowed them threefold (measured). The
    # stage's thread count, and so its bits, stay its params'.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def project_files(root: Path) -> list[str]:
    """What a clean clone holds: tracked files plus untracked, non-ignored ones."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=root, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


# A stage that a test starts runs on one thread: the suite runs two pytest-xdist workers
# on two cores, one core each, and the smoke profile's two threads per stage beside the
# other worker's test oversubscribed the machine (tests on one thread took twice as long
# beside them; measured with tests/durations.json). The runner tests compare bits within
# a copy, so any fixed count serves; tests/test_runners.py checks that a stage sets its
# own whatever the environment asks.
TEST_STAGE_THREADS = 1


def copy_project(dest: Path) -> Path:
    """A copy of the project as a clean clone holds it (its own git repository), the
    smoke profile's stages on TEST_STAGE_THREADS threads."""
    for name in project_files(ROOT):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    smoke = dest / "config/smoke/params.yaml"
    text = smoke.read_text()
    assert "  cpu_threads: 2 " in text, "the smoke profile's thread count moved: update tests/conftest.py"
    smoke.write_text(text.replace("  cpu_threads: 2 ", f"  cpu_threads: {TEST_STAGE_THREADS} ", 1))
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


# ---------------------------------------------------------------- the shared smoke build
SMOKE_BUILD = ["snakemake", "--cores", "1", "all", "--config", "profile=smoke"]


def _shared_temp(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the base temp itself
    without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory) -> Path:
    """The whole smoke DAG built once per test session under Snakemake, as the README runs it
    (on one thread per stage, TEST_STAGE_THREADS), in a copy of the project, for every runner
    test that reads it. Built by the first
    worker that asks (a file lock keeps the other waiting); a failed build is failed
    again, with its message, for every later test instead of being retried. Read it,
    never change it: a test that changes files takes `smoke_copy`."""
    from filelock import FileLock

    shared = _shared_temp(tmp_path_factory) / "smoke_build"
    shared.mkdir(exist_ok=True)
    project, outcome = shared / "project", shared / "outcome.txt"
    with FileLock(str(shared / "lock")):
        if not outcome.exists():
            try:
                copy_project(project)
                run(SMOKE_BUILD, project)
            except BaseException as err:
                outcome.write_text(f"failed: {err}")
                raise
            outcome.write_text("built")
    if outcome.read_text() != "built":
        raise AssertionError(f"the shared smoke build {outcome.read_text()}")
    return project


@pytest.fixture
def smoke_copy(smoke_build: Path, tmp_path: Path) -> Path:
    """A copy of the shared smoke build (outputs, Snakemake and DVC state, git) that a
    test may change; modification times are kept, so Snakemake sees what it built."""
    dest = tmp_path / "project"
    shutil.copytree(smoke_build, dest, symlinks=True)
    return dest


# ---------------------------------------------------------------- test tiers
# `e2e`: runs the pipeline through Snakemake or DVC in a copy of the project.
# `slow`: 5 s or more in the recorded durations (tests/durations.json: every test's
# seconds in a clean clone's run of the whole suite; `python tools/record_durations.py`
# rewrites it). The quick tier is `-m "not e2e and not slow"`; CI runs every test.
SLOW_SECONDS = 5.0
DURATIONS = ROOT / "tests" / "durations.json"
E2E_TESTS = {"tests/test_window.py::test_two_windows_add_a_seed_without_retraining",
             "tests/test_runners.py::test_dvc_then_snakemake_then_dvc_share_results_and_bits",
             "tests/test_runners.py::test_bad_params_value_leaves_every_output_in_place",
             "tests/test_runners.py::test_data_stage_reruns_when_its_archive_is_replaced",
             "tests/test_runners.py::test_a_missing_intermediate_output_is_rebuilt",
             "tests/test_runners.py::test_a_failed_run_says_how_to_recover",
             "tests/test_campaign_harvest.py::test_campaign_run_trains_against_the_committed_guide_without_retraining_it"}


def recorded_durations() -> dict[str, float]:
    """{test node id: seconds} of the committed record (setup + call + teardown)."""
    import json

    return json.loads(DURATIONS.read_text())["seconds"] if DURATIONS.is_file() else {}


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: runs the pipeline through Snakemake or DVC (minutes)")
    config.addinivalue_line("markers", f"slow: {SLOW_SECONDS:g} s or more in tests/durations.json")
    # One torch thread per pytest-xdist worker: two workers on two cores, each with
    # torch's default of one thread per core, spin against each other.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


NUMERICS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_DETERMINISTIC")


@pytest.fixture(autouse=True)
def process_numerics_restored():
    """What a test changes of the process's numerics is put back after it: a test that runs
    a stage in-process (cli.main sets run.cpu_threads torch threads, deterministic
    algorithms, OMP_NUM_THREADS) once left its pytest-xdist worker on two threads, beside
    the other worker on two cores, and the tests after it ran 3-6 times slower."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    env = {name: os.environ.get(name) for name in NUMERICS_ENV}
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != (
            deterministic, warn_only):
        torch._C._set_deterministic_algorithms(deterministic, warn_only=warn_only)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    durations = recorded_durations()
    for item in items:
        if item.nodeid.startswith("tests/test_e2e.py") or item.nodeid.split("[")[0] in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)
        elif durations.get(item.nodeid, 0.0) >= SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)
        if "smoke_build" in getattr(item, "fixturenames", ()):
            # One worker runs every test of the shared build, one after another.
            item.add_marker(pytest.mark.xdist_group("smoke_build"))


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
