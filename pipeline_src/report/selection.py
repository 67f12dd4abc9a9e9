"""Settings chosen on the validation split, never on the test set (issue 22).

A guided method often runs at several settings in one profile (Duet's readings,
the distillation weight β): rows of the same method that train with the guide.
REPORT.md names the one a user should take, by a rule stated beside it and
computed from the validation accuracies at each run's selected epoch (the
validation split is drawn from the training images: `data.val_size`):

  among the rows whose mean validation certified accuracy is at most
  CERTIFIED_TOLERANCE points below their paired row's (BCP for Duet; the
  method's own run for a variant of a method without a partner), the one with
  the highest mean validation clean accuracy; when no row is that close, the
  one with the highest validation certified accuracy.

That is issue 22's target (certified accuracy no more than 0.5 points below
BCP's, clean accuracy as high as possible) read on the validation split. The
no-guide controls (`runs.is_no_guide_control`) and the points of a method's own
frontier (κ_final, ε_train moved: `figures.frontier_groups`) are never candidates."""
from __future__ import annotations

import math

from ..runs import METHOD_FACTS, is_no_guide_control, method_runs, trains_with_guide
from .collect import ReportInputs, RunResult
from .figures import frontier_groups
from .tables import fmt, fmt_signed, paired_group, summary

# Issue 22: "certified accuracy no more than 0.5 points below BCP's".
CERTIFIED_TOLERANCE = 0.5


def validation_accuracies(run: RunResult) -> tuple[float, float]:
    """(clean, certified) validation accuracy (%) at the run's selected epoch."""
    epoch = run.train["selected_epoch"]
    rows = run.history[run.history["epoch"] == epoch]
    if rows.empty:
        return math.nan, math.nan
    row = rows.iloc[0]
    return float(row["val_clean_accuracy"]), float(row["val_certified_accuracy"])


def candidate_groups(inputs: ReportInputs) -> dict[str, list[str]]:
    """{method: its rows that train with the guide}, for each method with two or more:
    no-guide controls, frontier points and rows without a paired row left out."""
    configured = method_runs(inputs.params)
    frontier_points = {group for members in frontier_groups(inputs).values() for group in members[1:]}
    families: dict[str, list[str]] = {}
    for group in inputs.groups:
        runs = inputs.of_group(group)
        planned = configured[runs[0].name]
        if (not trains_with_guide(planned) or is_no_guide_control(planned) or group in frontier_points
                or not paired_group(inputs, runs)):
            continue
        families.setdefault(runs[0].method, []).append(group)
    return {method: groups for method, groups in families.items() if len(groups) > 1}


def _means(runs: list[RunResult], seeds: set[int]) -> tuple[float, float]:
    values = [validation_accuracies(r) for r in runs if r.seed in seeds]
    return summary([v[0] for v in values])[0], summary([v[1] for v in values])[0]


def choose(rows: dict[str, tuple[float, float, float]]) -> tuple[str, bool]:
    """The rule of the module's docstring on {row: (val clean, val certified, paired row's val
    certified)}: (the chosen row, whether it is within the tolerance)."""
    close = {g: v for g, v in rows.items() if v[1] >= v[2] - CERTIFIED_TOLERANCE}
    if close:
        return max(close, key=lambda g: close[g][0]), True
    return max(rows, key=lambda g: rows[g][1]), False


def validation_choice(inputs: ReportInputs) -> list[str]:
    """REPORT.md's section: each guided method's rows on the validation split, and the one
    the rule chooses (empty when no method runs at several guided settings)."""
    families = candidate_groups(inputs)
    if not families:
        return []
    lines = ["## Settings chosen on the validation split", "",
             "Where a guided method runs at several settings, the setting to take is chosen on the validation "
             "split (drawn from the training images), never on the test set: among the rows whose mean "
             f"validation certified accuracy is at most {CERTIFIED_TOLERANCE:g} points below their paired row's, the "
             "one with the highest validation clean accuracy; when none is that close, the one with the highest "
             "validation certified accuracy. Validation accuracies (%) at each run's selected epoch, mean over the "
             "seeds the row and its paired row share; no-guide controls and frontier points are not candidates.",
             "", "| method | row | paired row | n | val clean | val certified | − paired val certified | chosen |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for method, groups in families.items():
        rows, shown = {}, []
        for group in groups:
            runs = inputs.of_group(group)
            paired = inputs.of_group(paired_group(inputs, runs))
            seeds = {r.seed for r in runs} & {r.seed for r in paired}
            clean, certified = _means(runs, seeds)
            _, paired_certified = _means(paired, seeds)
            if math.isfinite(clean) and math.isfinite(certified) and math.isfinite(paired_certified):
                rows[group] = (clean, certified, paired_certified)
            shown.append((group, runs[0].label, paired[0].label, len(seeds), clean, certified,
                          certified - paired_certified))
        chosen, close = choose(rows) if rows else (None, False)
        for group, label, paired_label, n, clean, certified, gap in shown:
            mark = ""
            if group == chosen:
                mark = "**chosen**" if close else f"**chosen** (none within {CERTIFIED_TOLERANCE:g} points)"
            lines.append(f"| {METHOD_FACTS[method].label} | {label} | {paired_label} | {n} | {fmt(clean, 1)} | "
                         f"{fmt(certified, 1)} | {fmt_signed(gap, 1)} | {mark} |")
    return lines + [""]
