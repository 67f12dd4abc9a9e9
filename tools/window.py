"""The bookkeeping of GPU windows (tools/gpu_window.sh): which seed a window trains,
and what a window did.

    python tools/window.py next-seed [--profile window]
        Mark every run whose metrics files are all present in results/<run>/ (train
        metrics and history, certify, pgd, similarity) as committed (`committed_runs`),
        and, when every run of every listed seed is, add the next seed to `seeds`. The
        profile's params file is edited in place (comments kept): after a window's
        results are unpacked here, it says what the next window trains.
    python tools/window.py record --out results/window/WINDOW.md [--machine FILE] [--status N]
        [--started EPOCH] [--vanilla-before SHA]
        Write what a window did: machine, torch, code, data, schedules, which runs it
        trained and finished, each stage's wall seconds (Snakemake's benchmark files).
    python tools/window.py targets [--profile window]
        The files of the critical path (the Duet runs it trains), for --prioritize.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_src.config import load_params, profile_override_path  # noqa: E402
from pipeline_src.runs import method_runs, runs_to_train, seed_run_name  # noqa: E402
from pipeline_src.paths import RunLayout, committed_run_files  # noqa: E402


def complete_runs(params: dict, root: Path) -> list[str]:
    return [name for name in method_runs(params)
            if all((root / f).is_file() for f in committed_run_files(params, name))]


def _set_top_level(text: str, key: str, value: str) -> str:
    """Replace a top-level `key: ...` entry (its line, and a block list or mapping under it)
    by `key: value` on one line, or append one; everything else, comments too, stays."""
    pattern = re.compile(rf"^{key}:[^\n]*\n(?:(?:- |[ \t]+)[^\n]*\n)*", re.MULTILINE)
    line = f"{key}: {value}\n"
    if not text.endswith("\n"):
        text += "\n"
    return pattern.sub(lambda _: line, text, count=1) if pattern.search(text) else text + line


def next_seed(profile: str, root: Path = ROOT) -> dict:
    params = load_params(profile, root)
    if params.get("seeds") is None:
        raise SystemExit(f"profile {profile}: `seeds` must be a list for windows to add up")
    seeds = list(params["seeds"])
    complete = complete_runs(params, root)
    groups = {run.group for run in method_runs(params).values()}
    if all(seed_run_name(group, seed) in complete for group in groups for seed in seeds):
        seeds.append(max(seeds) + 1)
    path = profile_override_path(profile, root)
    text = _set_top_level(path.read_text(), "seeds", json.dumps(seeds).replace('"', ""))
    text = _set_top_level(text, "committed_runs", "[" + ", ".join(complete) + "]" if complete else "null")
    path.write_text(text)
    updated = load_params(profile, root)  # still valid, and the committed runs are runs of it
    todo = list(runs_to_train(updated))
    print(f"[window] seeds {seeds}; committed: {', '.join(complete) or 'none'}; "
          f"the next window trains: {', '.join(todo) or 'nothing'}")
    return {"seeds": seeds, "committed_runs": complete, "to_train": todo}


def targets(profile: str, root: Path = ROOT) -> list[str]:
    params = load_params(profile, root)
    layout = RunLayout.of(params)
    return [layout.similarity(name, "metrics.json") for name, run in runs_to_train(params).items()
            if run.method == "duet"]


def _stage_seconds(layout: RunLayout, root: Path) -> list[tuple[str, float]]:
    rows = []
    for path in sorted((root / layout.root / "benchmarks").glob("*.tsv")):
        with open(path) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"), None)
        if row and row.get("s"):
            rows.append((path.stem, float(row["s"])))
    return rows


def record(profile: str, out: Path, machine: str, status: int, started: float | None,
           vanilla_before: str | None, root: Path = ROOT) -> str:
    import os

    params = load_params(profile, root)
    layout = RunLayout.of(params)
    trained = list(runs_to_train(params))
    finished = [n for n in trained if all((root / f).is_file() for f in committed_run_files(params, n))]
    provenance_path = root / layout.data_provenance
    data = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    vanilla_path = root / layout.vanilla_metrics
    vanilla = json.loads(vanilla_path.read_text()) if vanilla_path.is_file() else {}
    lines = [f"# Window of profile `{profile}`", "",
             f"Written by tools/window.py at the end of `tools/gpu_window.sh` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             "| | |", "| --- | --- |",
             f"| machine | {machine or 'not recorded'} |",
             f"| code | `{os.environ.get('PIPELINE_GIT_COMMIT', 'unknown')}` |",
             f"| data | {data.get('source', '?')} `{params['data']['path']}`, sha256 `{data.get('sha256', '?')}`"
             f"{', lossy JPEG copy' if data.get('lossy_jpeg') else ''} |",
             f"| seeds shown | {params['seeds']} |",
             f"| runs trained here | {', '.join(trained) or 'none'} |",
             f"| finished | {', '.join(finished) or 'none'} |",
             f"| left unfinished | {', '.join(n for n in trained if n not in finished) or 'none'} |",
             f"| committed runs read | {', '.join(params.get('committed_runs') or []) or 'none'} |",
             f"| vanilla model | {vanilla.get('test_accuracy', float('nan')):.2f}% test, "
             f"{vanilla.get('epochs', '?')} epochs, sha256 `{vanilla.get('weights_sha256', '?')[:16]}`"
             + ("" if not vanilla_before else
                " (the same weights as the committed one)" if vanilla_before == vanilla.get("weights_sha256")
                else f" (DIFFERS from the committed `{vanilla_before[:16]}`: the committed runs' similarity "
                     "files were measured against another vanilla model; the report refuses them)") + " |",
             f"| Snakemake exit status | {status} |",
             f"| wall seconds, first stage to the end | "
             f"{'' if started is None else f'{time.time() - started:.0f}'} |", "",
             "## Schedules", "", "| method | epochs | warm-up | ramp | lr step / decay every | batch |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method in params["methods"]:
        cfg = params[method]
        lines.append(f"| {method} | {cfg['epochs']} | {cfg['warmup_epochs']} | {cfg['ramp_epochs']} | "
                     f"{cfg['lr_schedule']['step_epochs']} | {cfg['batch_size']} |")
    lines += ["", f"Vanilla: {params['vanilla']['epochs']} epochs, {params['vanilla']['optimizer']} "
                  f"lr {params['vanilla']['lr']:g}, {params['vanilla']['schedule']}.", "",
              "## Stages (wall seconds, Snakemake's benchmark files; jobs overlapped)", "",
              "| job | s |", "| --- | ---: |"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in _stage_seconds(layout, root)]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("next-seed", "record", "targets"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--profile", default="window")
        if name == "record":
            cmd.add_argument("--out", required=True)
            cmd.add_argument("--machine", default=None, help="a file with the machine's description")
            cmd.add_argument("--status", type=int, default=0)
            cmd.add_argument("--started", type=float, default=None)
            cmd.add_argument("--vanilla-before", default=None)
    args = parser.parse_args(argv)
    if args.command == "next-seed":
        next_seed(args.profile)
    elif args.command == "targets":
        print(" ".join(targets(args.profile)))
    else:
        machine = Path(args.machine).read_text().strip().replace("\n", "; ") if args.machine else ""
        record(args.profile, Path(args.out), machine, args.status, args.started, args.vanilla_before)


if __name__ == "__main__":
    main()
