"""The committed results of the CPU campaign (results/cpu/) are what the code and the
metrics files say: every seed whose runs are all committed passes the report's checks
(the params of each run, one guide, the same code in every stage across seeds, no
certified point broken by the attack), and the committed Table 2 holds the numbers the
report stage computes from those files today."""
from __future__ import annotations

import math
import subprocess

import pandas as pd
import pytest

from conftest import ROOT
from pipeline_src.config import load_params
from pipeline_src.runs import committed_seeds, method_runs, trains_with_guide
from pipeline_src.paths import RunLayout
from pipeline_src.report.collect import collect
from pipeline_src.report.tables import table2

PROFILE = "cpu"


def committed_seeds_params(profile: str) -> dict:
    """The profile's params with `seeds` cut to the seeds whose every run is committed:
    the seeds the committed tables were made from (`--committed-seeds` of the report stages)."""
    params = load_params(profile)
    params["seeds"] = committed_seeds(params)
    return params


def shallow_clone() -> bool:
    """Whether this checkout lacks history (the seeds' commits may then be missing)."""
    done = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    return done.returncode != 0 or done.stdout.strip() != "false"


@pytest.fixture(scope="module")
def inputs():
    params = committed_seeds_params(PROFILE)
    if not params["seeds"]:
        pytest.skip(f"no seed of profile {PROFILE} is committed in full")
    if len(params["seeds"]) > 1 and shallow_clone():
        pytest.skip("a shallow clone (or no git): the seeds' commits cannot be compared here")
    return collect(params, ROOT)   # raises on any stale, mismatched, mixed or broken run


def test_every_committed_seed_passes_the_reports_checks(inputs):
    assert inputs.seeds and all(run.attack["certified_points_broken"] == 0 for run in inputs.runs)
    compared = {run.similarity["vanilla_weights_sha256"] for run in inputs.runs if run not in inputs.other_guide_runs}
    assert compared == {inputs.vanilla["weights_sha256"]}
    assert not any(trains_with_guide(method_runs(inputs.params)[run.name]) for run in inputs.other_guide_runs)


def test_committed_table2_holds_the_numbers_of_the_committed_metrics(inputs):
    committed = pd.read_csv(ROOT / RunLayout.of(inputs.params).table(2, "csv")).set_index("run_group")
    fresh = table2(inputs).data.set_index("run_group")
    assert sorted(committed.index) == sorted(fresh.index)
    for group in fresh.index:
        for column in ("n", "clean_mean", "pgd_mean", "certified_mean", "certified_paired_diff_mean"):
            if column not in fresh.columns:
                continue
            want, got = fresh.loc[group, column], committed.loc[group, column]
            assert (math.isnan(want) and math.isnan(got)) or want == pytest.approx(got), (group, column)
