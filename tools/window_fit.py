"""Size a GPU window's schedules: every method's epochs for one command of BUDGET seconds
from the first stage to REPORT.md, with the certified runs sharing the card.

From the benchmark of this profile's run (results/<run>/benchmark/benchmark_<arch>.json:
seconds per epoch of every method alone, and with `benchmark.concurrency` the slowdown
of k BCP trainings at once):

    python tools/window_fit.py --profile window --seconds 540 [--write]

Without a GPU measurement, from assumed numbers (the committed estimate of
config/window/params.yaml was made so; see its header):

    python tools/window_fit.py --profile window --seconds 540 \
        --assume floor=0.94 lmt=1.68 bcp=3.81 localbcp=8.80 duet=17.68 --slowdown 6=1.5

`--write` puts the schedules into the profile's params file (comments kept); without
it the plan is only printed. LMT, BCP and the Duet runs share one schedule (Duet is
paired with BCP), LocalBCP has its own; each keeps its paper schedule's shape.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_src.config import load_params  # noqa: E402
from pipeline_src.runs import method_runs  # noqa: E402
from pipeline_src.paths import RunLayout  # noqa: E402
from pipeline_src.schedule_fit import (WINDOW_COSTS, benchmark_row, concurrency_slowdown,  # noqa: E402
                                       window_plan, write_window_plan)


def measured_seconds(params: dict, root: Path) -> tuple[dict[str, float], dict]:
    """Seconds per epoch alone of the floor and of every run group and method, from the
    profile's benchmark result (compiled rows where the block compiles)."""
    path = root / RunLayout.of(params).benchmark_result(params["model"]["arch"])
    if not path.is_file():
        raise SystemExit(f"{path}: no benchmark; run `python -m pipeline_src benchmark --profile "
                         f"{params['profile']}` on the GPU first, or give --assume")
    result = json.loads(path.read_text())
    seconds = {"floor": benchmark_row(result, "floor", False)["seconds_per_epoch"]}
    names = {run.group: run.method for run in method_runs(params).values()}
    names.update({m: m for m in params["methods"]})
    for name, method in names.items():
        row = benchmark_row(result, name, bool(params[method].get("compile")))
        if row is not None:
            seconds[name] = row["seconds_per_epoch"]
    return seconds, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="window")
    parser.add_argument("--seconds", type=float, required=True, help="the window: first stage to REPORT.md")
    parser.add_argument("--assume", nargs="+", default=None, metavar="NAME=S",
                        help="seconds per epoch alone instead of the benchmark's (floor, methods, runs)")
    parser.add_argument("--slowdown", nargs="+", default=None, metavar="K=X",
                        help="with --assume: each of K jobs sharing the card runs X times slower than alone")
    for key, value in WINDOW_COSTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=float, default=value, help=f"default {value:g}")
    parser.add_argument("--write", action="store_true", help="write the schedules into the profile")
    args = parser.parse_args(argv)

    params = load_params(args.profile, ROOT)
    if args.assume:
        seconds = {k: float(v) for k, v in (item.split("=", 1) for item in args.assume)}
        rows = [{"jobs": int(k), "slowdown_each": float(x)} for k, x in (i.split("=", 1) for i in args.slowdown or [])]
        result, source = {"concurrency": {"rows": rows}}, "assumed (--assume, --slowdown)"
    else:
        seconds, result = measured_seconds(params, ROOT)
        source = f"benchmark on {result['device']} (torch {result['torch']}, {result['git_commit']})"
    costs = {key: getattr(args, key) for key in WINDOW_COSTS}
    plan = window_plan(params, seconds, args.seconds, lambda k: concurrency_slowdown(result, k), costs, ROOT)
    plan["seconds_per_epoch_alone"], plan["source"] = seconds, source
    print(json.dumps(plan, indent=1))
    for name, family in plan["families"].items():
        print(f"[window-fit] {name}: {family['epochs']} epochs at {family['seconds_per_epoch_shared']:.1f} s "
              f"each (x{plan['slowdown_each']:.2f}, {plan['jobs_sharing_the_card']} jobs on the card), "
              f"training from {family['starts_at_s']:.0f} s for {family['training_s']:.0f} s", file=sys.stderr)
    if args.write:
        print(f"[window-fit] wrote {write_window_plan(params, ROOT, plan)}", file=sys.stderr)
    return plan


if __name__ == "__main__":
    main()
