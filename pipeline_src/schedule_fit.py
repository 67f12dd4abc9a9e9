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
from .runs import runs_to_train, similarity_settings

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


def benchmark_row(result: dict, name: str, compiled: bool) -> dict | None:
    """A method's (or run's) row of a benchmark result: the compiled one (`bcp+compile`)
    when its block compiles and the benchmark has it, else the plain one."""
    rows = {row["method"]: row for row in result["rows"]}
    return (rows.get(f"{name}+compile") if compiled else None) or rows.get(name)


def concurrency_slowdown(result: dict, jobs: int) -> float:
    """How many times longer each of `jobs` trainings sharing the device takes than one
    alone, from the benchmark's concurrency rows (benchmark.concurrency): linear between
    the measured counts; past the largest, the aggregate images per second stays at its
    last value (the slowdown grows in proportion). Without a measurement: `jobs` (as if
    the jobs ran one after another: the safe side)."""
    if jobs <= 1:
        return 1.0
    rows = sorted((result.get("concurrency") or {}).get("rows", []), key=lambda row: row["jobs"])
    if not rows:
        return float(jobs)
    points = [(1, 1.0)] + [(row["jobs"], row["slowdown_each"]) for row in rows if row["jobs"] > 1]
    for (k0, s0), (k1, s1) in zip(points, points[1:]):
        if k0 <= jobs <= k1:
            return s0 + (s1 - s0) * (jobs - k0) / (k1 - k0)
    k_last, s_last = points[-1]
    return s_last * jobs / k_last


def fit_epochs(params: dict, root: Path, method: str, budget_s: float, concurrent_jobs: int = 1) -> dict[str, int]:
    """Write into the profile the schedule of `method` that fits `budget_s` seconds of
    training, from this run's benchmark; returns the schedule written. With
    `concurrent_jobs` > 1 the method trains beside that many others on the device, each
    epoch `concurrency_slowdown` times longer than the benchmark's row alone."""
    profile_file = profile_override_path(params["profile"], root)
    if profile_file is None:
        raise ValueError(f"fit-epochs edits a profile's params file; '{params['profile']}' is "
                         f"{BASE_PARAMS} itself")
    layout = RunLayout.of(params)
    result_path = root / layout.benchmark_result(params["model"]["arch"])
    if not result_path.is_file():
        raise FileNotFoundError(f"{result_path}: run the benchmark first")
    result = json.loads(result_path.read_text())
    row = benchmark_row(result, method, bool(params[method].get("compile")))
    if row is None:
        raise ValueError(f"{result_path} has no row for '{method}' "
                         f"(rows: {', '.join(r['method'] for r in result['rows'])})")
    # The profile's epochs are the most it may get (so a refit never lengthens a run).
    most = params[method]["epochs"]
    if params[method].get("compile"):
        budget_s -= COMPILE_S
    slowdown = concurrency_slowdown(result, concurrent_jobs)
    epochs = affordable_epochs(row["seconds_per_epoch"] * slowdown, budget_s, most)
    if epochs < 3:
        raise ValueError(f"{budget_s:.0f} s fit {epochs} epochs of {method} at "
                         f"{row['seconds_per_epoch']:.1f} s each: too few to train")
    schedule = scaled_schedule(read_base_params(root)[method], epochs)
    profile_file.write_text(rewrite_block(profile_file.read_text(), method, schedule))
    print(f"[fit-epochs] {method}: {row['seconds_per_epoch']:.2f} s per epoch measured"
          f"{f' (x{slowdown:.2f} beside {concurrent_jobs - 1} other jobs)' if concurrent_jobs > 1 else ''}, "
          f"{budget_s:.0f} s -> {schedule} written to {profile_file.relative_to(root).as_posix()}")
    return schedule


# ------------------------------------------------------------------ the GPU window
# One command runs a profile's whole DAG with the certified runs sharing the card
# (tools/gpu_window.sh): data -> vanilla -> SVD -> Duet is the critical path; LMT,
# BCP and LocalBCP start as soon as the data is there. The seconds below are the
# stages around the training, estimated (not measured on a GPU yet); the window's
# own log (results/<run>/WINDOW.md) records what they took.
WINDOW_COSTS = {
    "start_s": 30.0,    # wheels installed, Snakemake builds the DAG, first imports
    "data_s": 45.0,     # decoding the JPEG archive (60,000 images, one core)
    "svd_s": 15.0,      # the SVD export of the vanilla model
    "eval_s": 120.0,    # certify (float64, 10,000 test images), PGD + APGD, similarity of the last run
    "report_s": 45.0,   # tables, figures, REPORT.md
}
# A vanilla epoch against the benchmark's floor row (same network, batch, plain cross-entropy)
# plus its validation pass: measured 1.1-1.2 s beside a 0.94-1.26 s floor on H100s.
VANILLA_OVER_FLOOR = 1.25
# LocalBCP writes its per-example vector cache (~10 GB in float16 for CIFAR-10) into every
# epoch's checkpoint: an assumed cost per epoch, not measured.
LOCALBCP_CHECKPOINT_S = 10.0
# The runs that share one schedule: Duet is paired with BCP (same epochs, same batches per
# seed) and LMT follows BCP's schedule in the papers.
BCP_FAMILY = ("lmt", "bcp", "duet")


def window_plan(params: dict, seconds_per_epoch: dict[str, float], budget_s: float,
                slowdown_at, costs: dict | None = None, root: Path | None = None) -> dict:
    """Epochs of each method's schedule for one window of `budget_s` seconds, from first
    stage to REPORT.md. `seconds_per_epoch`: each training run's seconds per epoch alone
    (run names or methods; `floor` for the vanilla model), `slowdown_at(k)`: how much longer
    each of k jobs sharing the card takes (concurrency_slowdown). LMT, BCP and every Duet
    run share one schedule, sized for the Duet runs, which start last (after the vanilla
    model and the SVD); LocalBCP gets its own, from the end of the data stage."""
    costs = {**WINDOW_COSTS, **(costs or {})}
    runs = runs_to_train(params)
    methods = {run.method for run in runs.values()}
    jobs = len(runs) + (1 if similarity_settings(params)["controls"] else 0)
    slowdown = slowdown_at(jobs)
    vanilla_s = params["vanilla"]["epochs"] * seconds_per_epoch["floor"] * VANILLA_OVER_FLOOR * slowdown
    ready = costs["start_s"] + costs["data_s"]
    tail = costs["eval_s"] + costs["report_s"]
    base = read_base_params(root) if root is not None else read_base_params()
    plan = {"budget_s": budget_s, "jobs_sharing_the_card": jobs, "slowdown_each": slowdown,
            "vanilla_s": vanilla_s, "costs": costs, "families": {}}

    def per_epoch(name: str, method: str) -> float:
        alone = seconds_per_epoch.get(name, seconds_per_epoch.get(method))
        if alone is None:
            raise ValueError(f"window plan: no seconds per epoch for run '{name}' (method {method})")
        extra = LOCALBCP_CHECKPOINT_S if method == "localbcp" and params[method].get("vector_cache") else 0.0
        return alone * slowdown * BENCHMARK_SLACK + EPOCH_OVERHEAD_S + extra

    family = sorted(m for m in methods if m in BCP_FAMILY)
    for name, members, start in (("bcp family", family,
                                  ready + (vanilla_s + costs["svd_s"] if "duet" in methods else 0.0)),
                                 ("localbcp", sorted(methods & {"localbcp"}), ready)):
        if not members:
            continue
        slowest = max(per_epoch(run.group, run.method) for run in runs.values() if run.method in members)
        compiled = any(params[m].get("compile") for m in members)
        train_s = budget_s - start - tail - (COMPILE_S if compiled else 0.0)
        epochs = min(base[members[0]]["epochs"], max(0, math.floor(train_s / slowest)))
        plan["families"][name] = {"methods": members, "starts_at_s": start, "training_s": train_s,
                                  "seconds_per_epoch_shared": slowest, "epochs": epochs,
                                  "schedules": {m: scaled_schedule(base[m], epochs) for m in members}
                                  if epochs >= 3 else None}
    return plan


def write_window_plan(params: dict, root: Path, plan: dict) -> Path:
    """Write a window plan's schedules into the profile's params file (comments kept)."""
    profile_file = profile_override_path(params["profile"], root)
    if profile_file is None:
        raise ValueError("the window plan edits a profile's params file, not params.yaml")
    text = profile_file.read_text()
    for name, family in plan["families"].items():
        if family["schedules"] is None:
            raise ValueError(f"window plan: {family['training_s']:.0f} s fit {family['epochs']} epochs of "
                             f"{name}: too few to train")
        for method, schedule in family["schedules"].items():
            text = rewrite_block(text, method, schedule)
    profile_file.write_text(text)
    return profile_file
