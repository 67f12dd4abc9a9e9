"""Tables 1-3 of the paper, measured, beside the published numbers.

Each table has a row per run group (a method, or a point of Duet's grid); with
several seeds a cell is the mean ± sample standard deviation over the seeds.
The paper's number sits in a column labelled as the paper's, with the
difference (ours − paper) beside it. Every table carries its context: data
source, architecture, ε, schedules, seeds and the commits of the code.
Written as Markdown, CSV (numbers only, one column per quantity) and LaTeX."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from scipy.stats import t as student_t

from ..io import save_json, save_text
from ..paths import REPORT_TABLES, RunLayout
from ..runs import METHOD_FACTS, control_rank
from . import paper
from .collect import INIT_LABELS, METHOD_LABELS, ReportInputs, RunResult, collect
from .format import NOT_MEASURED, format_peak_memory, peak_memory_measured, render_html

DASH = "—"
MINUS = "−"  # typographic minus in displayed numbers; the CSV keeps plain numbers
TEXT_COLUMNS = ("Method", "Init", "Certifier", "Paper's source", "Device")


@dataclass
class Table:
    number: int
    title: str
    header: list[str]
    rows: list[list[str]]  # display strings
    data: pd.DataFrame     # the same numbers, unformatted, for the CSV
    notes: list[str]
    # Markdown only: the table shown as several, each (title, its columns after the
    # first `key_columns`, which every part repeats); the CSV and LaTeX keep one table.
    parts: list[tuple[str, list[str]]] | None = None
    key_columns: int = 1


def summary(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of the finite values; std is nan for n < 2."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.{digits}f}".replace("-", MINUS)


def fmt_signed(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:+.{digits}f}".replace("-", MINUS)


def fmt_summary(values: list[float], digits: int = 2) -> str:
    mean, std, n = summary(values)
    if n == 0:
        return DASH
    return fmt(mean, digits) + (f" ± {std:.{digits}f}" if n > 1 else "")


def standard_error(values: list[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the finite values; the SE is nan for n < 2."""
    mean, std, n = summary(values)
    return mean, std / math.sqrt(n) if n > 1 else math.nan, n


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The `level` t-interval of the mean of the finite values (Student's t, n − 1 degrees
    of freedom): mean ± t_{(1+level)/2, n−1} SE; (nan, nan) for n < 2."""
    mean, se, n = standard_error(values)
    if n < 2:
        return math.nan, math.nan
    half = float(student_t.ppf((1 + level) / 2, n - 1)) * se
    return mean - half, mean + half


def fmt_paired(values: list[float], digits: int = 2) -> str:
    """A mean difference ± its standard error and its 95 % t-interval ("n/a" with one pair)."""
    mean, se, n = standard_error(values)
    if n == 0:
        return DASH
    if n == 1:
        return f"{fmt_signed(mean, digits)} ± n/a"
    low, high = t_interval(values)
    return f"{fmt_signed(mean, digits)} ± {se:.{digits}f} [{fmt_signed(low, digits)}, {fmt_signed(high, digits)}]"


def paired_verdict(values: list[float]) -> str:
    """What a paired difference says: higher or lower where its 95 % t-interval excludes
    zero, "not distinguishable" where it contains zero, nothing with one pair."""
    mean, _, n = standard_error(values)
    if n < 2:
        return f"{fmt_signed(mean)} (one seed: no reading)"
    low, high = t_interval(values)
    interval = f"{fmt_signed(mean)} [{fmt_signed(low)}, {fmt_signed(high)}]"
    if low > 0:
        return f"**higher**, {interval}"
    if high < 0:
        return f"**lower**, {interval}"
    return f"not distinguishable at n = {n}, {interval}"


def fmt_sig(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return DASH
    return f"{value:.{digits}g}".replace("-", MINUS)


def eps_text(eps: float) -> str:
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:.4g} ({steps:.1f}/255)"


def data_text(provenance: dict) -> str:
    images = provenance["images"]
    counts = f"{images['train']:,} train / {images['val']:,} validation / {images['test']:,} test images"
    if provenance.get("per_class"):
        counts += f" ({provenance['subset']})"
    if provenance["source"] == "torchvision":
        return f"original CIFAR-10 (torchvision), {counts}"
    if provenance["source"] == "sample":
        return f"the committed sample of the lossy JPEG copy of CIFAR-10, {counts}"
    kind = "lossy JPEG copy of CIFAR-10" if provenance["lossy_jpeg"] else "CIFAR-10 image files"
    return f"{kind} ({Path(provenance['path']).name}), {counts}"


def context_lines(inputs: ReportInputs) -> list[str]:
    """What every table states about the runs behind it."""
    params = inputs.params
    schedules, archs = [], []
    for group in inputs.groups:
        run = inputs.of_group(group)[0]
        cfg = run.config
        schedules.append(f"{run.label} {cfg['epochs']} epochs ({cfg['warmup_epochs']} warm-up, "
                         f"{cfg['ramp_epochs']} ramp, batch {cfg['batch_size']})")
        archs.append(f"{run.train['arch']} {run.train['activation']}")
    seeds = inputs.seeds
    lines = [
        f"Data: {data_text(inputs.provenance)}"
        + (" (lossy: accuracies run below those on the original)" if inputs.provenance["lossy_jpeg"] else ""),
        f"Architecture: {', '.join(dict.fromkeys(archs))}",
        f"Perturbation: l2 ε = {eps_text(params['certify']['eps'])}; test images certified and attacked: "
        f"{subset_text(inputs)}",
        f"Schedules: {'; '.join(schedules)}",
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}"
        + (", mean ± sample std)" if len(seeds) > 1 else ")"),
        f"Code: git {', '.join(inputs.commits)}; profile '{params['profile']}'",
    ]
    return lines


def _context_columns(inputs: ReportInputs) -> dict:
    return {"data_source": inputs.provenance["source"], "lossy_jpeg": inputs.provenance["lossy_jpeg"],
            "eps": inputs.params["certify"]["eps"], "git_commit": " ".join(inputs.commits),
            "profile": inputs.params["profile"]}


def _run_columns(runs: list) -> dict:
    """Per row of a CSV: the architecture, schedule and seeds behind it."""
    return {"arch": runs[0].train["arch"], "activation": runs[0].train["activation"],
            "epochs": runs[0].config["epochs"], "seeds": " ".join(str(r.seed) for r in runs)}


def _vanilla_columns(inputs: ReportInputs) -> dict:
    vanilla = inputs.vanilla
    return {"arch": vanilla["arch"], "activation": vanilla["activation"], "epochs": vanilla["epochs"],
            "seeds": str(vanilla["seed"])}


def _paper_value(table: dict, runs: list[RunResult], key: str) -> float | None:
    """The paper's number for a method's own row, whatever its initialisation (grid points have none)."""
    method = runs[0].method
    if not runs[0].base or method not in table:
        return None
    return table[method][key]


def _diff(measured: float, published: float | None) -> float:
    return measured - published if published is not None and math.isfinite(measured) else math.nan


def init_text(runs: list[RunResult]) -> str:
    return ", ".join(dict.fromkeys(INIT_LABELS.get(r.init_from, r.init_from) for r in runs))


# Table 1's measures (similarity stage metrics `<key>_mean`, in %), in column order.
TABLE1_MEASURES = {
    "similarity": "Cosine, r (%)",
    "similarity_full_rank": "Cosine, full rank (%)",
    "matched_similarity": "Matched cosine, r (%)",
    "matched_similarity_full_rank": "Matched cosine, full rank (%)",
    "subspace_overlap": "Subspace overlap, r (%)",
    "matched_subspace_overlap": "Matched subspace overlap, r (%)",
}
# Only in the CSV: the two sides of the overlaps, chance level, the matched units' cosine.
TABLE1_CSV_ONLY = ("subspace_overlap_u", "subspace_overlap_v", "matched_subspace_overlap_u",
                   "matched_subspace_overlap_v", "subspace_overlap_chance", "unit_match_cosine")
CONTROL_LABELS = {"vanilla_control": "Control: vanilla, other seed",
                  "random": "Control: random network (at init)"}


def _measure(metrics: dict, key: str) -> float:
    value = metrics.get(f"{key}_mean")
    return math.nan if value is None else float(value)


def table1(inputs: ReportInputs) -> Table:
    header = (["Method", "Init", "r"] + list(TABLE1_MEASURES.values())
              + ["Similarity, paper (%)", "Δ cosine, r (ours − paper)", "Lipschitz bound", "Lipschitz estimate",
                 "Lipschitz, paper"])
    base_rank = control_rank(inputs.params)
    rows, records = [], []
    if inputs.svd:
        rows.append([METHOD_LABELS["vanilla"], DASH, DASH] + [DASH] * len(TABLE1_MEASURES) + [DASH, DASH,
                     fmt_sig(inputs.svd["lipschitz_upper_bound"], 4), fmt_sig(inputs.svd["lipschitz_estimate"], 4),
                     DASH])
        records.append({"row_kind": "vanilla", "method": "vanilla", "run_group": "vanilla", "label": "Vanilla",
                        "n": 1, "lipschitz_upper_mean": inputs.svd["lipschitz_upper_bound"],
                        "lipschitz_estimate_mean": inputs.svd["lipschitz_estimate"], **_vanilla_columns(inputs)})
    for control, metrics in inputs.controls.items():
        init = f"seed {metrics['seed']}" if control == "vanilla_control" else "initialisation"
        rows.append([CONTROL_LABELS[control], init, str(metrics["rank"])]
                    + [fmt(_measure(metrics, key), 1) for key in TABLE1_MEASURES]
                    + [DASH, DASH, fmt_sig(metrics["lipschitz_upper"], 4), fmt_sig(metrics["lipschitz_estimate"], 4),
                       DASH])
        records.append({"row_kind": "control", "method": control, "run_group": f"control_{control}",
                        "label": CONTROL_LABELS[control], "init_from": init, "n": 1, "rank": metrics["rank"],
                        **{f"{key}_mean": _measure(metrics, key) for key in (*TABLE1_MEASURES, *TABLE1_CSV_ONLY)},
                        "lipschitz_upper_mean": metrics["lipschitz_upper"],
                        "lipschitz_estimate_mean": metrics["lipschitz_estimate"],
                        "control_test_accuracy": metrics.get("test_accuracy"), "seeds": str(metrics["seed"])})
    for group in inputs.groups:
        runs = inputs.of_group(group)
        method = runs[0].method
        values = {key: [_measure(r.similarity, key) for r in runs] for key in (*TABLE1_MEASURES, *TABLE1_CSV_ONLY)}
        upper = [r.similarity["lipschitz_upper"] for r in runs]
        estimate = [r.similarity["lipschitz_estimate"] for r in runs]
        rank = runs[0].similarity["rank"]
        paper_sim = _paper_value(paper.TABLE1, runs, "similarity")
        paper_lip = _paper_value(paper.TABLE1, runs, "lipschitz")
        sim_mean, sim_std, n = summary(values["similarity"])
        rows.append([runs[0].label, init_text(runs), str(rank)]
                    + [fmt_summary(values[key], 1) for key in TABLE1_MEASURES]
                    + [fmt(paper_sim, 1), fmt_signed(_diff(sim_mean, paper_sim), 1), _sig_summary(upper),
                       _sig_summary(estimate), fmt(paper_lip, 1)])
        record = {"row_kind": "run", "method": method, "run_group": group, "label": runs[0].label,
                  "init_from": runs[0].init_from, "n": n, "rank": rank}
        for key in (*TABLE1_MEASURES, *TABLE1_CSV_ONLY):
            mean, std, _ = summary(values[key])
            record.update({f"{key}_mean": mean, f"{key}_std": std})
        record.update({"similarity_paper": paper_sim, "similarity_diff_paper": _diff(sim_mean, paper_sim),
                       "lipschitz_upper_mean": summary(upper)[0], "lipschitz_upper_std": summary(upper)[1],
                       "lipschitz_estimate_mean": summary(estimate)[0], "lipschitz_paper": paper_lip,
                       **_run_columns(runs)})
        records.append(record)
    chance = [_measure(m, "subspace_overlap_chance") for m in inputs.controls.values()]
    notes = [
        "Cosine: Frobenius cosine (inner product of unit-norm matrices) between a layer's rank-r U_r V_rᵀ and "
        "the vanilla model's, averaged over the weight layers; at full rank beside it. It changes when hidden "
        "units are permuted, which leaves the network's function unchanged, so two unrelated networks score "
        "about 0%. The paper does not define its measure exactly (docs/duet-method.md).",
        "Matched cosine: the same after each hidden layer's output units were matched to the vanilla model's by "
        "a linear assignment (maximal summed signed cosine of the units' weight rows; the permutation carried "
        "into the next layer's inputs, through the flatten by channel blocks; logits never permuted).",
        "Subspace overlap: (‖U_rᵀU'_r‖²_F / r + ‖V_rᵀV'_r‖²_F / r) / 2, free of signs and of the order of the "
        "singular vectors; random subspaces overlap r/dim on average"
        + (f" ({fmt(chance[0], 1)}% at r = {base_rank} for this architecture)" if chance else "")
        + ". At full rank it is 100% on the side of dimension min(out, in), so it is given at r only.",
        f"r: the rank of each row, duet.rank = {base_rank} but for Duet grid points (their own rank). "
        "Init: scratch (the run's own seed) or vanilla init (the vanilla model's initial weights).",
        "Controls (not trained for robustness): a second vanilla model trained like the vanilla one from another "
        "seed, and the certified architecture at initialisation (as BCP builds it) from its own seed, each "
        "against the vanilla "
        "model: what an unrelated network scores on each measure.",
        "Lipschitz bound: product of guaranteed upper bounds of the layers' operator norms (the certifier's); "
        "estimate: product of power-iteration estimates.",
        f"Paper columns: {paper.DUET}, Table 1 (one number per method, its measure unstated).",
    ]
    if inputs.other_guide_runs:
        guides = sorted({run.similarity["other_guide"][:8] for run in inputs.other_guide_runs})
        left_out = ", ".join(run.name for run in inputs.other_guide_runs)
        notes.append(
            f"Left out of the rotation columns (not of the Lipschitz ones): {left_out}, "
            f"compared with another guide ({', '.join(guides)}) than this profile's "
            f"({inputs.vanilla['weights_sha256'][:8]}); their training did not read the guide, so their other "
            "numbers stand. The rotation columns' n is the number of the row's seeds compared with this guide.")
    return Table(1, "Rotation similarity to the vanilla model and Lipschitz constant", header, rows,
                 pd.DataFrame(records), notes)


def _sig_summary(values: list[float]) -> str:
    mean, std, n = summary(values)
    if n == 0:
        return DASH
    return fmt_sig(mean, 4) + (f" ± {fmt_sig(std, 2)}" if n > 1 else "")


def same_init_group(inputs: ReportInputs, method: str, init: str) -> str | None:
    """The row of `method`'s own run (not a grid point) with this initialisation."""
    for group in inputs.groups:
        runs = inputs.of_group(group)
        if runs[0].method == method and runs[0].base and runs[0].init_from == init:
            return group
    return None


TABLE2_METRICS = ("clean", "pgd", "certified")


def _table2_values(runs: list[RunResult]) -> dict[str, list[float]]:
    return {"clean": [r.certify["clean_accuracy"] for r in runs],
            "pgd": [r.attack["pgd_accuracy"] for r in runs],
            "certified": [r.certify["headline_certified_accuracy"] for r in runs]}


def paired_differences(duet: list[RunResult], bcp: list[RunResult]) -> tuple[list[int], dict[str, list[float]]]:
    """Per seed both have, Duet − BCP (they start from the same weights and see the same
    batches for a seed): the seeds and the differences of clean, PGD and certified accuracy.
    The same for any method and the one it is paired with (Duet-local − LocalBCP)."""
    by_seed = {r.seed: r for r in bcp}
    seeds = sorted(r.seed for r in duet if r.seed in by_seed)
    mine = {r.seed: _table2_values([r]) for r in duet}
    theirs = {s: _table2_values([by_seed[s]]) for s in seeds}
    return seeds, {name: [mine[s][name][0] - theirs[s][name][0] for s in seeds] for name in TABLE2_METRICS}


REFERENCE_ESTIMATE = "LocalBCP reference estimate (not guaranteed)"


def _reference_estimates(runs: list[RunResult]) -> list[float]:
    return [r.certify["reference_estimates"]["local_masked_power_iteration"] for r in runs
            if isinstance(r.certify.get("reference_estimates"), dict)
            and r.certify["reference_estimates"].get("local_masked_power_iteration") is not None]


def paired_base(method: str) -> str | None:
    """The method a method is paired with (Duet: BCP, Duet-local: LocalBCP), or None."""
    facts = METHOD_FACTS.get(method)
    return facts.paired_with if facts else None


def is_named_variant(runs: list[RunResult]) -> bool:
    """A row of a method's named variant (`bcp-kappa_0p25`, `bcp-guide_unit`), not its own run."""
    return bool(runs[0].config.get("variant"))


def paired_group(inputs: ReportInputs, runs: list[RunResult]) -> str | None:
    """The row a row's seeds are paired with: for a method that is another plus a term, that
    method's run with the same initialisation (Duet: BCP); for a named variant of a method
    without such a partner (BCP's `kappa_0p25`, `guide_unit`), the method's own run: for a
    seed both draw from the same seed family, so they see the same batches (and start from
    the same weights unless the variant moves `init_from`)."""
    method = runs[0].method
    base = paired_base(method)
    if base:
        return same_init_group(inputs, base, runs[0].init_from)
    if is_named_variant(runs) and method in inputs.groups:
        return method
    return None


def paired_title(inputs: ReportInputs) -> str:
    """The paired columns' name: `Duet − BCP`, and each other pair that has rows
    (`Duet − BCP / Duet-local − LocalBCP / variant − its method`)."""
    methods = dict.fromkeys(inputs.of_group(g)[0].method for g in inputs.groups)
    pairs = [f"{METHOD_LABELS[m]} − {METHOD_LABELS[paired_base(m)]}" for m in methods if paired_base(m)]
    if any(is_named_variant(inputs.of_group(g)) and not paired_base(inputs.of_group(g)[0].method)
           and paired_group(inputs, inputs.of_group(g)) for g in inputs.groups):
        pairs.append("variant − its method")
    return " / ".join(pairs) or "Duet − BCP"


@dataclass
class VanillaClean:
    """The vanilla row's clean accuracy and the test images it was measured on."""
    accuracy: float
    images: int
    same_subset: bool  # on the certified rows' test subset (or the whole split is that subset)
    source: str        # "certify_subset" (the vanilla stage's subset accuracy) or "whole_test_split"

    @property
    def images_text(self) -> str:
        return f"{self.images:,}" + ("" if self.same_subset else f" ({WHOLE_SPLIT})")


WHOLE_SPLIT = "whole test split"


def vanilla_clean(inputs: ReportInputs) -> VanillaClean:
    """The vanilla model's clean accuracy on the certified rows' test subset (the vanilla
    stage's `certify_subset`); a metrics file older than that key gives the whole test
    split's accuracy, labelled so unless the subset is the whole split."""
    subset = inputs.vanilla.get("certify_subset")
    if subset is not None:
        return VanillaClean(float(subset["accuracy"]), int(subset["images"]), True, "certify_subset")
    whole = inputs.provenance["images"]["test"]
    return VanillaClean(float(inputs.vanilla["test_accuracy"]), whole, whole == inputs.test_images,
                        "whole_test_split")


def test_images_text(runs: list[RunResult]) -> str:
    """The number of test images behind a row's clean, PGD and certified accuracy."""
    counts = sorted({int(n) for r in runs for n in (r.certify["test_images"], r.attack["test_images"])})
    return ", ".join(f"{n:,}" for n in counts)


def table2(inputs: ReportInputs) -> Table:
    header = ["Method", "Init", "Test images"]
    for name, title in zip(TABLE2_METRICS, ("Clean", "PGD", "Certified")):
        name_in_text = title.lower() if title != "PGD" else title
        header += [f"{title} (%)", f"{title}, paper (%)", f"Δ {name_in_text} (ours − paper)"]
    pair = paired_title(inputs)
    header += [f"{pair}, clean (paired)", f"{pair}, PGD (paired)", f"{pair}, certified (paired)",
               "Paired seeds (n)", REFERENCE_ESTIMATE, "Certifier", "Paper's source"]

    rows, records = [], []
    vanilla_published = paper.TABLE2["vanilla"]
    vanilla = vanilla_clean(inputs)
    clean = vanilla.accuracy
    rows.append([METHOD_LABELS["vanilla"], DASH, vanilla.images_text, fmt(clean), fmt(vanilla_published["clean"]),
                 fmt_signed(clean - vanilla_published["clean"])] + [DASH] * 6 + [DASH] * 4
                + ["", "none", vanilla_published["source"]])
    records.append({"method": "vanilla", "run_group": "vanilla", "label": "Vanilla", "n": 1,
                    "test_images": vanilla.images, "test_images_source": vanilla.source,
                    "same_test_subset": vanilla.same_subset, "clean_mean": clean,
                    "clean_paper": vanilla_published["clean"], "clean_diff_paper": clean - vanilla_published["clean"],
                    "paper_source": vanilla_published["source"], **_vanilla_columns(inputs)})
    for group in inputs.groups:
        runs = inputs.of_group(group)
        method = runs[0].method
        measured = _table2_values(runs)
        published = paper.TABLE2.get(method) if runs[0].base else None
        # A method that is another plus a term is compared with that one (same initialisation).
        base = paired_base(method)
        bcp_group = same_init_group(inputs, base, runs[0].init_from) if base else None
        bcp = _table2_values(inputs.of_group(bcp_group)) if bcp_group else None
        paper_base = paper.TABLE2.get(base) if base else None
        row = [runs[0].label, init_text(runs), test_images_text(runs)]
        record = {"method": method, "run_group": group, "label": runs[0].label, "init_from": runs[0].init_from,
                  "test_images": runs[0].certify["test_images"], "test_images_source": "certify_subset",
                  "same_test_subset": True}
        for name in TABLE2_METRICS:
            mean, std, n = summary(measured[name])
            cell = fmt_summary(measured[name])
            paper_value = published[name] if published else None
            paper_cell = fmt(paper_value)
            # As the paper prints Duet: its difference to BCP beside clean and certified accuracy
            # (Duet-local: to LocalBCP).
            if base and name != "pgd":
                if bcp is not None:
                    to_bcp = mean - summary(bcp[name])[0]
                    cell += f" ({fmt_signed(to_bcp)})"
                    record[f"{name}_diff_base"] = to_bcp
                    if base == "bcp":
                        record[f"{name}_diff_bcp"] = to_bcp
                if paper_value is not None and paper_base and paper_base[name] is not None:
                    paper_cell += f" ({fmt_signed(paper_value - paper_base[name])})"
            row += [cell, paper_cell, fmt_signed(_diff(mean, paper_value))]
            record.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_paper": paper_value,
                           f"{name}_diff_paper": _diff(mean, paper_value), "n": n})
        pair_group = paired_group(inputs, runs)
        if pair_group:
            seeds, differences = paired_differences(runs, inputs.of_group(pair_group))
            row += [fmt_paired(differences[name]) for name in TABLE2_METRICS] + [str(len(seeds))]
            for name in TABLE2_METRICS:
                mean, se, _ = standard_error(differences[name])
                low, high = t_interval(differences[name])
                record.update({f"{name}_paired_diff_mean": mean, f"{name}_paired_diff_se": se,
                               f"{name}_paired_diff_ci95_low": low, f"{name}_paired_diff_ci95_high": high})
                if base == "bcp":
                    record.update({f"{name}_paired_diff_bcp_mean": mean, f"{name}_paired_diff_bcp_se": se})
            record.update(paired_n=len(seeds), paired_seeds=" ".join(map(str, seeds)), paired_with=pair_group)
        else:
            row += [DASH] * 4
        estimates = _reference_estimates(runs)
        row.append(fmt_summary(estimates) if estimates else "")
        record["reference_estimate_mean"] = summary(estimates)[0] if estimates else math.nan
        row += [runs[0].certify["headline_certifier"], published["source"] if published else DASH]
        record.update(certifier=runs[0].certify["headline_certifier"],
                      paper_source=published["source"] if published else None, **_run_columns(runs))
        rows.append(row)
        records.append(record)
    notes = [
        "Clean and certified: the certify stage on the test images (guaranteed spectral bounds); "
        "certified with the method's own sound certifier (bcp: BCP boxes and ball; lipschitz: global margin; "
        "gloro: GloRo's margin bound, per class pair; local: local Lipschitz bound). PGD: the pgd stage (l2 PGD "
        "and APGD; a point counts only if it survives both), which also checks that no point certified by any "
        "certifier is broken.",
        "Duet's cells show, in brackets, its difference to BCP as the paper prints it (ours: measured BCP with "
        "the same initialisation, difference of the means); Duet-local's, its difference to LocalBCP.",
        f"{pair} (paired): for each seed both have (for a seed, BCP and every Duet run start from the same "
        "weights and see the same batches; so do LocalBCP and Duet-local, and a named variant of a method and "
        "the method's own run, which see the same batches), the row's accuracy minus its partner's; mean ± "
        "standard error over the n pairs [its 95 % t-interval, n − 1 degrees of freedom] "
        "(n/a with one pair). Where the interval contains zero the two are not distinguishable at that n.",
        f"{REFERENCE_ESTIMATE}: for clipped-ReLU (LocalBCP) models, the certified accuracy the LocalBCP "
        "reference's evaluation would report (masked norms by power iteration): an estimate, not a certificate; "
        "blank where the certify stage did not compute it.",
        vanilla_note(inputs, vanilla),
    ]
    if any(inputs.of_group(g)[0].method == "gloro" for g in inputs.groups):
        notes.append("GloRo's paper columns: its authors' own number, not the Duet paper's (GloRo is not in the "
                     "Duet paper's tables): the verified-robust accuracy its repository's README lists as its best "
                     "CIFAR-10 result at radius 0.141 with a 6C2F network (60.0%); no clean or PGD accuracy is "
                     "given there.")
    main = header[2:3 + 3 * len(TABLE2_METRICS)] + ["Certifier", "Paper's source"]
    parts = [("Main results", main),
             (f"Paired differences ({pair}) and the reference estimate",
              [h for h in header[2:] if h not in main])]
    return Table(2, "Clean, PGD and certified accuracy", header, rows, pd.DataFrame(records), notes,
                 parts=parts, key_columns=2)


def subset_text(inputs: ReportInputs) -> str:
    """What the certified rows' test images are."""
    whole = inputs.provenance["images"]["test"]
    if inputs.test_images >= whole:
        return f"the whole test split ({whole:,} images)"
    return (f"{inputs.test_images:,} of the {whole:,} test images, drawn across the classes (seeded, stratified: "
            "each class in proportion to its size), the same for every row")


def vanilla_note(inputs: ReportInputs, vanilla: VanillaClean) -> str:
    if vanilla.same_subset:
        return f"Test images: every row, the vanilla one too, is measured on {subset_text(inputs)}."
    return (f"Test images: the certified rows are measured on {subset_text(inputs)}; the vanilla row's clean "
            f"accuracy is on the {WHOLE_SPLIT} ({vanilla.images:,} images), not on that subset: its metrics file "
            "predates the subset's accuracy (`certify_subset`); rerun the vanilla stage to measure it there.")


def timed_runs(inputs: ReportInputs) -> dict[str, list]:
    """{run group: its runs whose training time is a measurement}: those named in
    `timed_runs`, or every run where the params leave it unset."""
    names = inputs.params.get("timed_runs")
    return {group: [r for r in inputs.of_group(group) if names is None or r.name in names]
            for group in inputs.groups}


def table3(inputs: ReportInputs) -> Table:
    header = ["Method", "Time per epoch (s)", "Time, paper (s)", "× BCP", "× BCP, paper",
              "Peak GPU memory (GB)", "Memory, paper (GB)", "Device"]
    timed = timed_runs(inputs)
    seconds = {g: [r.train["timing"]["seconds_per_epoch_mean"] for r in timed[g]] for g in inputs.groups}
    bcp_seconds = summary(seconds["bcp"])[0] if "bcp" in seconds else math.nan
    paper_bcp = paper.TABLE3["bcp"]["seconds"]
    rows, records = [], []
    for group in inputs.groups:
        runs = inputs.of_group(group)
        method = runs[0].method
        devices = sorted({r.train["timing"]["device"] for r in runs})
        memory_mb = [r.train["timing"]["peak_memory_mb"] for r in timed[group]]
        measured = peak_memory_measured(memory_mb, devices)  # a GPU's name, as the train stage recorded it
        mean, std, n = summary(seconds[group])
        paper_seconds = _paper_value(paper.TABLE3, runs, "seconds")
        paper_memory = _paper_value(paper.TABLE3, runs, "memory_gb")
        ratio = mean / bcp_seconds if math.isfinite(bcp_seconds) else math.nan
        paper_ratio = paper_seconds / paper_bcp if paper_seconds is not None else None
        rows.append([runs[0].label, fmt_summary(seconds[group], 2), fmt(paper_seconds, 1), fmt(ratio),
                     fmt(paper_ratio), format_peak_memory(memory_mb, devices, unit="GB"),
                     fmt(paper_memory, 1), ", ".join(devices)])
        records.append({"method": method, "run_group": group, "label": runs[0].label, "n": n,
                        "seconds_per_epoch_mean": mean, "seconds_per_epoch_std": std,
                        "seconds_paper": paper_seconds, "ratio_to_bcp": ratio, "ratio_to_bcp_paper": paper_ratio,
                        "peak_memory_gb_mean": summary(memory_mb)[0] / 1024.0 if measured else math.nan,
                        "memory_gb_paper": paper_memory, "device": ", ".join(devices), **_run_columns(runs)})
    notes = [
        "Ours: mean wall-clock seconds of a training epoch (validation excluded) as the train stage measured it, "
        f"and peak GPU memory of the epoch; a CPU run has no GPU memory to report ({NOT_MEASURED}, as the "
        "benchmark says too).",
        f"Paper columns: {paper.DUET}, Table 3 ({paper.PAPER_DEVICE}, PyTorch 2.0.0): different hardware, so "
        "compare the ratios to BCP rather than the seconds.",
        "A controlled measurement of every method on one device: `python -m pipeline_src benchmark`.",
    ]
    timed_names = {r.name for runs in timed.values() for r in runs}
    untimed = [r.name for r in inputs.runs if r.name not in timed_names]
    if untimed:
        notes.append(f"Times of the runs in `timed_runs` only ({', '.join(inputs.params['timed_runs']) or 'none'}): "
                     "those trained with nothing else on the machine on the day the profile's times were taken. "
                     f"Not reported: {', '.join(untimed)} (retrained later or beside other work; their times "
                     "measure that day, not the method); a row without a timed run shows —.")
    return Table(3, "Computation cost of certified training", header, rows, pd.DataFrame(records), notes)


def build_tables(inputs: ReportInputs) -> list[Table]:
    return [table1(inputs), table2(inputs), table3(inputs)]


# ------------------------------------------------------------------ writers
def to_markdown(table: Table, context: list[str]) -> str:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = [f"### Table {table.number}: {table.title}", ""]
    parts = table.parts or [(None, table.header[table.key_columns:])]
    for title, columns in parts:
        keep = list(range(table.key_columns)) + [table.header.index(c) for c in columns]
        header = [table.header[i] for i in keep]
        lines += [f"**{title}**", ""] if title else []
        lines += ["| " + " | ".join(map(escape, header)) + " |",
                  "| " + " | ".join("---" if h in TEXT_COLUMNS else "---:" for h in header) + " |"]
        lines += ["| " + " | ".join(escape(row[i]) for i in keep) + " |" for row in table.rows]
        lines += [""]
    lines += [f"- {line}" for line in context + table.notes]
    return "\n".join(lines) + "\n"


LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                 "±": r"$\pm$", "—": "---", "−": "$-$", "Δ": r"$\Delta$", "ε": r"$\varepsilon$",
                 "λ": r"$\lambda$", "×": r"$\times$", "ᵀ": r"$^\top$", "‖": r"$\|$", "²": r"$^2$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_ESCAPES.get(char, char) for char in str(text))


def to_latex(table: Table, context: list[str]) -> str:
    columns = "".join("l" if h in TEXT_COLUMNS else "r" for h in table.header)
    lines = [r"% Generated by `python -m pipeline_src tables`; needs \usepackage{booktabs}.",
             r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{latex_escape(table.title)}. {latex_escape(' '.join(c + '.' for c in context))}}}",
             rf"\label{{tab:table{table.number}}}",
             rf"\begin{{tabular}}{{{columns}}}", r"\toprule",
             " & ".join(latex_escape(h) for h in table.header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in table.rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\footnotesize"]
    lines += [latex_escape(note) + r"\par" for note in table.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table, inputs: ReportInputs) -> str:
    frame = table.data.copy()
    for key, value in _context_columns(inputs).items():
        frame[key] = value
    return frame.to_csv(index=False)


TABLES = REPORT_TABLES


# The summary metrics of a row (`RunLayout.summary`): means over its seeds, 2 decimals.
SUMMARY_KEYS = ("clean", "pgd", "certified", "similarity", "lipschitz", "n")


def summary_metrics(inputs: ReportInputs) -> dict[str, dict]:
    """{run group: {clean, pgd, certified (%), similarity (plain cosine at r, %), lipschitz
    (the guaranteed upper bound of the Lipschitz constant), n (seeds)}}: what DVC shows."""
    out = {}
    for group in inputs.groups:
        runs = inputs.of_group(group)
        measured = _table2_values(runs)
        means = {name: summary(measured[name])[0] for name in TABLE2_METRICS}
        means["similarity"] = summary([_measure(r.similarity, "similarity") for r in runs])[0]
        means["lipschitz"] = summary([r.similarity["lipschitz_upper"] for r in runs])[0]
        out[group] = {**{key: round(value, 2) if math.isfinite(value) else None for key, value in means.items()},
                      "n": len(runs)}
    return out


def write_tables(inputs: ReportInputs, layout: RunLayout, root: Path) -> list[Path]:
    context = context_lines(inputs)
    written = []
    for group, metrics in summary_metrics(inputs).items():
        path = root / layout.summary(group)
        save_json(metrics, path)
        written.append(path)
    for table in build_tables(inputs):
        markdown = to_markdown(table, context)
        for extension, text in (("md", markdown), ("html", render_html(markdown, f"Table {table.number}")),
                                ("csv", to_csv(table, inputs)), ("tex", to_latex(table, context))):
            path = root / layout.table(table.number, extension)
            save_text(text, path)
            written.append(path)
    return written


def make_tables(params: dict, root: Path) -> list[Path]:
    """The `tables` stage: Tables 1-3 (md, html, csv, tex) from the runs' metrics files."""
    written = write_tables(collect(params, root), RunLayout.of(params), root)
    print(f"[tables] wrote {len(written)} files under {RunLayout.of(params).table(1, 'md').rsplit('/', 1)[0]}/")
    return written
