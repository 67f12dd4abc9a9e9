"""Copy finished runs of a campaign clone into this checkout's committed results.

    python tools/campaign_harvest.py --clone /path/to/campaign_clone --profile cpu RUN [RUN ...] [--controls]

A campaign trains in a clone at the campaign's code (results/cpu/README.md); its
finished runs are committed here, without weights. For each RUN this copies the
metrics files and history of its four stages, its benchmark files and logs (the
clone's absolute path stripped from the logs: tests/test_no_machine_paths.py), and
adds RUN to `committed_runs` in config/<profile>/params.yaml; `--controls` copies
Table 1's control rows too. It refuses a run whose chain is unfinished, one with a
certified point the attack broke, and one compared with a guide other than the one
pinned by results/<profile>/vanilla/metrics.json. It prints one line per run for the results'
README (accuracies, selection, certified points, the paired differences where the paired run of
the same seed is committed), then the `git add -f` to run next (results/ is git-ignored); it
leaves `export-dvc` and the README's list to you.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_src.config import load_params  # noqa: E402  (the project on sys.path first)
from pipeline_src.paths import RunLayout, committed_run_files, run_stages  # noqa: E402
from pipeline_src.runs import METHOD_FACTS, SIMILARITY_CONTROLS, method_runs, seed_run_name  # noqa: E402

def run_files(params: dict, run: str) -> list[str]:
    """The committed files of one run (no weights), relative to the project root: its metrics and
    history, and each of its stages' benchmark file and log (`compose` too for a composed run)."""
    layout = RunLayout.of(params)
    stages = run_stages(params, run)
    return (committed_run_files(params, run) + [layout.benchmark(f"{stage}_{run}") for stage in stages]
            + [layout.log(f"{stage}_{run}") for stage in stages])


def control_files(layout: RunLayout) -> list[str]:
    """Table 1's control rows: their similarity files, the control vanilla model's metrics."""
    files = [layout.similarity_control(control) for control in SIMILARITY_CONTROLS]
    files += [layout.vanilla_control(name) for name in ("metrics.json", "history.csv")]
    files += [path for stage in ("vanilla_control", "similarity_control")
              for path in (layout.benchmark(stage), layout.log(stage))]
    return files


def check_run(clone: Path, params: dict, run: str, guide_sha: str) -> None:
    """Refuse an unfinished, broken or other-guide run (SystemExit with the reason)."""
    layout = RunLayout.of(params)
    missing = [f for f in run_files(params, run) if not (clone / f).is_file()]
    if missing:
        raise SystemExit(f"{run}: unfinished in {clone} (missing {', '.join(missing)})")
    broken = {layout.attack(run, "metrics.json"):
              json.loads((clone / layout.attack(run, "metrics.json")).read_text())["certified_points_broken"]}
    if "compose" in run_stages(params, run):
        composed = json.loads((clone / layout.compose(run, "metrics.json")).read_text())
        broken[layout.compose(run, "metrics.json")] = composed["attack"]["certified_points_broken"]
    for path, count in broken.items():
        if count != 0:
            raise SystemExit(f"{run}: {count} certified points broken by the attack ({path})")
    compared = json.loads((clone / layout.similarity(run, "metrics.json")).read_text())
    if compared["vanilla_weights_sha256"] != guide_sha:
        raise SystemExit(f"{run}: compared with guide {compared['vanilla_weights_sha256']}, "
                         f"not the committed {guide_sha}")


def copy_stripped(source: Path, target: Path, clone: Path) -> None:
    """Copy a file; a log loses the clone's absolute path (no machine paths are committed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix == ".log":
        target.write_text(source.read_text().replace(f"{clone}/", ""))
    else:
        shutil.copyfile(source, target)


def _read(root: Path, layout: RunLayout, run: str) -> tuple[dict, dict] | None:
    """A run's certify and PGD metrics in `root`, None where they are not there."""
    certify, attack = root / layout.certify(run, "metrics.json"), root / layout.attack(run, "metrics.json")
    if not (certify.is_file() and attack.is_file()):
        return None
    return json.loads(certify.read_text()), json.loads(attack.read_text())


def _accuracies(certify: dict, attack: dict) -> tuple[float, float, float]:
    return certify["clean_accuracy"], attack["pgd_accuracy"], certify["headline_certified_accuracy"]


def summary(root: Path, layout: RunLayout, params: dict, run: str) -> str:
    """One line for the results' README: the run's accuracies, its selection, its certified
    points (all attacked, none broken: `check_run`) and, where this checkout holds the run it is
    paired with at the same seed (Duet with BCP), the paired differences."""
    planned = method_runs(params)[run]
    certify, attack = _read(root, layout, run)
    train = json.loads((root / layout.train(run, "metrics.json")).read_text())
    mine = _accuracies(certify, attack)
    line = ("{}: {:.2f} / {:.2f} / {:.2f} % clean / PGD / certified ".format(run, *mine)
            + f"({certify['headline_certifier']}), selected epoch {train['selected_epoch']} at "
            f"{train['val_certified_accuracy']:.1f} % validation certified, none of "
            f"{attack['certified_points']} certified points broken")
    base = METHOD_FACTS[planned.method].paired_with
    theirs = _read(root, layout, seed_run_name(base, planned.seed)) if base else None
    if theirs:
        line += "; against {}: {:+.2f} / {:+.2f} / {:+.2f}".format(
            seed_run_name(base, planned.seed), *(a - b for a, b in zip(mine, _accuracies(*theirs))))
    return line


def add_committed_runs(params_file: Path, runs: list[str]) -> None:
    """Append runs to the one-line `committed_runs: [...]` list, keeping the file's comments."""
    text = params_file.read_text()
    match = re.search(r"^committed_runs: \[(.*)\]$", text, flags=re.M)
    if not match:
        raise SystemExit(f"{params_file}: no one-line `committed_runs: [...]` to extend")
    have = [name.strip() for name in match.group(1).split(",") if name.strip()]
    names = have + [run for run in runs if run not in have]
    params_file.write_text(text[:match.start()] + f"committed_runs: [{', '.join(names)}]" + text[match.end():])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clone", type=Path, required=True, help="the campaign clone's project root")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--controls", action="store_true", help="also copy Table 1's control rows")
    parser.add_argument("runs", nargs="*")
    args = parser.parse_args(argv)
    clone = args.clone.resolve()
    params = load_params(args.profile, ROOT)
    layout = RunLayout.of(params)
    unknown = [run for run in args.runs if run not in method_runs(params)]
    if unknown:
        raise SystemExit(f"not runs of profile {args.profile}: {', '.join(unknown)}")
    guide_sha = json.loads((ROOT / layout.vanilla_metrics).read_text())["weights_sha256"]
    for run in args.runs:
        check_run(clone, params, run, guide_sha)
    files = [f for run in args.runs for f in run_files(params, run)]
    if args.controls:
        files += control_files(layout)
    for name in files:
        copy_stripped(clone / name, ROOT / name, clone)
    if args.runs:
        add_committed_runs(ROOT / "config" / args.profile / "params.yaml", args.runs)
    for run in args.runs:
        print(summary(ROOT, layout, params, run))
    print(f"copied {len(files)} files; next: git add -f {' '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
