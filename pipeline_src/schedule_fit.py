"""`python -m pipeline_src fit-epochs`: shrink a method's schedule to a time budget.

A lent GPU comes with minutes, not days. Given the seconds per epoch that the
benchmark measured for a method on this device, the largest epoch count whose
training fits the budget is written into the profile's params file, with the
warm-up, ramp and lr-step lengths scaled so that they keep their shares of the
paper schedule (the method's block in params.yaml). The profile file is edited
in place, line by line, so its comments stay; the run's metrics then record the
schedule that was used, and the edited file is what gets committed with them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .config import BASE_PARAMS, profile_override_path, read_base_params
from .paths import RunLayout

# Per-epoch work besides the timed training steps: the sound validation pass (guaranteed
# norms on the host, BCP on the validation split) and the checkpoint; measured ~1-2 s.
EPOCH_OVERHEAD_S = 2.5
# The benchmark extrapolates from a few steps; leave room for its error.
BENCHMARK_SLACK = 1.15
# One-off cost of `compile: true` (seen on an H100: ~45 s for BCP's two batch shapes).
COMPILE_S = 60.0


def _share(epochs: int, part: int, whole: int) -> int:
    return max(1, math.floor(epochs * part / whole + 0.5))


def scaled_schedule(paper: dict, epochs: int) -> dict[str, int]:
    """Warm-up, ramp and lr-step lengths of `epochs` with the paper block's shares."""
    whole = paper["epochs"]
    scaled = {"epochs": epochs,
              "warmup_epochs": _share(epochs, paper["warmup_epochs"], whole),
              "ramp_epochs": _share(epochs, paper["ramp_epochs"], whole),
              "step_epochs": _share(epochs, paper["lr_schedule"]["step_epochs"], whole)}
    if "delay_epochs" in paper["lr_schedule"]:
        scaled["delay_epochs"] = math.floor(epochs * paper["lr_schedule"]["delay_epochs"] / whole + 0.5)
    if scaled["warmup_epochs"] + scaled["ramp_epochs"] > epochs:
        raise ValueError(f"{epochs} epochs are too few for a warm-up and a ramp")
    return scaled


def affordable_epochs(seconds_per_epoch: float, budget_s: float, most: int) -> int:
    per_epoch = seconds_per_epoch * BENCHMARK_SLACK + EPOCH_OVERHEAD_S
    return max(0, min(most, math.floor(budget_s / per_epoch)))


def rewrite_block(text: str, block: str, values: dict[str, int]) -> str:
    """Set integer keys of a top-level block of a params file (`  key: N` lines, and
    keys inside an inline mapping such as `lr_schedule: {step_epochs: N}`)."""
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip() == f"{block}:")
    except StopIteration:
        raise ValueError(f"no top-level '{block}:' block to edit") from None
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and not lines[i].startswith((" ", "#"))), len(lines))
    missing = set(values)
    for i in range(start + 1, end):
        for key, value in values.items():
            pattern = re.compile(rf"(^  {key}:\s*|[{{,]\s*{key}:\s*)\d+")
            if pattern.search(lines[i]):
                lines[i] = pattern.sub(lambda m: f"{m.group(1)}{value}", lines[i], count=1)
                missing.discard(key)
    if missing:
        raise ValueError(f"block '{block}' has no integer line for {sorted(missing)}")
    return "".join(lines)


def fit_epochs(params: dict, root: Path, method: str, budget_s: float) -> dict[str, int]:
    """Write into the profile the schedule of `method` that fits `budget_s` seconds of
    training, from this run's benchmark; returns the schedule written."""
    profile_file = profile_override_path(params["profile"], root)
    if profile_file is None:
        raise ValueError(f"fit-epochs edits a profile's params file; '{params['profile']}' is "
                         f"{BASE_PARAMS} itself")
    layout = RunLayout.of(params)
    result_path = root / layout.benchmark_result(params["model"]["arch"])
    if not result_path.is_file():
        raise FileNotFoundError(f"{result_path}: run the benchmark first")
    rows = {row["method"]: row for row in json.loads(result_path.read_text())["rows"]}
    if method not in rows:
        raise ValueError(f"{result_path} has no row for '{method}' (rows: {', '.join(rows)})")
    # The profile's epochs are the most it may get (so a refit never lengthens a run).
    most = params[method]["epochs"]
    if params[method].get("compile"):
        budget_s -= COMPILE_S
    epochs = affordable_epochs(rows[method]["seconds_per_epoch"], budget_s, most)
    if epochs < 3:
        raise ValueError(f"{budget_s:.0f} s fit {epochs} epochs of {method} at "
                         f"{rows[method]['seconds_per_epoch']:.1f} s each: too few to train")
    schedule = scaled_schedule(read_base_params(root)[method], epochs)
    profile_file.write_text(rewrite_block(profile_file.read_text(), method, schedule))
    print(f"[fit-epochs] {method}: {rows[method]['seconds_per_epoch']:.2f} s per epoch measured, "
          f"{budget_s:.0f} s -> {schedule} written to {profile_file}")
    return schedule
