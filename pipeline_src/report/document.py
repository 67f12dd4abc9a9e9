"""REPORT.md: the run's tables and figures with its provenance, in one page.

Built from the tables the `tables` stage wrote (so the page shows exactly the
committed numbers) and the metrics files; the figures are linked."""
from __future__ import annotations

from pathlib import Path

from ..io import git_commit
from ..paths import RunLayout
from . import paper
from .collect import ReportInputs
from .figures import FIGURES
from .tables import TABLES, data_text, eps_text, fmt

FIGURE_CAPTIONS = {
    "fig2_clean": "Figure 2 (the paper's): clean loss and clean accuracy per epoch, with the ε and κ schedules.",
    "fig3_certified": "Figure 3 (the paper's): certified (robust) loss and certified accuracy per epoch; "
                      "dashed: validation with the sound certifier.",
    "radius_curve": "Certified accuracy against the l2 radius (0 to 2ε), each method's own certifier.",
    "similarity_per_layer": "Rotation similarity of each layer to the vanilla model.",
}


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
                                  f"test accuracy {fmt(vanilla['test_accuracy'])}% "
                                  f"(paper: {paper.TABLE2['vanilla']['clean']}%)"),
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
    ]


def _benchmark(inputs: ReportInputs, root: Path) -> list[str]:
    """The benchmark stage's tables (one device, every method beside the floor), when it ran."""
    import json

    from ..benchmark import depth_markdown_table, markdown_table
    from ..config import benchmark_archs

    layout = RunLayout.of(inputs.params)
    lines = ["## Cost, measured by the benchmark stage", "",
             "Seconds per epoch (extrapolated from timed steps, data on the device, TF32 off) and peak "
             "memory of a training step at the full ε, beside the floor: a plain cross-entropy epoch of "
             "the same network.", ""]
    for arch in benchmark_archs(inputs.params):
        lines += [markdown_table(json.loads((root / layout.benchmark_result(arch)).read_text())), ""]
    if len(benchmark_archs(inputs.params)) > 1:
        lines += ["Against depth:", "", depth_markdown_table(json.loads((root / layout.benchmark_depth).read_text())), ""]
    return lines


def build_report(inputs: ReportInputs, layout: RunLayout, root: Path) -> str:
    folder = Path(layout.report).parent
    rel = lambda path: Path(path).relative_to(folder).as_posix()  # noqa: E731
    lines = [
        f"# Duet reproduction: profile `{inputs.params['profile']}`",
        "",
        "Generated by the `report` stage from this folder's metrics files (`snakemake --cores 1 all`). "
        "Columns labelled *paper* hold the published numbers, with their source; every other number was "
        "measured by this pipeline.",
        "",
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
    lines += ["## Figures", ""]
    for name in FIGURES:
        lines += [f"![{name}]({rel(layout.figure(name, 'png'))})", "",
                  f"*{FIGURE_CAPTIONS[name]}* ([PDF]({rel(layout.figure(name, 'pdf'))}))", ""]
    if inputs.params["benchmark"]["enabled"]:
        lines += _benchmark(inputs, root)
    lines += ["## Soundness", "", *_soundness(inputs), ""]
    return "\n".join(lines)
