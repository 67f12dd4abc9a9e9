"""REPORT.md: the run's tables and figures with its provenance, in one page.

Built from the tables the `tables` stage wrote (so the page shows exactly the
committed numbers) and the metrics files; the figures are linked."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import PAPER_PROFILE, PROJECT_ROOT, dvc_yaml_path
from ..io import git_commit, save_text
from ..paths import RunLayout
from ..runs import benchmark_archs, control_rank
from . import paper
from .benchmark_tables import depth_markdown_table, markdown_table
from .collect import INIT_LABELS, METHOD_LABELS, ReportInputs, collect
from .composition import composition_section
from .format import render_html
from .figures import FIGURES
from .selection import validation_choice
from .tables import (TABLE2_METRICS, TABLES, data_text, eps_text, fmt, paired_base, paired_differences, paired_verdict,
                     same_init_group, summary)

FIGURE_CAPTIONS = {
    "fig2_clean": "Figure 2 (the paper's): clean loss and clean accuracy per epoch, with the ε and κ schedules.",
    "fig3_certified": "Figure 3 (the paper's): certified (robust) loss and certified accuracy per epoch; "
                      "dashed: validation with the sound certifier.",
    "radius_curve": "Certified accuracy against the l2 radius (0 to 2ε), each method's own certifier.",
    "similarity_per_layer": "Rotation similarity of each layer to the vanilla model.",
    "tradeoff": "Clean against certified accuracy at ε, one point per row of Table 2 (mean ± one standard "
                "deviation over seeds), the vanilla model's clean accuracy as a line.",
}


# The paper's Table 1 ordering, highest first, and the measures compared with it.
PAPER_ORDER = ("duet", "localbcp", "bcp", "lmt")
MEASURE_NAMES = {
    "similarity": "plain cosine at r",
    "similarity_full_rank": "plain cosine at full rank",
    "matched_similarity": "channel-matched cosine at r",
    "matched_similarity_full_rank": "channel-matched cosine at full rank",
    "subspace_overlap": "subspace overlap at r",
    "matched_subspace_overlap": "channel-matched subspace overlap at r",
}
INITS = ("scratch", "vanilla_init")


def _group_means(inputs: ReportInputs, init: str) -> dict[str, dict[str, float]]:
    """{method: {measure: mean over seeds}} of the methods' own rows (no grid points) with this init."""
    out = {}
    for group in inputs.groups:
        runs = inputs.of_group(group)
        method = runs[0].method
        if not runs[0].base or runs[0].init_from != init or method in out:
            continue
        out[method] = {key: summary([r.similarity.get(f"{key}_mean", float("nan")) for r in runs])[0]
                       for key in MEASURE_NAMES}
    return out


def _chain(values: dict[str, float]) -> str:
    """`Duet 80.5 > BCP 55.5 = LMT 55.5`: the rows highest first."""
    ordered = sorted(values.items(), key=lambda item: -item[1])
    text = f"{METHOD_LABELS[ordered[0][0]]} {fmt(ordered[0][1], 1)}"
    for (_, before), (method, value) in zip(ordered, ordered[1:]):
        text += f" {'>' if before > value else '='} {METHOD_LABELS[method]} {fmt(value, 1)}"
    return text


def _control_ceiling(inputs: ReportInputs, key: str) -> float:
    """The highest control row's score for a measure (-inf without control rows)."""
    values = [m.get(f"{key}_mean", math.nan) for m in inputs.controls.values()]
    return max((v for v in values if math.isfinite(v)), default=-math.inf)


def _why_no_reading(inputs: ReportInputs, init_means: dict) -> str:
    """Why the ordering of Table 1's rows says nothing here ('' when it may): every row
    sits at or below an unrelated network's score (the control rows) for every measure."""
    if not inputs.controls:
        return ""
    above = any(max(values) > _control_ceiling(inputs, key)
                for means in init_means.values() for key in MEASURE_NAMES
                for values in [[v[key] for v in means.values() if math.isfinite(v[key])]] if values)
    return "" if above else ("every row sits at or below what a network unrelated to the vanilla model scores "
                             "(the control rows), for every measure")


def similarity_findings(inputs: ReportInputs) -> list[str]:
    """REPORT.md's reading of Table 1, computed from its numbers: for each measure and
    initialisation, whether our rows reproduce the paper's ordering Duet > LocalBCP >
    BCP > LMT and how far their levels are from the paper's."""
    published = {m: paper.TABLE1[m]["similarity"] for m in PAPER_ORDER}
    lines = ["## Table 1: which measure reproduces the paper's similarity", "",
             f"The paper prints {_chain(published)} (%), without saying how it measures. Below, for each "
             "measure of Table 1 and each initialisation, our methods' own rows (mean over seeds; Duet's grid "
             "points left out) highest first, whether they keep the paper's ordering, and how far their levels "
             "are from the paper's (mean and largest |ours − paper|, percentage points).", "",
             "| init | measure | ours, highest first | paper's ordering | mean \\|Δ\\| | largest \\|Δ\\| |",
             "| --- | --- | --- | --- | ---: | ---: |"]
    verdicts, absent_inits, compared = [], [], set()
    for init in INITS:
        means = _group_means(inputs, init)
        if not means:
            absent_inits.append(init)
            continue
        missing = [METHOD_LABELS[m] for m in PAPER_ORDER if m not in means]
        for key, name in MEASURE_NAMES.items():
            values = {m: means[m][key] for m in PAPER_ORDER if m in means and math.isfinite(means[m][key])}
            if not values:
                continue
            in_order = [m for m in PAPER_ORDER if m in values]
            compared.update(in_order)
            ordered = all(values[a] > values[b] for a, b in zip(in_order, in_order[1:]))
            gaps = [abs(values[m] - published[m]) for m in in_order]
            complete = len(in_order) == len(PAPER_ORDER)
            if len(in_order) < 2:
                verdict = "one method only"
            elif ordered and complete:
                verdict = "**yes**"
            elif ordered:
                verdict = f"yes among those run ({', '.join(missing)} missing)"
            else:
                verdict = "no"
            lines.append(f"| {INIT_LABELS[init]} | {name} | {_chain(values)} | {verdict} | "
                         f"{fmt(sum(gaps) / len(gaps), 1)} | {fmt(max(gaps), 1)} |")
            # An ordering among rows that all sit at or below an unrelated network's score
            # (the control rows) is not the paper's finding: it does not count as reproduced.
            above = min(values.values()) > _control_ceiling(inputs, key)
            verdicts.append((init, key, ordered and complete and above, sum(gaps) / len(gaps)))
    if not verdicts:
        lines[-2:] = []
    lines.append("")
    reproduced = [v for v in verdicts if v[2]]
    silent = _why_no_reading(inputs, init_means={init: _group_means(inputs, init) for init in INITS})
    if verdicts and len(compared) < 2:
        others = ", ".join(r.name for r in inputs.other_guide_runs)
        lines.append(f"**Reading:** none: only {', '.join(METHOD_LABELS[m] for m in compared)} has rotation "
                     "measures against this vanilla model, and the paper's ordering needs two of its methods"
                     + (f" ({others}: compared with another guide, Table 1's note)." if others else "."))
    elif silent and verdicts:
        lines.append(f"**Reading:** none: {silent}.")
    elif reproduced:
        init, key, _, gap = min(reproduced, key=lambda v: v[3])
        others = [f"{MEASURE_NAMES[k]} ({INIT_LABELS[i]})" for i, k, _, _ in reproduced if (i, k) != (init, key)]
        lines.append(f"**Reading:** the {MEASURE_NAMES[key]} of the {INIT_LABELS[init]} runs reproduces the "
                     f"paper's ordering Duet > LocalBCP > BCP > LMT with the closest levels ({fmt(gap, 1)} points "
                     "from the paper's on average)"
                     + (f"; the ordering also holds for: {', '.join(others)}." if others else
                        "; no other combination of measure and initialisation gives that ordering."))
    elif verdicts:
        init, key, _, gap = min(verdicts, key=lambda v: v[3])
        absent = [METHOD_LABELS[m] for m in PAPER_ORDER if not any(m in _group_means(inputs, i) for i in INITS)]
        lines.append("**Reading:** no combination of measure and initialisation in these runs reproduces the "
                     "paper's ordering Duet > LocalBCP > BCP > LMT"
                     + (f" ({', '.join(absent)} not run)" if absent else "")
                     + f"; the closest levels are those of the {MEASURE_NAMES[key]} of the {INIT_LABELS[init]} "
                     f"runs ({fmt(gap, 1)} points from the paper's on average).")
    for init in absent_inits:
        lines.append("")
        if init == "vanilla_init":
            lines.append("The vanilla_init rows are absent: no run here started from the vanilla model's initial "
                         "weights. To add them, set `init_from: vanilla_init` in a method block (params.yaml or a "
                         "profile), or `init_variants: [vanilla_init]` to train every run from both "
                         "initialisations; Table 1 then shows whether a shared initialisation explains the "
                         "paper's levels.")
        else:
            lines.append("No run here started from scratch (`init_from: scratch`, the default).")
    lines.append("")
    if inputs.controls:
        names = {"vanilla_control": "a second vanilla model (other seed)", "random": "the network at initialisation"}
        lines += ["Controls (Table 1), what a network unrelated to the vanilla model scores: "
                  + "; ".join(f"{names.get(control, control)}: " + ", ".join(
                      f"{name} {fmt(metrics.get(f'{key}_mean', math.nan), 1)}" for key, name in MEASURE_NAMES.items())
                      for control, metrics in inputs.controls.items())
                  + f" (r = {control_rank(inputs.params)}). A row near these levels shares no more with the "
                  "vanilla model than an unrelated network does."]
    else:
        lines.append("No control rows (`similarity.controls: false`).")
    return lines


CLASSES = 10   # CIFAR-10: chance is 10 %


def chance_band(test_images: int) -> float:
    """The upper edge of chance accuracy (%) on n test images: 10 % plus three binomial
    standard errors of a guessing classifier."""
    n = max(test_images, 1)
    return 100.0 / CLASSES + 3 * 100.0 * math.sqrt((1 / CLASSES) * (1 - 1 / CLASSES) / n)


def report_limits(inputs: ReportInputs) -> list[str]:
    """Why this run's numbers cannot answer the paper's question (empty when they can)."""
    reasons = []
    if len(inputs.seeds) < 2:
        reasons.append("one seed: no spread over seeds and no paired difference with a standard error")
    band = chance_band(inputs.test_images)
    near = [r.label for r in inputs.runs if r.certify["clean_accuracy"] <= band]
    if near:
        reasons.append(f"clean accuracy within chance (at most {fmt(band, 1)} % on {inputs.test_images:,} test "
                       f"images: 10 % plus three standard errors) for {', '.join(dict.fromkeys(near))}")
    return reasons


def banner(inputs: ReportInputs) -> list[str]:
    reasons = report_limits(inputs)
    if not reasons:
        return []
    return ["> **This run cannot answer the paper's question.** " + "; ".join(reasons)[0].upper()
            + "; ".join(reasons)[1:] + ". Its numbers show that the pipeline runs, not how the methods "
            "compare: no reading below draws a conclusion from them.", ""]


def paired_findings(inputs: ReportInputs) -> list[str]:
    """REPORT.md's reading of Table 2's paired differences, computed from the runs: for each
    row paired with a base (Duet with BCP, Duet-local with LocalBCP), whether its clean, PGD
    and certified accuracy is higher or lower than the base's by the 95 % t-interval of the
    per-seed differences. A row or base within chance gets no reading."""
    band = chance_band(inputs.test_images)
    lines = ["## Table 2: what the paired differences say", "",
             "For each seed both have, the row's accuracy minus its base's (the same initial weights and "
             "batches); mean [95 % t-interval, n − 1 degrees of freedom], in percentage points. A difference is "
             "called higher or lower only where its interval excludes zero.", "",
             "| row | base | n | clean | PGD | certified |", "| --- | --- | ---: | --- | --- | --- |"]
    silent, paired = [], 0
    for group in inputs.groups:
        runs = inputs.of_group(group)
        base = paired_base(runs[0].method)
        base_group = same_init_group(inputs, base, runs[0].init_from) if base else None
        if not base_group:
            continue
        base_runs = inputs.of_group(base_group)
        seeds, differences = paired_differences(runs, base_runs)
        at_chance = [rows[0].label for rows in (runs, base_runs)
                     if summary([r.certify["clean_accuracy"] for r in rows])[0] <= band]
        if at_chance:
            silent.append(f"{runs[0].label} (clean accuracy of {', '.join(at_chance)} within chance, at most "
                          f"{fmt(band, 1)} %)")
            cells = ["no reading"] * len(TABLE2_METRICS)
        else:
            cells = [paired_verdict(differences[name]) for name in TABLE2_METRICS]
        lines.append(f"| {runs[0].label} | {base_runs[0].label} | {len(seeds)} | " + " | ".join(cells) + " |")
        paired += 1
    if not paired:
        return []
    if silent:
        lines += ["", "No reading for " + "; ".join(silent) + ": a network that guesses cannot be compared."]
    return lines + [""]


def _provenance(inputs: ReportInputs, root: Path) -> list[str]:
    params, data, vanilla = inputs.params, inputs.provenance, inputs.vanilla
    rows = [
        ("profile", f"`{params['profile']}` (results/{params['run']['name']}/)"),
        ("data", data_text(data) + (f". {data['note']}" if data.get("note") else "")),
        ("data sha256", f"`{data['sha256']}`"),
        ("perturbation", f"l2, ε = {eps_text(params['certify']['eps'])} ({params['certify']['eps']:.6f})"),
        ("seeds", ", ".join(map(str, inputs.seeds))),
        ("devices (training)", ", ".join(inputs.devices)),
        ("code of the runs", ", ".join(f"`{c}`" for c in inputs.commits)),
        ("code of this report", f"`{git_commit(root)}`"),
        ("vanilla (guide) model", f"{vanilla['arch']} {vanilla['activation']}, {vanilla['epochs']} epochs, "
                                  f"test accuracy {fmt(vanilla['test_accuracy'])}% on the whole test split "
                                  f"({data['images']['test']:,} images)"
                                  + (f", {fmt(vanilla['certify_subset']['accuracy'])}% on the certified rows' "
                                     f"{vanilla['certify_subset']['images']:,} test images"
                                     if vanilla.get("certify_subset") else "")
                                  + f" (paper: {paper.TABLE2['vanilla']['clean']}%)"),
        ("guide weights sha256", f"`{vanilla['weights_sha256']}`: one guide for every seed; the seeds vary the "
                                 "certified training"
                                 + (f" (rotation measures of {', '.join(r.name for r in inputs.other_guide_runs)} "
                                    "were taken against another guide: Table 1's note)"
                                    if inputs.other_guide_runs else "")),
    ]
    lines = ["| | |", "| --- | --- |"] + [f"| {key} | {value} |" for key, value in rows]
    return lines


def _schedules(inputs: ReportInputs) -> list[str]:
    lines = ["| run | method | epochs | warm-up | ramp | batch | lr | ε train | seeds | selected epoch |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for group in inputs.groups:
        runs = inputs.of_group(group)
        cfg = runs[0].config
        lines.append(f"| {runs[0].label} | {runs[0].method} | {cfg['epochs']} | {cfg['warmup_epochs']} | "
                     f"{cfg['ramp_epochs']} | {cfg['batch_size']} | {cfg['lr']:g} | {eps_text(cfg['eps_train'])} | "
                     f"{', '.join(str(r.seed) for r in runs)} | "
                     f"{', '.join(str(r.train['selected_epoch']) for r in runs)} |")
    return lines


def _soundness(inputs: ReportInputs) -> list[str]:
    certified = sum(r.attack["certified_points"] for r in inputs.runs)
    broken = sum(r.attack["certified_points_broken"] for r in inputs.runs)
    worst = max((max(r.certify["spectral_norms"]["upper_over_estimate"]) for r in inputs.runs), default=1.0)
    attacks = ", ".join(inputs.runs[0].attack["attacks"]) if inputs.runs else ""
    norms = inputs.runs[0].certify["spectral_norms"]["method"] if inputs.runs else ""
    return [
        f"- Certification: {inputs.runs[0].certify['numerics'] if inputs.runs else ''}.",
        f"- Spectral norms: {norms}; the guaranteed bounds sit at most {100 * (worst - 1):.2f}% above the "
        "power-iteration estimates.",
        f"- Attack cross-check: {certified:,} certified (run, test point) pairs attacked with {attacks} "
        f"({inputs.params['pgd']['steps']} steps); broken: {broken}. A broken certificate stops the pipeline.",
        *([f"- Certify or predict: {sum(c['attack']['certified_points'] for c in inputs.compositions):,} points "
           "certified by a composite attacked at the chosen τ; handed to the guide or broken: "
           f"{sum(c['attack']['certified_points_broken'] for c in inputs.compositions)}."]
          if inputs.compositions else []),
    ]


def _benchmark(inputs: ReportInputs, root: Path) -> list[str]:
    """The benchmark stage's tables (one device, every method beside the floor), when it ran."""
    layout = RunLayout.of(inputs.params)
    lines = ["## Cost, measured by the benchmark stage", "",
             "Seconds per epoch (extrapolated from timed steps, data on the device, TF32 off) and peak "
             "memory of a training step at the full ε, beside the floor: a plain cross-entropy epoch of "
             "the same network.", ""]
    for arch in benchmark_archs(inputs.params):
        lines += [markdown_table(json.loads((root / layout.benchmark_result(arch)).read_text())), ""]
    if len(benchmark_archs(inputs.params)) > 1:
        depth = json.loads((root / layout.benchmark_depth).read_text())
        lines += ["Against depth:", "", depth_markdown_table(depth), ""]
    return lines


def profile_commands(profile: str, root: Path = PROJECT_ROOT) -> tuple[str, str]:
    """The Snakemake and DVC commands that make a profile's results (run from the project root)."""
    if profile == PAPER_PROFILE:
        return "snakemake --cores 1 all", "dvc repro"
    dvc_yaml = dvc_yaml_path(profile, root).relative_to(root).as_posix()
    return f"snakemake --cores 1 all --config profile={profile}", f"dvc repro {dvc_yaml}"


def profile_commands_text(params: dict, root: Path = PROJECT_ROOT) -> str:
    snakemake, dvc = profile_commands(params["profile"], root)
    return f"the profile's runs are made by `{snakemake}` (or `{dvc}`)"


def build_report(inputs: ReportInputs, layout: RunLayout, root: Path) -> str:
    folder = Path(layout.report).parent
    rel = lambda path: Path(path).relative_to(folder).as_posix()  # noqa: E731
    lines = [
        f"# Duet reproduction: profile `{inputs.params['profile']}`",
        "",
        "Generated by the `report` stage from this folder's metrics files; "
        f"{profile_commands_text(inputs.params, root)}. "
        "Columns labelled *paper* hold the published numbers, with their source; every other number was "
        "measured by this pipeline.",
        "",
        *banner(inputs),
        "## Provenance",
        "",
        *_provenance(inputs, root),
        "",
        "## Schedules",
        "",
        *_schedules(inputs),
        "",
        "## Tables",
        "",
        "Also as CSV and LaTeX: " + ", ".join(f"[table{n}.csv]({rel(layout.table(n, 'csv'))}) / "
                                               f"[.tex]({rel(layout.table(n, 'tex'))})" for n in TABLES),
        "",
    ]
    for number in TABLES:
        text = (root / layout.table(number, "md")).read_text()
        lines += [text, ""]
    lines += [*paired_findings(inputs), *validation_choice(inputs), *similarity_findings(inputs), "",
              *composition_section(inputs.compositions)]
    lines += ["## Figures", ""]
    for name in FIGURES:
        lines += [f"![{name}]({rel(layout.figure(name, 'png'))})", "",
                  f"*{FIGURE_CAPTIONS[name]}* ([PDF]({rel(layout.figure(name, 'pdf'))}))", ""]
    if inputs.params["benchmark"]["enabled"]:
        lines += _benchmark(inputs, root)
    lines += ["## Soundness", "", *_soundness(inputs), ""]
    return "\n".join(lines)


def make_report(params: dict, root: Path) -> Path:
    """The `report` stage: REPORT.md and its HTML page."""
    layout = RunLayout.of(params)
    path = root / layout.report
    text = build_report(collect(params, root), layout, root)
    save_text(text, path)
    save_text(render_html(text, f"Duet reproduction: profile {params['profile']}"), root / layout.report_html)
    print(f"[report] wrote {layout.report} and {layout.report_html}")
    return path
