"""The figures' accuracy axes: never below 0 %, a sensible window around a constant curve
(issue 14: Figure 3 showed negative percentages when every value was 0)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from pipeline_src.paths import RunLayout
from pipeline_src.report.collect import collect
from pipeline_src.report.figures import PERCENT_MIN_SPAN, fig2_clean, fig3_certified, percent_limits, radius_curve


@pytest.mark.parametrize("values,limits", [
    ([0.0, 0.0, 0.0], (0.0, PERCENT_MIN_SPAN)),                  # all zero: 0 to 10, nothing negative
    ([100.0, 100.0], (100.0 - PERCENT_MIN_SPAN, 100.0)),         # all 100: never above 100
    ([50.0], (45.0, 55.0)),                                      # constant: centred window
    ([20.0, 60.0], (18.0, 62.0)),                                # a range: padded by 5 %
    ([-3.0, 40.0], (0.0, 40.0 + 0.05 * 43.0)),                   # mean − std below 0: clipped at 0
    ([], (0.0, 100.0)),
    ([math.nan, math.nan], (0.0, 100.0)),                        # warm-up epochs only: no value
    ([math.nan, 0.0], (0.0, PERCENT_MIN_SPAN)),
])
def test_percent_limits(values, limits):
    assert percent_limits(values) == pytest.approx(limits)


def _write_constant_histories(root: Path, params: dict, value: float) -> None:
    """Every run's accuracy columns set to `value`, ε to 0 (a run still in warm-up)."""
    from pipeline_src.runs import method_runs

    layout = RunLayout.of(params)
    for name in method_runs(params):
        path = root / layout.train(name, "history.csv")
        rows = list(csv.DictReader(path.open()))
        for row in rows:
            row.update(clean_accuracy=value, certified_accuracy=value, val_certified_accuracy=value, eps=0.0)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _axes(fig, ylabel_part: str):
    found = [ax for ax in fig.axes if ylabel_part in ax.get_ylabel()]
    assert found, [ax.get_ylabel() for ax in fig.axes]
    return found


@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_all_zero_accuracy_axes_start_at_zero(tmp_path: Path, seeds):
    from test_report import _params, write_fake_runs

    params = _params(seeds=seeds, methods=("bcp", "duet"))
    from pipeline_src.runs import method_runs

    values = {name: {"clean": 0.0, "certified": 0.0} for name in method_runs(params)}
    write_fake_runs(tmp_path, params, values)
    _write_constant_histories(tmp_path, params, 0.0)
    inputs = collect(params, tmp_path)
    for builder, label in ((fig3_certified, "certified accuracy (%)"), (fig2_clean, "clean accuracy (%)"),
                           (radius_curve, "certified accuracy (%)")):
        fig = builder(inputs)
        for ax in _axes(fig, label):
            assert ax.get_ylim() == pytest.approx((0.0, PERCENT_MIN_SPAN)), (builder.__name__, ax.get_ylim())
        for ax in [a for a in fig.axes if a.get_ylabel().startswith("ε")]:
            assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] > 0.0     # ε = 0 throughout: no negative ε
        plt.close(fig)


def test_accuracy_axes_cover_the_curves(tmp_path: Path):
    from test_report import _params, write_fake_runs

    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {"bcp": {"certified": 42.0}})   # validation column: 42
    fig = fig3_certified(collect(params, tmp_path))
    (ax,) = _axes(fig, "certified accuracy (%)")
    low, high = ax.get_ylim()
    # training-batch certified accuracy 5.0 after warm-up, validation 42.0: both inside, nothing below 0
    assert 0.0 <= low <= 5.0 and 42.0 <= high <= 100.0
    plt.close(fig)


def test_tradeoff_places_each_row_at_its_mean_with_the_vanilla_line(tmp_path: Path):
    from test_report import _params, write_fake_runs

    from pipeline_src.report.figures import tradeoff
    from pipeline_src.report.tables import vanilla_clean

    params = _params(seeds=[0, 1], methods=("bcp", "duet"))
    values = {"bcp-s0": {"clean": 36.0, "certified": 26.0}, "bcp-s1": {"clean": 38.0, "certified": 24.0},
              "duet-s0": {"clean": 30.0, "certified": 18.0}, "duet-s1": {"clean": 32.0, "certified": 20.0}}
    write_fake_runs(tmp_path, params, values)
    inputs = collect(params, tmp_path)
    fig = tradeoff(inputs)
    (ax,) = fig.axes
    points = {}
    for container in ax.containers:            # one errorbar per row of Table 2
        line = container.lines[0]
        points[container.get_label()] = (float(line.get_xdata()[0]), float(line.get_ydata()[0]))
    assert points == {"BCP (n = 2)": (25.0, 37.0), "Duet (n = 2)": (19.0, 31.0)}
    labels = [line.get_label() for line in ax.get_lines()]
    vanilla = vanilla_clean(inputs).accuracy
    assert any(label.startswith("vanilla model, clean") for label in labels)
    assert any(line.get_ydata()[0] == vanilla for line in ax.get_lines()
               if line.get_label().startswith("vanilla model"))
    low, high = ax.get_ylim()
    assert low <= 10.0 and high >= vanilla and 0.0 <= low
    assert "certified accuracy" in ax.get_xlabel() and "clean accuracy" in ax.get_ylabel()
    plt.close(fig)


def test_tradeoff_joins_a_methods_own_frontier_and_nothing_else(tmp_path: Path):
    """BCP's rows that move kappa_final only are its frontier, joined by one line through
    their means in order of certified accuracy; Duet (another method) is not on it."""
    from test_report import _params, write_fake_runs

    from pipeline_src.report.figures import frontier_groups, tradeoff

    params = _params(seeds=[0], methods=("bcp", "duet"))
    params["bcp"]["variants"] = {"kappa_0p5": {"kappa_final": 0.5}, "other_lr": {"lr": 0.01}}
    values = {"bcp-s0": {"clean": 36.0, "certified": 26.0}, "bcp-kappa_0p5-s0": {"clean": 44.0, "certified": 20.0},
              "bcp-other_lr-s0": {"clean": 30.0, "certified": 22.0}, "duet-s0": {"clean": 30.0, "certified": 18.0}}
    write_fake_runs(tmp_path, params, values)
    inputs = collect(params, tmp_path)
    assert frontier_groups(inputs) == {"bcp": ["bcp", "bcp-kappa_0p5"]}
    fig = tradeoff(inputs)
    (ax,) = fig.axes
    (line,) = [line for line in ax.get_lines() if "frontier" in line.get_label()]
    assert list(line.get_xdata()) == [20.0, 26.0] and list(line.get_ydata()) == [44.0, 36.0]
    plt.close(fig)


def _texts(fig) -> list[str]:
    return [text.get_text() for ax in fig.axes for text in ax.texts]


def test_an_all_zero_certified_panel_carries_a_note_and_a_live_one_none(tmp_path: Path):
    from test_report import _params, write_fake_runs

    from pipeline_src.runs import method_runs

    params = _params(methods=("bcp", "duet"))
    write_fake_runs(tmp_path, params, {name: {"clean": 0.0, "certified": 0.0} for name in method_runs(params)})
    _write_constant_histories(tmp_path, params, 0.0)
    inputs = collect(params, tmp_path)
    for builder in (fig3_certified, radius_curve):
        fig = builder(inputs)
        assert any("nothing is certified" in text for text in _texts(fig)), builder.__name__
        plt.close(fig)
    live = tmp_path / "live"
    write_fake_runs(live, params, {})
    for builder in (fig3_certified, radius_curve):
        fig = builder(collect(params, live))
        assert not any("nothing is certified" in text for text in _texts(fig)), builder.__name__
        plt.close(fig)


@pytest.mark.parametrize("values,column,note", [
    ([math.nan, math.nan], "robust_loss", "warm-up"),
    ([0.0, 0.0, math.nan], "certified_accuracy", "nothing is certified"),
    ([0.0, 0.5], "certified_accuracy", ""),
    ([0.0, 0.0], "robust_loss", ""),          # a loss of 0 is a value, not an empty panel
])
def test_empty_panel_note(values, column, note):
    from pipeline_src.report.figures import empty_panel_note

    text = empty_panel_note(values, column)
    assert (note in text) if note else text == ""


def test_schedule_panels_name_the_eps_and_kappa_lines(tmp_path: Path):
    from test_report import _params, write_fake_runs

    params = _params(methods=("bcp",))
    write_fake_runs(tmp_path, params, {})
    fig = fig2_clean(collect(params, tmp_path))
    for ax in [a for a in fig.axes if a.get_ylabel().startswith("ε")]:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels[0].startswith("ε") and labels[1].startswith("κ")
    plt.close(fig)


def test_similarity_figure_has_one_panel_per_rank_with_the_controls_at_theirs(tmp_path: Path):
    from test_report import _params, write_fake_runs

    from pipeline_src.report.figures import similarity_per_layer

    params = _params(methods=("bcp", "duet"), grid=[1])   # Duet's grid point at r = 1 beside the rows at duet.rank
    write_fake_runs(tmp_path, params, {})
    inputs = collect(params, tmp_path)
    ranks = sorted({str(r.similarity["rank"]) for r in inputs.runs})
    assert len(ranks) == 2
    fig = similarity_per_layer(inputs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"r = {rank}" for rank in ranks]
    for ax in fig.axes:
        controls = [text.get_text() for text in ax.get_legend().get_texts() if text.get_text().startswith("control")]
        assert bool(controls) == (ax.get_title() == f"r = {params['duet']['rank']}"), (ax.get_title(), controls)
    plt.close(fig)
