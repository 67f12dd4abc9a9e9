"""fit-epochs: a method's schedule shrunk to a time budget, shares of the paper schedule kept,
written into the profile file without losing its comments."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline_src.config import load_params, read_base_params
from pipeline_src.paths import RunLayout
from pipeline_src.schedule_fit import (affordable_epochs, fit_epochs, rewrite_block, scaled_schedule)

ROOT = Path(__file__).resolve().parents[1]


def test_scaled_schedule_keeps_the_paper_shares():
    bcp = read_base_params(ROOT)["bcp"]          # 200 epochs: 10 warm-up, 121 ramp, step 10
    assert scaled_schedule(bcp, 200) == {"epochs": 200, "warmup_epochs": 10, "ramp_epochs": 121,
                                         "step_epochs": 10}
    assert scaled_schedule(bcp, 30) == {"epochs": 30, "warmup_epochs": 2, "ramp_epochs": 18,
                                        "step_epochs": 2}
    assert scaled_schedule(bcp, 5) == {"epochs": 5, "warmup_epochs": 1, "ramp_epochs": 3,
                                       "step_epochs": 1}
    with pytest.raises(ValueError, match="too few"):
        scaled_schedule(bcp, 1)
    # LocalBCP's lr hold after the ramp (5 of 800 epochs) scales too.
    local = read_base_params(ROOT)["localbcp"]
    assert scaled_schedule(local, 400)["delay_epochs"] == 3 and scaled_schedule(local, 40)["delay_epochs"] == 0


def test_affordable_epochs_counts_the_overhead_and_caps_at_the_profile():
    assert affordable_epochs(4.0, 300.0, 30) == 30
    # 10 s measured -> 10 * 1.15 + 2.5 = 14 s an epoch -> 21 epochs in 300 s.
    assert affordable_epochs(10.0, 300.0, 30) == 21
    assert affordable_epochs(10.0, 5.0, 30) == 0


def test_rewrite_block_edits_one_block_and_keeps_the_rest():
    text = ("# a comment\nlmt:\n  epochs: 30\n  warmup_epochs: 2\nbcp:\n  epochs: 30   # kept comment\n"
            "  warmup_epochs: 2\n  ramp_epochs: 18\n  lr_schedule: {kind: step, step_epochs: 2, gamma: 0.5}\n"
            "certify:\n  batch_size: 1000\n")
    out = rewrite_block(text, "bcp", {"epochs": 12, "warmup_epochs": 1, "ramp_epochs": 7, "step_epochs": 1})
    assert "lmt:\n  epochs: 30\n  warmup_epochs: 2\n" in out          # other blocks untouched
    assert "  epochs: 12   # kept comment\n" in out
    assert "{kind: step, step_epochs: 1, gamma: 0.5}" in out
    parsed = yaml.safe_load(out)
    assert parsed["bcp"]["ramp_epochs"] == 7 and parsed["certify"] == {"batch_size": 1000}
    with pytest.raises(ValueError, match="no integer line"):
        rewrite_block(text, "lmt", {"ramp_epochs": 3})
    with pytest.raises(ValueError, match="no top-level 'duet:'"):
        rewrite_block(text, "duet", {"epochs": 3})


def test_fit_epochs_writes_the_profile_from_the_benchmark(tmp_path: Path):
    for path in ("params.yaml", "workflow/schemas/params.schema.yaml", "config/gpu_bcp/params.yaml"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    params = load_params("gpu_bcp", tmp_path)
    result = tmp_path / RunLayout.of(params).benchmark_result("6C2F")
    with pytest.raises(FileNotFoundError, match="run the benchmark first"):
        fit_epochs(params, tmp_path, "bcp", 300)
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps({"rows": [{"method": "floor", "seconds_per_epoch": 1.0},
                                           {"method": "bcp", "seconds_per_epoch": 10.0}]}))
    assert fit_epochs(params, tmp_path, "bcp", 300) == {"epochs": 21, "warmup_epochs": 1,
                                                        "ramp_epochs": 13, "step_epochs": 1}
    fitted = load_params("gpu_bcp", tmp_path)       # still valid against the schema
    assert (fitted["bcp"]["epochs"], fitted["bcp"]["warmup_epochs"], fitted["bcp"]["ramp_epochs"],
            fitted["bcp"]["lr_schedule"]["step_epochs"]) == (21, 1, 13, 1)
    assert "# GPU profile" in (tmp_path / "config/gpu_bcp/params.yaml").read_text()
    # A compiled run pays its compilation once: fewer epochs in the same budget.
    compiled = {**fitted, "bcp": {**fitted["bcp"], "compile": True, "epochs": 30}}
    assert fit_epochs(compiled, tmp_path, "bcp", 300)["epochs"] == 17      # (300 - 60) // 14
    with pytest.raises(ValueError, match="too few to train"):
        fit_epochs(fitted, tmp_path, "bcp", 20)
    with pytest.raises(ValueError, match="no row for 'lmt'"):
        fit_epochs(fitted, tmp_path, "lmt", 300)
