"""The report stages on metrics files made here with known values: the right
numbers in the right cells, mean ± std over seeds, the paper's columns, the
refusals of missing or mismatched files, figure sizes and REPORT.md."""
from __future__ import annotations

import math
import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline_src.cli import main
from pipeline_src.config import load_params
from pipeline_src.io import save_json
from pipeline_src.paths import RunLayout, control_outputs
from pipeline_src.runs import compose_reference_run, compose_runs, control_seed, method_runs, similarity_rank
from pipeline_src.report import paper
from pipeline_src.report.collect import ReportError, collect
from pipeline_src.report.figures import DPI, FIGURES, SIZES, write_figures
from pipeline_src.report.document import make_report
from pipeline_src.report.figures import make_figures
from pipeline_src.report.tables import make_tables
from pipeline_src.report.document import similarity_findings
from pipeline_src.report.tables import (REFERENCE_ESTIMATE, summary, summary_metrics, table1, table2, table3,
                                         to_markdown)

N_TEST = 500
PROVENANCE = {"source": "sample", "path": "cifar10-sample.tar.gz", "sha256": "ab" * 32, "lossy_jpeg": True,
              "note": "JPEG images: a lossy copy of CIFAR-10",
              "images": {"train_total": 1000, "train": 900, "val": 100, "test": N_TEST}}


def _params(seeds=None, methods=("lmt", "bcp", "localbcp", "duet"), grid=None) -> dict:
    params = load_params("smoke")
    params["seeds"] = seeds
    params["methods"] = list(methods)
    params["duet"]["ranks"] = grid
    params["benchmark"]["enabled"] = False
    # Certify or predict composes LMT against BCP of the seed: only where both are trained.
    params["compose"]["methods"] = ["lmt"] if {"lmt", "bcp"} <= set(methods) else []
    return params


def _weights(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


VANILLA_WEIGHTS = _weights("vanilla")
# Table 1's measures in a similarity metrics file (`<key>_per_layer`, `<key>_mean`).
SIMILARITY_KEYS = ("similarity", "similarity_full_rank", "matched_similarity", "matched_similarity_full_rank",
                   "subspace_overlap", "matched_subspace_overlap", "subspace_overlap_u", "subspace_overlap_v",
                   "matched_subspace_overlap_u", "matched_subspace_overlap_v", "subspace_overlap_chance",
                   "unit_match_cosine")


def _similarity_measures(v: dict) -> dict:
    """Per-layer and mean values of every measure: v[key] where given, else v['similarity']
    for the cosines, 1.0 at full rank, 5.0 for the overlaps."""
    out = {}
    for key in SIMILARITY_KEYS:
        default = 1.0 if key.endswith("full_rank") else (v["similarity"] if "similarity" in key else 5.0)
        value = v.get(key, default)
        out[f"{key}_per_layer"], out[f"{key}_mean"] = [value] * 8, value
    return out


def write_fake_controls(root: Path, params: dict, values: dict | None = None) -> None:
    """The control rows' files (similarity.controls), values[control] = {measure: value}."""
    for control, rel in control_outputs(params).items():
        v = {"similarity": 0.5, "matched_similarity": 20.0, **(values or {}).get(control, {})}
        save_json({"stage": "similarity_control", "control": control, "profile": params["profile"],
                   "seed": control_seed(params) if control == "vanilla_control" else 12345,
                   "control_seed_offset": params["similarity"]["control_seed_offset"],
                   "weights_sha256": _weights(control), "vanilla_weights_sha256": VANILLA_WEIGHTS,
                   "rank": params["duet"]["rank"], **_similarity_measures(v),
                   **({"test_accuracy": 87.0} if control == "vanilla_control" else {}),
                   "lipschitz_upper": 3000.0, "lipschitz_estimate": 2900.0, "git_commit": "c0ffee"}, root / rel)


def write_fake_runs(root: Path, params: dict, values: dict) -> None:
    """Metrics files as the stages write them. values[run name] = dict of clean, pgd,
    certified, val_clean and val_certified (default: clean, certified), similarity (and the
    other measures of SIMILARITY_KEYS), seconds, device, memory
    (peak MB), reference (LocalBCP's reference estimate) (missing: defaults); values["_controls"]
    for the controls; values["_vanilla"]: keys added to the vanilla metrics (`certify_subset`)."""
    layout = RunLayout.of(params)
    eps = params["certify"]["eps"]
    n_test = min(params["certify"]["test_images"] or N_TEST, N_TEST)
    save_json(PROVENANCE, root / layout.data_provenance)
    save_json({"stage": "vanilla", "arch": params["model"]["arch"], "activation": "relu",
               "epochs": params["vanilla"]["epochs"], "seed": params["run"]["seed"], "test_accuracy": 88.5,
               "weights_sha256": VANILLA_WEIGHTS, "data": {"sha256": PROVENANCE["sha256"]}, "git_commit": "c0ffee",
               **values.get("_vanilla", {})}, root / layout.vanilla_metrics)
    save_json({"lipschitz_upper_bound": 1234.5, "lipschitz_estimate": 1200.0,
               "layers": [{"name": f"L{k}"} for k in range(8)]}, root / layout.svd_summary)
    write_fake_controls(root, params, values.get("_controls"))
    for name, run in method_runs(params).items():
        v = {"clean": 50.0, "pgd": 40.0, "certified": 30.0, "similarity": 10.0, "seconds": 2.0,
             "device": "NVIDIA H100 80GB HBM3", "memory": 2048.0, **values.get(name, {})}
        model = {**params["model"], **run.config.get("model", {})}
        weights = _weights(name)
        epochs = run.config["epochs"]
        save_json({"stage": "train", "run": name, "group": run.group, "method": run.method,
                   "config": run.config, "seed": run.seed, "arch": model["arch"],
                   "activation": model["activation"], "epochs": epochs, "eps_test": eps,
                   "selected_epoch": epochs, "weights_sha256": weights,
                   "val_certified_accuracy": v.get("val_certified", v["certified"]),
                   "data": {"sha256": PROVENANCE["sha256"]},
                   "timing": {"device": v["device"], "seconds_per_epoch_mean": v["seconds"],
                              "peak_memory_mb": v["memory"]},
                   "git_commit": "c0ffee"}, root / layout.train(name, "metrics.json"))
        history = root / layout.train(name, "history.csv")
        with open(history, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["epoch", "clean_loss", "clean_accuracy", "robust_loss", "certified_accuracy",
                             "val_clean_accuracy", "val_certified_accuracy", "eps", "kappa"])
            for epoch in range(1, epochs + 1):
                warm = epoch <= run.config["warmup_epochs"]
                writer.writerow([epoch, 2.0 / epoch, 10.0 * epoch, "nan" if warm else 3.0, "nan" if warm else 5.0,
                                 v.get("val_clean", v["clean"]), v.get("val_certified", v["certified"]),
                                 0.0 if warm else eps, 1.0 if warm else 0.0])
        radii = [0.0, eps, 2 * eps]
        save_json({"stage": "certify", "method": name, "eps": eps, "test_images": n_test,
                   "weights_sha256": weights, "clean_accuracy": v["clean"],
                   "certified_accuracy": {"bcp": v["certified"]}, "headline_certifier": "bcp",
                   "headline_certified_accuracy": v["certified"],
                   "radius_curve": {"radii": radii, "bcp": [v["clean"], v["certified"], 0.0]},
                   "spectral_norms": {"method": "upper: test", "upper_over_estimate": [1.01] * 8},
                   **({"reference_estimates": {"local_masked_power_iteration": v["reference"], "note": "estimate"}}
                      if "reference" in v else {}),
                   "numerics": "fp32", "git_commit": "c0ffee"}, root / layout.certify(name, "metrics.json"))
        save_json({"stage": "pgd", "method": name, "eps": eps, "test_images": n_test, "weights_sha256": weights,
                   "steps": params["pgd"]["steps"], "restarts": params["pgd"]["restarts"],
                   "attacks": ["pgd_l2_restart0", "apgd_l2"], "pgd_accuracy": v["pgd"], "certified_points": 7,
                   "certified_points_broken": 0, "git_commit": "c0ffee"}, root / layout.attack(name, "metrics.json"))
        save_json({"stage": "similarity", "method": name, "rank": similarity_rank(params, name),
                   "init_from": run.config.get("init_from", "scratch"), "weights_sha256": weights,
                   "vanilla_weights_sha256": VANILLA_WEIGHTS, **_similarity_measures(v),
                   "lipschitz_upper": 100.0, "lipschitz_estimate": 90.0,
                   "git_commit": "c0ffee"}, root / layout.similarity(name, "metrics.json"))
    write_fake_compositions(root, params, values)


def write_fake_compositions(root: Path, params: dict, values: dict) -> None:
    """The compose stage's metrics of every composed run: values[run name]["compose"] = dict of
    clean, pgd (its attacked accuracy), certified (the composite at the chosen tau), broken
    (default: none)."""
    layout = RunLayout.of(params)
    point = lambda clean, certified: {"clean_accuracy": clean, "certified_accuracy": certified,  # noqa: E731
                                      "certified_accuracy_2eps": certified / 2, "certified_model_answers": 80.0}
    for name in compose_runs(params):
        v = {"clean": 55.0, "pgd": 45.0, "certified": 29.0, "broken": 0,
             **values.get(name, {}).get("compose", {})}
        alone = values.get(name, {})
        reference = compose_reference_run(params, name)
        reference_values = {"certified": 30.0, **values.get(reference, {})}
        save_json({"stage": "compose", "method": name, "eps": params["certify"]["eps"],
                   "test_images": min(params["certify"]["test_images"] or N_TEST, N_TEST),
                   "weights_sha256": _weights(name), "taus_over_eps": params["compose"]["taus"],
                   "reference": {"run": reference, "certified_slack": params["compose"]["certified_slack"],
                                 "val_certified_accuracy": reference_values.get("val_certified",
                                                                                reference_values["certified"])},
                   "guide_weights_sha256": {"vanilla": VANILLA_WEIGHTS, "untrained": "e" * 64},
                   "chosen": {"tau": 0.2, "tau_over_eps": 0.2, "meets_reference": True,
                              "test": point(v["clean"], v["certified"])},
                   "certified_model_alone": point(alone.get("clean", 50.0), alone.get("certified", 30.0)),
                   "controls_at_chosen_tau": {"vanilla_control": point(54.0, v["certified"]),
                                              "untrained": point(44.0, v["certified"])},
                   "attack": {"robust_accuracy": v["pgd"], "certified_points": 9,
                              "certified_points_broken": v["broken"], "steps": params["pgd"]["steps"],
                              "restarts": params["pgd"]["restarts"]},
                   "git_commit": "c0ffee"}, root / layout.compose(name, "metrics.json"))


def _row(table, label: str) -> dict:
    rows = [dict(zip(table.header, row)) for row in table.rows if row[0] == label]
    assert len(rows) == 1, (label, table.rows)
    return rows[0]


def test_table2_puts_each_number_in_its_cell_beside_the_papers(tmp_path: Path):
    params = _params()
    write_fake_runs(tmp_path, params, {"bcp": {"clean": 60.0, "pgd": 55.0, "certified": 45.0},
                                       "duet": {"clean": 64.5, "pgd": 56.0, "certified": 44.0},
                                       "lmt": {"clean": 58.25}})
    table = table2(collect(params, tmp_path))
    bcp, duet, lmt = _row(table, "BCP"), _row(table, "Duet"), _row(table, "LMT")
    assert bcp["Clean (%)"] == "60.00" and bcp["Clean, paper (%)"] == "65.70"
    assert bcp["Certified (%)"] == "45.00" and bcp["Certified, paper (%)"] == "51.30"
    assert bcp["PGD (%)"] == "55.00" and bcp["PGD, paper (%)"] == "60.80"
    assert lmt["Clean (%)"] == "58.25" and lmt["Clean, paper (%)"] == "63.10"
    # Duet, as the paper prints it: its difference to BCP, ours measured and the paper's.
    assert duet["Clean (%)"] == "64.50 (+4.50)" and duet["Certified (%)"] == "44.00 (−1.00)"
    assert duet["Clean, paper (%)"] == "69.46 (+3.76)" and duet["Certified, paper (%)"] == "50.37 (−0.93)"
    assert duet["Δ clean (ours − paper)"] == "−4.96" and duet["Δ certified (ours − paper)"] == "−6.37"
    assert bcp["Δ PGD (ours − paper)"] == "−5.80"
    assert duet["Paper's source"] == paper.DUET and bcp["Paper's source"] == paper.LEE_2020
    vanilla = _row(table, "Vanilla")
    assert vanilla["Clean (%)"] == "88.50" and vanilla["Clean, paper (%)"] == "90.06"
    data = table.data.set_index("run_group")
    assert data.loc["duet", "clean_diff_bcp"] == pytest.approx(4.5)
    assert data.loc["duet", "certified_diff_paper"] == pytest.approx(44.0 - 50.37)


def test_several_seeds_give_mean_and_sample_std(tmp_path: Path):
    params = _params(seeds=[0, 1, 2], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {f"bcp-s{s}": {"clean": 60.0 + 2 * s, "seconds": 1.0 + s}
                                       for s in range(3)})
    inputs = collect(params, tmp_path)
    assert inputs.seeds == [0, 1, 2] and inputs.groups == ["bcp", "duet"]
    assert _row(table2(inputs), "BCP")["Clean (%)"] == "62.00 ± 2.00"
    assert _row(table3(inputs), "BCP")["Time per epoch (s)"] == "2.00 ± 1.00"
    assert _row(table2(inputs), "Duet")["Clean (%)"] == "50.00 ± 0.00 (−12.00)"
    data = table2(inputs).data.set_index("run_group")
    assert data.loc["bcp", "n"] == 3 and data.loc["bcp", "clean_std"] == pytest.approx(2.0)


def test_table3_reports_the_times_of_timed_runs_only(tmp_path: Path):
    """A run retrained later (another day, another machine, beside other work) keeps its
    accuracies in Table 2 but not its time in Table 3: `timed_runs` names the runs whose
    times are a measurement."""
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp-s0": {"seconds": 2.0}, "bcp-s1": {"seconds": 9.0},
                                       "duet-s0": {"seconds": 3.0}, "duet-s1": {"seconds": 30.0}})
    everything = table3(collect(params, tmp_path))
    assert _row(everything, "BCP")["Time per epoch (s)"] == f"5.50 ± {49 ** 0.5 / 2 ** 0.5:.2f}"
    assert not any("timed_runs" in note for note in everything.notes)
    three = table3(collect({**params, "timed_runs": ["bcp-s0", "duet-s0"]}, tmp_path))
    assert _row(three, "BCP")["Time per epoch (s)"] == "2.00" and _row(three, "Duet")["× BCP"] == "1.50"
    assert any("Not reported: bcp-s1, duet-s1" in note for note in three.notes)
    untimed_duet = table3(collect({**params, "timed_runs": ["bcp-s0"]}, tmp_path))
    assert _row(untimed_duet, "Duet")["Time per epoch (s)"] == "—" == _row(untimed_duet, "Duet")["× BCP"]
    assert _row(table2(collect({**params, "timed_runs": []}, tmp_path)), "Duet")["Clean (%)"] != "—"


def test_summary_is_mean_and_sample_std():
    mean, std, n = summary([1.0, 2.0, 6.0])
    assert (mean, n) == (3.0, 3) and std == pytest.approx(((4 + 1 + 9) / 2) ** 0.5)
    assert summary([5.0])[0] == 5.0 and summary([5.0])[1] != summary([5.0])[1]  # nan


def test_grid_points_have_no_paper_column_and_table1_table3_cells(tmp_path: Path):
    params = _params(methods=("bcp", "duet"), grid=[1, 4])
    write_fake_runs(tmp_path, params, {"duet": {"similarity": 42.0, "seconds": 3.0},
                                       "duet-r1-l1-paper": {"similarity": 7.0}})
    inputs = collect(params, tmp_path)
    one = table1(inputs)
    assert _row(one, "Duet")["Cosine, r (%)"] == "42.0" and _row(one, "Duet")["r"] == str(params["duet"]["rank"])
    assert _row(one, "Duet")["Similarity, paper (%)"] == "95.6"
    grid = _row(one, "Duet r=1 λ=1 paper")
    assert grid["Similarity, paper (%)"] == "—" and grid["Lipschitz, paper"] == "—"
    assert grid["r"] == "1" and grid["Cosine, r (%)"] == "7.0"   # measured at its own rank
    assert _row(one, "Vanilla")["Lipschitz bound"] == "1234"
    three = table3(inputs)
    assert _row(three, "Duet")["× BCP"] == "1.50" and _row(three, "Duet")["Time, paper (s)"] == "38.5"
    assert _row(three, "Duet")["× BCP, paper"] == f"{38.5 / 14.8:.2f}"
    assert _row(three, "Duet")["Peak GPU memory (GB)"] == "2.00"
    assert "NVIDIA H100" in _row(three, "Duet")["Device"]


def test_stage_writes_markdown_csv_latex_with_the_context(tmp_path: Path):
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    written = make_tables(params, tmp_path)
    layout = RunLayout.of(params)
    # md, html, csv, tex for each of the three tables, and one summary per row (bcp, duet)
    assert len(written) == 3 * 4 + 2
    md = (tmp_path / layout.table(2, "md")).read_text()
    for fact in ("lossy JPEG copy", "6C2F", "ε = 36/255", "Seeds: 0, 1 (n = 2", "git c0ffee",
                 f"{params['bcp']['epochs']} epochs"):
        assert fact in md, fact
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2   # the main results, then the paired differences
    for header, separator, *rows in tables:
        assert rows and all(line.count("|") == header.count("|") for line in [separator, *rows])
    frame = list(csv.DictReader(io.StringIO((tmp_path / layout.table(2, "csv")).read_text())))
    bcp = next(r for r in frame if r["run_group"] == "bcp")
    assert float(bcp["clean_mean"]) == 50.0 and float(bcp["clean_paper"]) == 65.7
    assert bcp["data_source"] == "sample" and bcp["lossy_jpeg"] == "True" and bcp["git_commit"] == "c0ffee"
    assert bcp["arch"] == "6C2F" and bcp["seeds"] == "0 1" and int(bcp["epochs"]) == params["bcp"]["epochs"]
    tex = (tmp_path / layout.table(2, "tex")).read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex and "%" not in tex.split("\\toprule")[1].replace(r"\%", "")
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    columns = len(table2(collect(params, tmp_path)).header)
    assert all(line.count("&") - line.count(r"\&") == columns - 1 for line in body)


def test_missing_metrics_are_refused_with_the_file_named(tmp_path: Path, capsys):
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    missing = tmp_path / RunLayout.of(params).attack("duet", "metrics.json")
    missing.unlink()
    with pytest.raises(ReportError, match=f"{missing}: missing; run the pgd stage of duet"):
        collect(params, tmp_path)


@pytest.mark.parametrize("stage,key,value", [
    ("train", "config", {"epochs": 999}),
    ("train", "seed", 7),
    ("certify", "eps", 0.5),
    ("certify", "weights_sha256", "0" * 64),
    ("pgd", "steps", 1),
    ("similarity", "rank", 1),
])
def test_metrics_of_another_configuration_are_refused(tmp_path: Path, stage, key, value):
    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    layout = RunLayout.of(params)
    path = tmp_path / {"train": layout.train, "certify": layout.certify, "pgd": layout.attack,
                       "similarity": layout.similarity}[stage]("bcp", "metrics.json")
    metrics = json.loads(path.read_text())
    metrics[key] = {**metrics[key], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(metrics))
    with pytest.raises(ReportError) as err:
        collect(params, tmp_path)
    assert str(err.value).startswith(f"{path}: {key} is") and "another configuration" in str(err.value)


def test_a_broken_certificate_is_refused(tmp_path: Path):
    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / RunLayout.of(params).attack("bcp", "metrics.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "certified_points_broken": 1}))
    with pytest.raises(ReportError, match="unsound"):
        collect(params, tmp_path)


def test_every_declared_figure_has_a_size_and_a_builder():
    from pipeline_src.report.figures import BUILDERS

    assert set(FIGURES) == set(SIZES) == set(BUILDERS)


def test_figures_are_nonempty_images_of_the_expected_size(tmp_path: Path):
    params = _params(seeds=[0, 1], methods=("lmt", "bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp-s1": {"clean": 70.0}})
    layout = RunLayout.of(params)
    written = write_figures(collect(params, tmp_path), layout, tmp_path)
    assert len(written) == 2 * len(FIGURES)
    for name in FIGURES:
        png = tmp_path / layout.figure(name, "png")
        with Image.open(png) as image:
            width, height = SIZES[name]
            assert image.size == (round(width * DPI), round(height * DPI)), name
            assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 10, f"{name} is blank"
        pdf = (tmp_path / layout.figure(name, "pdf")).read_bytes()
        assert pdf.startswith(b"%PDF") and len(pdf) > 5000, name


def test_report_gathers_tables_figures_and_provenance(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    text = make_report(params, tmp_path).read_text()
    layout = RunLayout.of(params)
    for number in (1, 2, 3):
        assert (tmp_path / layout.table(number, "md")).read_text() in text
    for name in FIGURES:
        assert f"](figures/{name}.png)" in text
    assert "lossy" in text and "`c0ffee`" in text and "broken: 0" in text and "88.50" in text


def test_cli_report_error_is_one_line(tmp_path: Path, monkeypatch, capsys):
    import pipeline_src.cli as cli

    params = _params(methods=("bcp",))
    monkeypatch.setattr(cli, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(cli, "load_params", lambda profile, root: params)
    assert main(["tables", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "provenance.json: missing; run the data stage first" in err
    assert err.count("\n") == 1


def test_report_shows_the_benchmark_stage_when_enabled(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    params["benchmark"].update(enabled=True, archs=["4C3F", "6C2F"])
    write_fake_runs(tmp_path, params, {})
    layout = RunLayout.of(params)
    rows = lambda scale: [  # noqa: E731
        {"method": m, "batch_size": 128, "seconds_per_epoch": s * scale, "peak_memory_mb": 100.0,
         "ratio_to_floor": s, "ratio_to_bcp": s / 3.0} for m, s in (("floor", 1.0), ("bcp", 3.0), ("duet", 3.6))]
    for arch, scale in (("4C3F", 1.0), ("6C2F", 1.5)):
        save_json({"device": "NVIDIA H100", "torch": "2.11", "arch": arch, "train_images": 45000,
                   "timed_steps": 20, "rows": rows(scale)}, tmp_path / layout.benchmark_result(arch))
    save_json({"device": "NVIDIA H100", "archs": ["4C3F", "6C2F"],
               "seconds_per_epoch": {"bcp": {"4C3F": 3.0, "6C2F": 4.5}},
               "growth_over_first_arch": {"bcp": {"4C3F": 1.0, "6C2F": 1.5}}}, tmp_path / layout.benchmark_depth)
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    text = make_report(params, tmp_path).read_text()
    assert "## Cost, measured by the benchmark stage" in text and "NVIDIA H100" in text
    assert "| duet | 128 | 5.40 | 100 | 3.60 | 1.20 |" in text     # the 6C2F row: x floor, x BCP
    assert "| bcp | 3.00 (×1.00) | 4.50 (×1.50) |" in text


# ------------------------------------------------------------------ Table 1's measures, controls, init, paired seeds
def test_table1_shows_every_measure_and_the_labelled_control_rows(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {
        "duet": {"similarity": 3.0, "similarity_full_rank": 2.0, "matched_similarity": 61.0,
                 "matched_similarity_full_rank": 40.0, "subspace_overlap": 30.0, "matched_subspace_overlap": 55.0},
        "_controls": {"vanilla_control": {"matched_similarity": 21.0}, "random": {"matched_similarity": 4.0}}})
    inputs = collect(params, tmp_path)
    assert set(inputs.controls) == {"vanilla_control", "random"}
    one = table1(inputs)
    duet = _row(one, "Duet")
    assert (duet["Cosine, r (%)"], duet["Cosine, full rank (%)"], duet["Matched cosine, r (%)"],
            duet["Matched cosine, full rank (%)"], duet["Subspace overlap, r (%)"],
            duet["Matched subspace overlap, r (%)"]) == ("3.0", "2.0", "61.0", "40.0", "30.0", "55.0")
    assert duet["Similarity, paper (%)"] == "95.6" and duet["Δ cosine, r (ours − paper)"] == "−92.6"
    assert duet["Init"] == "scratch" and duet["Lipschitz bound"] == "100" and duet["Lipschitz, paper"] == "7.8"
    second, random = _row(one, "Control: vanilla, other seed"), _row(one, "Control: random network (at init)")
    assert second["Matched cosine, r (%)"] == "21.0" and random["Matched cosine, r (%)"] == "4.0"
    assert second["Init"] == f"seed {control_seed(params)}" and second["Lipschitz bound"] == "3000"
    assert second["Similarity, paper (%)"] == "—" and random["Lipschitz, paper"] == "—"
    data = one.data.set_index("run_group")
    assert data.loc["control_vanilla_control", "row_kind"] == "control"
    assert data.loc["control_vanilla_control", "control_test_accuracy"] == 87.0
    assert data.loc["duet", "matched_similarity_mean"] == 61.0 and data.loc["duet", "init_from"] == "scratch"
    assert data.loc["duet", "subspace_overlap_u_mean"] == 5.0   # the two sides, in the CSV only


def test_controls_missing_or_against_another_vanilla_model_are_refused(tmp_path: Path):
    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / control_outputs(params)["random"]
    path.write_text(json.dumps({**json.loads(path.read_text()), "vanilla_weights_sha256": "0" * 64}))
    with pytest.raises(ReportError, match=f"{path}: vanilla_weights_sha256 is"):
        collect(params, tmp_path)
    path.unlink()
    with pytest.raises(ReportError, match=f"{path}: missing; run the similarity_control stage"):
        collect(params, tmp_path)
    params["similarity"] = {"controls": False, "control_seed_offset": 1}
    assert collect(params, tmp_path).controls == {}
    assert "Control" not in " ".join(row[0] for row in table1(collect(params, tmp_path)).rows)


def _compare_with_another_guide(root: Path, params: dict, run: str) -> Path:
    path = root / RunLayout.of(params).similarity(run, "metrics.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "vanilla_weights_sha256": "f" * 64,
                                "similarity_mean": 77.0, "lipschitz_upper": 400.0}))
    return path


def test_a_run_trained_without_the_guide_keeps_all_but_its_rotations_when_compared_with_another(tmp_path: Path):
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp-s0": {"clean": 60.0}, "bcp-s1": {"clean": 62.0}})
    _compare_with_another_guide(tmp_path, params, "bcp-s0")
    inputs = collect(params, tmp_path)
    assert [r.name for r in inputs.other_guide_runs] == ["bcp-s0"]
    assert _row(table2(inputs), "BCP")["Clean (%)"] == "61.00 ± 1.41"       # both seeds
    one = table1(inputs)
    bcp = _row(one, "BCP")
    assert bcp["Cosine, r (%)"] == "10.0"                     # bcp-s1 only: 77 is another guide's
    assert bcp["Lipschitz bound"] == "250 ± 2.1e+02"             # both seeds: 400 and 100
    assert one.data.set_index("run_group").loc["bcp", "n"] == 1
    assert any("bcp-s0" in note and "ffffffff" in note for note in one.notes)
    assert "bcp-s0" not in " ".join(one.notes[:-1])
    assert summary_metrics(inputs)["bcp"]["similarity"] == 10.0
    make_figures(params, tmp_path)                                # the per-layer figure skips bcp-s0


def test_table1_reading_needs_two_methods_compared_with_this_guide(tmp_path: Path):
    """The cpu campaign's seed 0: only Duet's rows have rotation measures against the pinned
    guide; no ordering (and no "closest levels") can be read from one method."""
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    _compare_with_another_guide(tmp_path, params, "bcp")
    text = "\n".join(similarity_findings(collect(params, tmp_path)))
    assert "| scratch | plain cosine at r | Duet 10.0 | one method only |" in text
    assert ("**Reading:** none: only Duet has rotation measures against this vanilla model, and the paper's "
            "ordering needs two of its methods (bcp: compared with another guide, Table 1's note).") in text
    assert "closest levels" not in text


def test_a_run_trained_with_the_guide_must_be_compared_with_it(tmp_path: Path):
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    path = _compare_with_another_guide(tmp_path, params, "duet-s1")
    with pytest.raises(ReportError, match=f"{path}: vanilla_weights_sha256 is"):
        collect(params, tmp_path)


def test_a_grid_runs_similarity_must_be_at_its_own_rank(tmp_path: Path):
    params = _params(methods=("bcp", "duet"), grid=[1, 4])
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / RunLayout.of(params).similarity("duet-r1-l1-paper", "metrics.json")
    assert json.loads(path.read_text())["rank"] == 1
    collect(params, tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), "rank": params["duet"]["rank"]}))
    with pytest.raises(ReportError, match="rank is 4 but the params ask for 1"):
        collect(params, tmp_path)


def test_table2_paired_duet_minus_bcp_over_the_shared_seeds(tmp_path: Path):
    params = _params(seeds=[0, 1, 2], methods=("bcp", "duet"), grid=[1, 4])
    values = {}
    for s in range(3):
        values[f"bcp-s{s}"] = {"clean": 60.0 + 2 * s, "pgd": 50.0, "certified": 40.0 + s}
        values[f"duet-s{s}"] = {"clean": 61.0 + 3 * s, "pgd": 50.0, "certified": 40.0}
    write_fake_runs(tmp_path, params, values)
    two = table2(collect(params, tmp_path))
    duet = _row(two, "Duet")
    # Per seed: clean +1, +2, +3 (mean 2, SE 1/sqrt(3)); certified 0, −1, −2. The 95 %
    # t-interval with 2 degrees of freedom: mean ± 4.3027 SE = ± 2.4841.
    assert duet["Duet − BCP, clean (paired)"] == f"+2.00 ± {1 / 3 ** 0.5:.2f} [−0.48, +4.48]"
    assert duet["Duet − BCP, certified (paired)"] == f"−1.00 ± {1 / 3 ** 0.5:.2f} [−3.48, +1.48]"
    assert duet["Duet − BCP, PGD (paired)"] == "+0.00 ± 0.00 [+0.00, +0.00]" and duet["Paired seeds (n)"] == "3"
    assert _row(two, "Duet r=1 λ=1 paper")["Paired seeds (n)"] == "3"
    assert _row(two, "BCP")["Duet − BCP, clean (paired)"] == "—"
    # In markdown, two tables: the main results, then the paired differences (the CSV keeps
    # every column in one).
    markdown = to_markdown(two, [])
    main, paired = markdown.split("**Main results**")[1].split("**Paired differences (Duet − BCP)")
    first_header = next(line for line in main.splitlines() if line.startswith("| Method |"))
    second_header = next(line for line in paired.splitlines() if line.startswith("| Method |"))
    assert "| Clean (%) |" in first_header and "(paired)" not in first_header
    assert "Duet − BCP, clean (paired)" in second_header and "Clean (%)" not in second_header
    for text in (main, paired):
        assert sum(line.startswith(("| Duet |", "| BCP |")) for line in text.splitlines()) == 2
    assert f"+2.00 ± {1 / 3 ** 0.5:.2f}" in paired and f"+2.00 ± {1 / 3 ** 0.5:.2f}" not in main
    data = two.data.set_index("run_group")
    assert data.loc["duet", "clean_paired_diff_bcp_mean"] == pytest.approx(2.0)
    assert data.loc["duet", "clean_paired_diff_bcp_se"] == pytest.approx(1 / 3 ** 0.5)
    assert data.loc["duet", "clean_paired_diff_ci95_low"] == pytest.approx(2.0 - 4.302653 / 3 ** 0.5, abs=1e-5)
    assert data.loc["duet", "clean_paired_diff_ci95_high"] == pytest.approx(2.0 + 4.302653 / 3 ** 0.5, abs=1e-5)
    assert data.loc["duet", "paired_n"] == 3 and data.loc["duet", "paired_with"] == "bcp"


def test_table2_pairs_a_named_variant_with_its_methods_own_run(tmp_path: Path):
    """Issue 22: BCP's frontier and guided variants (kappa_final moved, init_from moved) are
    paired with BCP's own run seed by seed (the same seed family: the same batches)."""
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    params["bcp"]["variants"] = {"kappa_0p5": {"kappa_final": 0.5}}
    values = {}
    for s in range(2):
        values[f"bcp-s{s}"] = {"clean": 60.0 + s, "certified": 40.0}
        values[f"bcp-kappa_0p5-s{s}"] = {"clean": 63.0 + 2 * s, "certified": 38.0}
    write_fake_runs(tmp_path, params, values)
    two = table2(collect(params, tmp_path))
    title = "Duet − BCP / variant − its method"
    variant = _row(two, "BCP kappa_0p5")
    assert variant[f"{title}, clean (paired)"].startswith("+3.50 ± 0.50")     # +3, +4
    assert variant[f"{title}, certified (paired)"].startswith("−2.00 ± 0.00") and variant["Paired seeds (n)"] == "2"
    assert _row(two, "BCP")[f"{title}, clean (paired)"] == "—"
    data = two.data.set_index("run_group")
    assert data.loc["bcp-kappa_0p5", "paired_with"] == "bcp"
    assert data.loc["duet", "paired_with"] == "bcp"



def _validation_section(report: str) -> list[str]:
    start = report.index("## Settings chosen on the validation split")
    return report[start:].split("\n## ")[0].splitlines()


@pytest.mark.parametrize("close", [True, False])
def test_report_chooses_a_guided_setting_on_the_validation_split(tmp_path: Path, close: bool):
    """Issue 22: among a guided method's settings whose validation certified accuracy is within
    0.5 points of BCP's, the highest validation clean accuracy; none that close: the highest
    validation certified accuracy. The test numbers (clean, certified) never choose, nor does
    the no-guide control, however well it scores."""
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    params["duet"]["variants"] = {"lam": {"lambda": 0.01}, "polar": {"sim_form": "cosine"},
                                  "ctrl": {"guide": "untrained"}}
    drop = 0.0 if close else 1.0
    values = {}
    for s in range(2):
        values[f"bcp-s{s}"] = {"val_clean": 50.0, "val_certified": 30.0}
        values[f"duet-s{s}"] = {"val_clean": 55.0, "val_certified": 29.8 - drop, "clean": 90.0}
        values[f"duet-lam-s{s}"] = {"val_clean": 60.0, "val_certified": 29.0 - drop + s * 0.4}
        values[f"duet-polar-s{s}"] = {"val_clean": 58.0, "val_certified": 29.6 - drop}
        values[f"duet-ctrl-s{s}"] = {"val_clean": 70.0, "val_certified": 35.0}
    write_fake_runs(tmp_path, params, values)
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    lines = _validation_section(make_report(params, tmp_path).read_text())
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith("| Duet |")}
    assert sorted(rows) == ["Duet", "Duet lam", "Duet polar"]          # the control is no candidate
    assert rows["Duet lam"].split(" | ")[4:7] == ["60.0", (f"{29.2 - drop:.1f}").replace("-", "−"),
                                                  f"−{0.8 + drop:.1f}"]
    chosen = [label for label, line in rows.items() if "**chosen**" in line]
    if close:
        assert chosen == ["Duet polar"] and "none within" not in rows["Duet polar"]
    else:
        assert chosen == ["Duet"] and "(none within 0.5 points)" in rows["Duet"]

def test_table2_paired_difference_with_one_seed_has_no_standard_error(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp": {"clean": 60.0}, "duet": {"clean": 64.5}})
    duet = _row(table2(collect(params, tmp_path)), "Duet")
    assert duet["Duet − BCP, clean (paired)"] == "+4.50 ± n/a" and duet["Paired seeds (n)"] == "1"


def test_table2_shows_the_localbcp_reference_estimate_when_present(tmp_path: Path):
    params = _params(methods=("bcp", "localbcp"))
    write_fake_runs(tmp_path, params, {"localbcp": {"certified": 30.0, "reference": 54.25}})
    two = table2(collect(params, tmp_path))
    assert _row(two, "LocalBCP")[REFERENCE_ESTIMATE] == "54.25"
    assert _row(two, "BCP")[REFERENCE_ESTIMATE] == "" and _row(two, "Vanilla")[REFERENCE_ESTIMATE] == ""
    assert _row(two, "LocalBCP")["Certified (%)"] == "30.00"   # the certificate, not the estimate


def test_init_column_and_vanilla_init_rows_pair_with_their_own_bcp(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    params["init_variants"] = ["vanilla_init"]
    write_fake_runs(tmp_path, params, {"bcp": {"clean": 60.0}, "duet": {"clean": 61.0},
                                       "bcp-vinit": {"clean": 70.0}, "duet-vinit": {"clean": 75.0}})
    inputs = collect(params, tmp_path)
    one, two = table1(inputs), table2(inputs)
    assert _row(one, "BCP (vanilla init)")["Init"] == "vanilla init" and _row(one, "BCP")["Init"] == "scratch"
    assert _row(one, "Duet (vanilla init)")["Similarity, paper (%)"] == "95.6"   # the paper's column, unchanged
    assert _row(two, "Duet (vanilla init)")["Duet − BCP, clean (paired)"] == "+5.00 ± n/a"
    assert _row(two, "Duet (vanilla init)")["Clean (%)"] == "75.00 (+5.00)"
    assert _row(two, "Duet")["Duet − BCP, clean (paired)"] == "+1.00 ± n/a"
    assert two.data.set_index("run_group").loc["duet-vinit", "paired_with"] == "bcp-vinit"


def _findings_params_and_values(vanilla_init: bool) -> tuple[dict, dict]:
    params = _params(methods=("lmt", "bcp", "localbcp", "duet"))
    params["init_variants"] = ["vanilla_init"] if vanilla_init else None
    matched = {"lmt": 45.0, "bcp": 65.0, "localbcp": 75.0, "duet": 90.0}          # the paper's ordering
    plain = {"lmt": 1.0, "bcp": 3.0, "localbcp": 2.0, "duet": 0.5}                # not
    values = {m: {"matched_similarity": matched[m], "similarity": plain[m]} for m in matched}
    if vanilla_init:   # plain cosine of vanilla_init runs: the ordering and the paper's levels within 1 point
        values.update({f"{m}-vinit": {"similarity": paper.TABLE1[m]["similarity"] + 0.5,
                                      "matched_similarity": 99.0} for m in matched})
    return params, values


def test_report_paragraph_says_which_measure_reproduces_the_papers_ordering(tmp_path: Path):
    params, values = _findings_params_and_values(vanilla_init=False)
    write_fake_runs(tmp_path, params, values)
    text = "\n".join(similarity_findings(collect(params, tmp_path)))
    assert ("| scratch | channel-matched cosine at r | Duet 90.0 > LocalBCP 75.0 > BCP 65.0 > LMT 45.0 | **yes** | "
            f"{(5.6 + 2.8 + 5.3 + 6.6) / 4:.1f} | 6.6 |") in text
    assert "| scratch | plain cosine at r | BCP 3.0 > LocalBCP 2.0 > LMT 1.0 > Duet 0.5 | no |" in text
    assert "**Reading:** the channel-matched cosine at r of the scratch runs reproduces the paper's ordering" in text
    assert "The vanilla_init rows are absent" in text and "`init_from: vanilla_init` in a method block" in text
    assert "a second vanilla model (other seed): plain cosine at r 0.5" in text


def test_report_paragraph_with_vanilla_init_rows(tmp_path: Path):
    params, values = _findings_params_and_values(vanilla_init=True)
    write_fake_runs(tmp_path, params, values)
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    text = make_report(params, tmp_path).read_text()
    assert ("| vanilla init | plain cosine at r | Duet 96.1 > LocalBCP 78.3 > BCP 70.8 > LMT 52.1 | **yes** | 0.5 |"
            in text)
    assert "**Reading:** the plain cosine at r of the vanilla init runs reproduces the paper's ordering" in text
    assert "channel-matched cosine at r (scratch)" in text      # the ordering also holds there
    assert "The vanilla_init rows are absent" not in text
    assert ("| vanilla init | channel-matched cosine at r | Duet 99.0 = LocalBCP 99.0 = BCP 99.0 = LMT 99.0 | no |"
            in text)


# ------------------------------------------------------------------ one test subset for every row (issue 14)
def test_table2_vanilla_row_is_on_the_certified_rows_test_subset(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    n_test = params["certify"]["test_images"]
    assert n_test < N_TEST   # a subset, not the whole split
    write_fake_runs(tmp_path, params, {"_vanilla": {"certify_subset": {"images": n_test, "accuracy": 77.25}}})
    table = table2(collect(params, tmp_path))
    vanilla, bcp, duet = _row(table, "Vanilla"), _row(table, "BCP"), _row(table, "Duet")
    assert vanilla["Clean (%)"] == "77.25"                      # the subset's, not test_accuracy's 88.50
    assert vanilla["Δ clean (ours − paper)"] == f"{77.25 - paper.TABLE2['vanilla']['clean']:.2f}".replace("-", "−")
    assert vanilla["Test images"] == bcp["Test images"] == duet["Test images"] == str(n_test)
    data = table.data.set_index("run_group")
    assert data.loc["vanilla", "test_images"] == n_test
    assert data.loc["vanilla", "test_images_source"] == "certify_subset"
    assert data.loc["vanilla", "clean_mean"] == 77.25 and bool(data.loc["vanilla", "same_test_subset"])
    assert any(f"the vanilla one too, is measured on {n_test} of the {N_TEST} test images" in n for n in table.notes)


def test_table2_vanilla_row_falls_back_to_the_whole_split_labelled(tmp_path: Path):
    """A vanilla metrics file older than `certify_subset` (results/gpu_bcp's): the whole test
    split's accuracy, with its size and the label in the row, and a note saying so."""
    params = _params(methods=("bcp",))
    n_test = params["certify"]["test_images"]
    write_fake_runs(tmp_path, params, {})
    table = table2(collect(params, tmp_path))
    vanilla = _row(table, "Vanilla")
    assert vanilla["Clean (%)"] == "88.50" and vanilla["Test images"] == f"{N_TEST} (whole test split)"
    assert _row(table, "BCP")["Test images"] == str(n_test)
    note = next(n for n in table.notes if n.startswith("Test images"))
    assert f"the vanilla row's clean accuracy is on the whole test split ({N_TEST} images), not on that subset" in note
    data = table.data.set_index("run_group")
    assert data.loc["vanilla", "test_images_source"] == "whole_test_split"
    assert not bool(data.loc["vanilla", "same_test_subset"]) and data.loc["vanilla", "test_images"] == N_TEST


def test_table2_vanilla_whole_split_is_the_subset_when_every_image_is_certified(tmp_path: Path):
    params = _params(methods=("bcp",))
    params["certify"]["test_images"] = None          # every test image
    write_fake_runs(tmp_path, params, {})
    table = table2(collect(params, tmp_path))
    assert _row(table, "Vanilla")["Test images"] == _row(table, "BCP")["Test images"] == str(N_TEST)
    assert any(f"the vanilla one too, is measured on the whole test split ({N_TEST} images)" in n for n in table.notes)


def test_vanilla_subset_of_another_size_is_refused(tmp_path: Path):
    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {"_vanilla": {"certify_subset": {"images": 7, "accuracy": 50.0}}})
    path = tmp_path / RunLayout.of(params).vanilla_metrics
    with pytest.raises(ReportError, match=f"{path}: certify_subset.images is 7 but the params ask for "
                                          f"{params['certify']['test_images']}"):
        collect(params, tmp_path)


def test_tables_context_says_the_test_subset(tmp_path: Path):
    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    make_tables(params, tmp_path)
    md = (tmp_path / RunLayout.of(params).table(2, "md")).read_text()
    assert (f"test images certified and attacked: {params['certify']['test_images']} of the {N_TEST} test images, "
            "drawn across the classes") in md


# ------------------------------------------------------------------ REPORT.md names the profile's command
def test_report_gives_the_command_of_its_profile(tmp_path: Path):
    params = _params(methods=("bcp",))
    assert params["profile"] == "smoke"
    write_fake_runs(tmp_path, params, {})
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    text = make_report(params, tmp_path).read_text()
    assert ("made by `snakemake --cores 1 all --config profile=smoke` (or `dvc repro config/smoke/dvc.yaml`)"
            in text)
    assert "`snakemake --cores 1 all`" not in text


def test_profile_commands_match_the_dvc_files_and_the_snakefile():
    from pipeline_src.config import PROJECT_ROOT
    from pipeline_src.dag import known_profiles
    from pipeline_src.report.document import profile_commands

    assert profile_commands("paper") == ("snakemake --cores 1 all", "dvc repro")
    # The Snakefile reads the profile from `--config profile=...`, as its header says.
    assert "`snakemake --cores 1 all --config profile=smoke`" in (PROJECT_ROOT / "Snakefile").read_text()
    for profile in known_profiles():
        snakemake, dvc = profile_commands(profile)
        dvc_file = PROJECT_ROOT / (dvc.split(" ", 2)[2] if dvc != "dvc repro" else "dvc.yaml")
        assert dvc_file.is_file(), profile
        # The generated dvc.yaml's title line names the same command.
        assert f"# Profile '{profile}': `{dvc}`." in dvc_file.read_text().splitlines()[2], profile
        assert snakemake.endswith("all" if profile == "paper" else f"all --config profile={profile}")


# ------------------------------------------------------------------ peak memory: Table 3's and the benchmark's words
def test_format_peak_memory_says_not_measured_for_the_cpu():
    from pipeline_src.report.format import NOT_MEASURED, format_peak_memory

    assert format_peak_memory(0.0, "cpu") == NOT_MEASURED == "not measured (CPU)"
    assert format_peak_memory(0.0, "cpu", with_unit=True) == NOT_MEASURED     # never "0 MB"
    assert format_peak_memory(None) == NOT_MEASURED
    assert format_peak_memory(100.4, "NVIDIA H100") == "100"
    assert format_peak_memory(100.4, "NVIDIA H100", with_unit=True) == "100 MB"
    assert format_peak_memory(2048.0, "NVIDIA H100", unit="GB") == "2.00"
    assert format_peak_memory([2048.0, 3072.0], ["NVIDIA H100"], unit="GB") == f"2.50 ± {0.5 ** 0.5:.2f}"
    assert format_peak_memory([2048.0, 0.0], ["NVIDIA H100", "cpu"], unit="GB") == NOT_MEASURED
    # A benchmark result as the benchmark stage stores it on the CPU: 0 MB per row, device "cpu".
    result = {"device": "cpu", "rows": [{"method": "bcp", "peak_memory_mb": 0.0}]}
    assert format_peak_memory(result["rows"][0]["peak_memory_mb"], result["device"]) == NOT_MEASURED


def test_table3_cpu_runs_say_not_measured_as_the_benchmark_does(tmp_path: Path):
    from pipeline_src.report.format import NOT_MEASURED, format_peak_memory

    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp": {"device": "cpu", "memory": 0.0}, "duet": {"memory": 3072.0}})
    three = table3(collect(params, tmp_path))
    assert _row(three, "BCP")["Peak GPU memory (GB)"] == NOT_MEASURED == format_peak_memory(0.0, "cpu", unit="GB")
    assert _row(three, "Duet")["Peak GPU memory (GB)"] == "3.00"
    data = three.data.set_index("run_group")
    assert data.loc["duet", "peak_memory_gb_mean"] == 3.0 and data.loc["bcp", "peak_memory_gb_mean"] != \
        data.loc["bcp", "peak_memory_gb_mean"]   # nan, not 0


def test_t_interval_uses_student_t_with_n_minus_one_degrees_of_freedom():
    from pipeline_src.report.tables import t_interval
    low, high = t_interval([1.0, 3.0])              # mean 2, SE 1, t_{0.975, 1} = 12.7062
    assert (low, high) == (pytest.approx(2.0 - 12.7062, abs=1e-4), pytest.approx(2.0 + 12.7062, abs=1e-4))
    assert all(math.isnan(v) for v in t_interval([5.0]))
    wide, narrow = t_interval([0.0, 1.0, 2.0], 0.95), t_interval([0.0, 1.0, 2.0], 0.5)
    assert wide[0] < narrow[0] < 1.0 < narrow[1] < wide[1]


def test_seeds_whose_code_cannot_be_compared_are_refused(tmp_path: Path):
    """Seed 1's training at another commit than seed 0's: tmp_path is no git checkout,
    so the files that stage ran cannot be read back, and the row is not averaged."""
    params = _params(seeds=[0, 1], methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / RunLayout.of(params).train("bcp-s1", "metrics.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "git_commit": "beef"}))
    with pytest.raises(ReportError) as err:
        collect(params, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{path}: bcp-s1 ran the train stage at beef, bcp-s0 at c0ffee")
    assert "cannot be compared" in message and "does not average seeds" in message


def test_report_reads_the_paired_differences_by_their_t_interval(tmp_path: Path):
    from pipeline_src.report.document import paired_findings

    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    values = {"bcp-s0": {"clean": 40.0, "pgd": 35.0, "certified": 25.0},
              "bcp-s1": {"clean": 40.5, "pgd": 35.0, "certified": 25.0},
              "duet-s0": {"clean": 50.0, "pgd": 30.0, "certified": 26.0},     # clean +10.0, PGD −5.0, cert +1
              "duet-s1": {"clean": 51.0, "pgd": 29.8, "certified": 24.0}}     # clean +10.5, PGD −5.2, cert −1
    write_fake_runs(tmp_path, params, values)
    text = "\n".join(paired_findings(collect(params, tmp_path)))
    row = next(line for line in text.splitlines() if line.startswith("| Duet | BCP |"))
    clean, pgd, certified = (cell.strip() for cell in row.split("|")[4:7])
    assert clean.startswith("**higher**, +10.25 [") and pgd.startswith("**lower**, −5.10 [")
    assert certified.startswith("not distinguishable at n = 2, +0.00 [")


def test_report_reads_nothing_from_one_seed_or_from_rows_at_chance(tmp_path: Path):
    from pipeline_src.report.document import paired_findings

    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"duet": {"clean": 60.0}})
    one_seed = "\n".join(paired_findings(collect(params, tmp_path)))
    rows = [line for line in one_seed.splitlines() if line.startswith("| Duet |")]
    assert rows and "one seed: no reading" in rows[0] and "higher" not in rows[0] and "lower" not in rows[0]
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"duet-s0": {"clean": 10.0}, "duet-s1": {"clean": 10.0}})
    at_chance = "\n".join(paired_findings(collect(params, tmp_path)))
    assert "| no reading | no reading | no reading |" in at_chance and "within chance" in at_chance


def test_tables_stage_writes_one_small_summary_per_row_for_dvc(tmp_path: Path):
    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {"bcp-s0": {"clean": 36.0, "certified": 25.0},
                                       "bcp-s1": {"clean": 38.0, "certified": 27.0, "similarity": 2.0}})
    make_tables(params, tmp_path)
    layout = RunLayout.of(params)
    bcp = json.loads((tmp_path / layout.summary("bcp")).read_text())
    assert bcp == {"clean": 37.0, "pgd": 40.0, "certified": 26.0, "similarity": 6.0, "lipschitz": 100.0, "n": 2}
    assert sorted(p.name for p in (tmp_path / layout.summary("bcp")).parent.iterdir()) == ["bcp.json", "duet.json"]


def test_dvc_declares_only_the_summaries_as_metrics():
    from pipeline_src.dag import out_kind

    layout = RunLayout.of(load_params("smoke"))
    assert out_kind(layout.summary("duet")) == "metrics"
    assert out_kind(layout.certify("duet", "metrics.json")) == "outs"
    assert out_kind(layout.train("duet", "history.csv")) == "plots"


def test_report_is_also_written_as_html_with_its_tables_rendered(tmp_path: Path):
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    make_report(params, tmp_path)
    page = (tmp_path / RunLayout.of(params).report_html).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page and "<h2>Provenance</h2>" in page
    assert "| --- |" not in page                       # Markdown tables became HTML tables


def test_a_base_run_recorded_with_other_sibling_variants_is_still_its_run(tmp_path: Path):
    """`variants` in a method block names the sibling runs it adds; a seed trained while the
    profile listed another variant ran the same training, and is not refused for it."""
    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / RunLayout.of(params).train("duet", "metrics.json")
    metrics = json.loads(path.read_text())
    metrics["config"]["variants"] = {"dropped_later": {"lambda": 0.5}}
    path.write_text(json.dumps(metrics))
    assert collect(params, tmp_path).of_group("duet")
    metrics["config"]["lambda"] = 0.5                   # a setting the run trains with is still checked
    path.write_text(json.dumps(metrics))
    with pytest.raises(ReportError, match="another configuration"):
        collect(params, tmp_path)


# ---------------------------------------------------------------- certify or predict
def test_report_shows_each_composed_run_beside_its_reference_with_paired_differences(tmp_path: Path):
    """The compose section: a row per composed LMT run (alone, composite, reference BCP of its
    seed, the controls' clean accuracy), and composite − BCP paired by seed with its verdict."""
    params = _params(seeds=[0, 1, 2], methods=("lmt", "bcp"))
    values = {}
    for s in range(3):
        values[f"bcp-s{s}"] = {"clean": 40.0 + s, "pgd": 35.0, "certified": 25.0}
        # Composite clean +6, +6.5, +6 over BCP; certified −0.2, +0.2, 0 (not distinguishable).
        values[f"lmt-s{s}"] = {"clean": 42.0, "certified": 27.0,
                               "compose": {"clean": 46.0 + s + (0.5 if s == 1 else 0.0), "pgd": 38.0,
                                           "certified": 25.0 + (-0.2, 0.2, 0.0)[s]}}
    write_fake_runs(tmp_path, params, values)
    make_tables(params, tmp_path)
    make_figures(params, tmp_path)
    text = make_report(params, tmp_path).read_text()
    section = text.split("## Certify or predict")[1].split("\n## ")[0]
    verdicts = [line for line in section.splitlines() if line.startswith("- ")]
    assert verdicts and not any("PGD" in line for line in verdicts), "not the pgd stage's attacks: no PGD verdict"
    assert "| lmt-s1 | 0.2 | 42.00 / 27.00 | 47.50 / 38.00 / 25.20 / 12.60 | 80.0 | bcp-s1: 41.00 / 35.00 / 25.00 | " \
           "54.00 / 44.00 |" in section
    assert "clean **higher**, +6.17 [" in section
    assert "certified not distinguishable at n = 3, +0.00 [" in section
    assert "What the guide adds to LMT alone: clean +5.17 points" in section
    assert "27 points certified by a composite attacked" in text


def test_a_composite_whose_certificate_an_attack_broke_is_refused(tmp_path: Path):
    params = _params(methods=("lmt", "bcp"))
    write_fake_runs(tmp_path, params, {"lmt": {"compose": {"broken": 2}}})
    with pytest.raises(ReportError, match="handed to the guide or broken"):
        collect(params, tmp_path)


@pytest.mark.parametrize("key, value", [
    ("weights_sha256", "0" * 64),                                    # another model's
    ("reference", {"run": "bcp", "certified_slack": 0.5, "val_certified_accuracy": 12.0}),  # a stale reference
    ("guide_weights_sha256", {"vanilla": "0" * 64}),                 # another guide
    ("attack", {"robust_accuracy": 40.0, "certified_points": 9, "certified_points_broken": 0, "steps": 1,
                "restarts": 1}),                                     # a weaker attack
])
def test_a_composite_of_other_weights_guide_reference_or_attack_is_refused(tmp_path: Path, key: str, value):
    params = _params(methods=("lmt", "bcp"))
    write_fake_runs(tmp_path, params, {})
    path = tmp_path / RunLayout.of(params).compose("lmt", "metrics.json")
    metrics = json.loads(path.read_text())
    save_json({**metrics, key: value}, path)
    with pytest.raises(ReportError, match=f"compose/lmt/metrics.json: {key}"):
        collect(params, tmp_path)
