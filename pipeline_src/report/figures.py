"""The paper's Figures 2 and 3 (training curves) and three more, from the runs'
histories and metrics, as PNG and PDF.

- fig2_clean: clean loss and clean accuracy per epoch;
- fig3_certified: robust loss and certified accuracy per epoch (on the
  training batches with the training bound, and on validation with the sound
  certifier);
  both with the ε and κ schedules in a panel under the curves (labelled);
- radius_curve: certified accuracy against the l2 radius, 0 to 2ε;
- similarity_per_layer: each layer's rotation similarity to the vanilla model (plain and
  channel-matched cosine, with the control rows), one panel per rank r;
- tradeoff: clean against certified accuracy at ε, one point per row of Table 2 (the mean
  over seeds, error bars ± one standard deviation), the vanilla model's clean accuracy as
  a line: a method that keeps clean accuracy at the same certified accuracy sits above
  its base.

A panel with nothing to show (every accuracy 0 %, or warm-up epochs only) says so
in a note across it instead of an empty frame. Duet and BCP are drawn strong, the
other methods lighter; a method has the same colour in every figure. With several seeds a line is the mean and the
band ± one standard deviation. Sizes are fixed (inches × DPI) so that the
images have known pixel sizes."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..runs import METHOD_FACTS  # noqa: E402
from ..io import atomic_path  # noqa: E402
from ..paths import REPORT_FIGURES, RunLayout  # noqa: E402
from .collect import ReportInputs, RunResult, collect  # noqa: E402
from .tables import vanilla_clean  # noqa: E402

DPI = 100
SIZES = {  # inches; pixels are these times DPI
    "fig2_clean": (11.0, 6.5),
    "fig3_certified": (11.0, 6.5),
    "radius_curve": (6.5, 4.5),
    "similarity_per_layer": (8.0, 4.5),
    "tradeoff": (6.5, 5.0),
}
FIGURES = REPORT_FIGURES  # the names the rules declare; each has a size and a builder
FORMATS = ("png", "pdf")
METHOD_COLOURS = {method: facts.colour for method, facts in METHOD_FACTS.items()}
GRID_COLOURS = ["#ff7f0e", "#9467bd", "#e377c2", "#bcbd22", "#f4a582", "#762a83", "#4d9221", "#c51b7d"]
STRONG = ("duet", "bcp")  # the paper's comparison; other groups are drawn lighter


def group_colours(groups: list[str]) -> dict[str, str]:
    """A method's base run keeps its colour everywhere; grid points take the next free ones."""
    colours, extra = {}, iter(GRID_COLOURS * 4)
    for group in groups:
        colours[group] = METHOD_COLOURS.get(group) or next(extra)
    return colours


class _Style:
    def __init__(self, inputs: ReportInputs):
        self.colours = group_colours(inputs.groups)

    def __call__(self, group: str) -> dict:
        strong = group in STRONG
        return {"color": self.colours[group], "alpha": 1.0 if strong else 0.45,
                "linewidth": 2.0 if strong else 1.2, "zorder": 3 if strong else 2}


def _mean_band(runs: list[RunResult], column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and std over seeds of a history column (runs of a group share the schedule)."""
    length = min(len(r.history) for r in runs)
    values = np.stack([r.history[column].to_numpy(dtype=float)[:length] for r in runs])
    epochs = runs[0].history["epoch"].to_numpy()[:length]
    with warnings.catch_warnings():  # warm-up epochs have no robust loss: all-nan columns
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(runs) > 1 else np.zeros(length)
    return epochs, mean, std


PERCENT_MIN_SPAN = 10.0  # percentage points shown at least, around a constant curve


def percent_limits(values) -> tuple[float, float]:
    """y-limits of an accuracy axis (%): the finite values padded by 5% of their range,
    never below 0 nor above 100; a constant (or nearly constant) curve gets a window of
    PERCENT_MIN_SPAN points around it (all zeros: 0 to 10), no values 0 to 100."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 100.0
    low, high = float(finite.min()), float(finite.max())
    pad = 0.05 * (high - low)
    low, high = max(0.0, low - pad), min(100.0, high + pad)
    if high - low < PERCENT_MIN_SPAN:
        middle = (low + high) / 2
        low = min(max(0.0, middle - PERCENT_MIN_SPAN / 2), 100.0 - PERCENT_MIN_SPAN)
        high = low + PERCENT_MIN_SPAN
    return low, high


def _plot_band(ax, runs, column, style, label=None, linestyle="-") -> np.ndarray:
    """Draws a group's mean (and band); returns the values drawn (mean, and mean ± std with seeds)."""
    epochs, mean, std = _mean_band(runs, column)
    # Short runs (and the single robust-loss point of a run just past warm-up) need markers.
    marker = "o" if len(epochs) <= 30 else None
    ax.plot(epochs, mean, linestyle=linestyle, label=label, marker=marker, markersize=3, **style)
    if len(runs) > 1:
        ax.fill_between(epochs, mean - std, mean + std, color=style["color"], alpha=0.15 * style["alpha"],
                        linewidth=0)
        return np.concatenate([mean, mean - std, mean + std])
    return mean


def _schedule_panel(ax, inputs: ReportInputs, style: _Style) -> None:
    kappa_ax = ax.twinx()
    for group in inputs.groups:
        runs = inputs.of_group(group)
        s = style(group)
        _plot_band(ax, runs, "eps", s)
        _plot_band(kappa_ax, runs, "kappa", {**s, "linewidth": 1.0}, linestyle=":")
    ax.set_ylim(bottom=0.0)  # ε ≥ 0: an all-warm-up run (ε = 0 throughout) has no negative axis
    ax.set_ylabel("ε (l2, end of epoch)")
    kappa_ax.set_ylabel("κ (dotted)")
    # The colours are the rows' of the panel above; which line is which schedule:
    ax.plot([], [], color="black", linewidth=1.2, label="ε (left axis)")
    ax.plot([], [], color="black", linewidth=1.0, linestyle=":", label="κ, the clean loss's weight (right axis)")
    ax.legend(fontsize="x-small", loc="center right")
    kappa_ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _curves_figure(inputs: ReportInputs, name: str, panels: list[tuple[str, str, str | None, str]], title: str):
    """Curve panels over a schedule panel each; panels: (column, y label, validation column, y scale)."""
    style = _Style(inputs)
    fig = plt.figure(figsize=SIZES[name], dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=[3, 1])
    for k, (column, ylabel, val_column, yscale) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        drawn = []
        for group in inputs.groups:
            runs = inputs.of_group(group)
            drawn.append(_plot_band(ax, runs, column, style(group), label=runs[0].label))
            if val_column:
                drawn.append(_plot_band(ax, runs, val_column, style(group), linestyle="--"))
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        values = np.concatenate(drawn) if drawn else np.array([])
        if column.endswith("accuracy"):  # percentages: never below 0, a sensible window when constant
            ax.set_ylim(*percent_limits(values))
        note_if_empty(ax, values, column)
        if column == "clean_accuracy":
            ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label=f"chance ({CHANCE:g} %)")
        ax.grid(alpha=0.3)
        if val_column:
            ax.plot([], [], color="black", label="training batches (training bound)")
            ax.plot([], [], color="black", linestyle="--", label="validation (sound certifier)")
        ax.legend(fontsize="small")
        schedule = fig.add_subplot(grid[1, k], sharex=ax)
        _schedule_panel(schedule, inputs, style)
        ax.tick_params(labelbottom=False)
    fig.suptitle(title)
    return fig


# A classifier that guesses: 100 / 10 classes. An accuracy near it says nothing.
CHANCE = 10.0


def empty_panel_note(values, column: str) -> str:
    """What to write across a panel whose curves show nothing ('' when they show something):
    no finite value (every epoch a warm-up epoch, which has no robust loss), or an accuracy
    that is 0 % for every run and epoch."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return "no values: every epoch of every run was a warm-up epoch (no robust bound)"
    if column.endswith("accuracy") and not finite.any():
        return "0 % for every run at every point: nothing is certified at this scale"
    return ""


def note_if_empty(ax, values, column: str) -> None:
    note = empty_panel_note(values, column)
    if note:
        ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", fontsize="small", wrap=True,
                bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round"})


def fig2_clean(inputs: ReportInputs):
    return _curves_figure(inputs, "fig2_clean", [("clean_loss", "clean loss (cross-entropy)", None, "linear"),
                                                 ("clean_accuracy", "clean accuracy (%)", None, "linear")],
                          "Clean loss and accuracy during certified training (training batches)")


def fig3_certified(inputs: ReportInputs):
    return _curves_figure(inputs, "fig3_certified",
                          [("robust_loss", "robust loss (CE of worst-case logits, log scale)", None, "log"),
                           ("certified_accuracy", "certified accuracy (%)", "val_certified_accuracy", "linear")],
                          "Certified (robust) loss and accuracy during certified training")


def radius_curve(inputs: ReportInputs):
    style = _Style(inputs)
    eps = inputs.params["certify"]["eps"]
    fig, ax = plt.subplots(figsize=SIZES["radius_curve"], dpi=DPI, layout="constrained")
    drawn = []
    for group in inputs.groups:
        runs = inputs.of_group(group)
        certifier = runs[0].certify["headline_certifier"]
        radii = np.asarray(runs[0].certify["radius_curve"]["radii"]) * 255.0
        curves = np.stack([r.certify["radius_curve"][certifier] for r in runs])
        s = style(group)
        ax.plot(radii, curves.mean(0), marker="o", markersize=3, label=f"{runs[0].label} ({certifier})", **s)
        drawn.append(curves.mean(0))
        if len(runs) > 1:
            spread = curves.std(0, ddof=1)
            drawn += [curves.mean(0) - spread, curves.mean(0) + spread]
            ax.fill_between(radii, curves.mean(0) - spread, curves.mean(0) + spread, color=s["color"],
                            alpha=0.15, linewidth=0)
    ax.axvline(eps * 255.0, color="black", linestyle=":", linewidth=1, label=f"ε = {eps * 255:.0f}/255")
    ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label=f"chance, clean ({CHANCE:g} %)")
    ax.set_xlabel("l2 radius (× 1/255, pixels in [0, 1])")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(*percent_limits(np.concatenate(drawn) if drawn else []))
    # Radius 0 is the clean accuracy: the panel is empty when nothing is certified beyond it.
    note_if_empty(ax, np.concatenate([d[1:] for d in drawn]) if drawn else [], "certified_accuracy")
    ax.set_title(f"Certified accuracy against radius ({inputs.test_images:,} test images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def similarity_per_layer(inputs: ReportInputs):
    """Bars: each row's plain cosine per layer; markers: its channel-matched cosine;
    grey: the control rows' channel-matched cosine (an unrelated network). One panel per
    rank r: a grid point at another r than the profile's is not comparable with the others
    (nor with the controls, measured at `duet.rank`)."""
    style = _Style(inputs)
    # Runs compared with another guide (collect.against_guide) have no rotation measures here.
    measured = [r for r in inputs.runs if "similarity_per_layer" in r.similarity]
    n_layers = len(measured[0].similarity["similarity_per_layer"])
    names = [layer["name"] for layer in inputs.svd.get("layers", [])]
    if len(names) != n_layers:
        names = [f"layer {k + 1}" for k in range(n_layers)]
    # Numbers in order (1, 4, 16), then any named rank (full rank) after them.
    ranks = sorted({r.similarity["rank"] for r in measured},
                   key=lambda rank: (not isinstance(rank, (int, float)), rank if isinstance(rank, (int, float))
                                     else 0, str(rank)))
    fig, axes = plt.subplots(len(ranks), 1, figsize=SIZES["similarity_per_layer"], dpi=DPI, layout="constrained",
                             squeeze=False, sharex=True)
    x = np.arange(n_layers)
    for ax, rank in zip(axes[:, 0], ranks):
        groups = list(dict.fromkeys(r.group for r in measured if r.similarity["rank"] == rank))
        width = 0.8 / max(len(groups), 1)
        for k, group in enumerate(groups):
            runs = [r for r in measured if r.group == group]
            values = np.stack([r.similarity["similarity_per_layer"] for r in runs])
            s = style(group)
            offset = x + (k - (len(groups) - 1) / 2) * width
            ax.bar(offset, values.mean(0), width,
                   yerr=values.std(0, ddof=1) if len(runs) > 1 else None, color=s["color"], alpha=s["alpha"],
                   label=runs[0].label)
            matched = [r.similarity.get("matched_similarity_per_layer") for r in runs]
            if all(m is not None for m in matched):
                ax.plot(offset, np.stack(matched).mean(0), linestyle="none", marker="D", markersize=4,
                        markerfacecolor="white", markeredgecolor=s["color"], zorder=4)
        _control_steps(ax, inputs, rank, x)
        ax.plot([], [], linestyle="none", marker="D", markersize=4, markerfacecolor="white",
                markeredgecolor="black", label="channel-matched cosine")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel(r"cosine of $U_r V_r^\top$" "\n" "to the vanilla model's (%)")
        ax.set_title(f"r = {rank}", fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small", ncol=2)
    axes[-1, 0].set_xticks(x, names)
    axes[-1, 0].set_xlabel("weight layer")
    fig.suptitle("Rotation similarity per layer (bars: cosine, markers: channel-matched)")
    return fig


def _control_steps(ax, inputs: ReportInputs, rank, x: np.ndarray) -> None:
    """The control rows measured at this rank, as grey steps across the layers."""
    control_styles = {"vanilla_control": ("--", "vanilla, other seed"), "random": (":", "random network")}
    for control, metrics in inputs.controls.items():
        values = metrics.get("matched_similarity_per_layer")
        if values is None or len(values) != len(x) or metrics.get("rank") != rank:
            continue
        linestyle, name = control_styles.get(control, ("-.", control))
        ax.step(np.r_[x - 0.5, x[-1] + 0.5], np.r_[values, values[-1]], where="post", color="0.35",
                linestyle=linestyle, linewidth=1.2, label=f"control: {name} (matched)")


# A method's own trade-off: its variants that move only these keys (issue 22: another point
# on BCP's frontier is not a win for a guided method).
FRONTIER_KEYS = {"kappa_final": "κ_final", "eps_train": "ε_train"}


def frontier_groups(inputs: ReportInputs) -> dict[str, list[str]]:
    """{method: its base row and the rows of its variants that differ from it only in
    FRONTIER_KEYS}, for each method that has such a variant."""
    out = {}
    for base in (g for g in inputs.groups if inputs.of_group(g)[0].base):
        first = inputs.of_group(base)[0]
        members = [base]
        for group in inputs.groups:
            run = inputs.of_group(group)[0]
            moved = {k for k in (set(first.config) | set(run.config)) - {"variant", "variants"}  # names, not settings
                     if first.config.get(k) != run.config.get(k)}
            if group != base and run.method == first.method and moved and moved <= set(FRONTIER_KEYS):
                members.append(group)
        if len(members) > 1:
            out[first.method] = members
    return out


def tradeoff(inputs: ReportInputs):
    """Clean against certified accuracy at ε (each run's own certifier), the mean over
    seeds with ± one standard deviation in both directions; a method's own frontier (its
    base row and its variants that move κ_final or ε_train only) joined by a line; the
    vanilla model's clean accuracy on the same test images as a horizontal line."""
    style = _Style(inputs)
    fig, ax = plt.subplots(figsize=SIZES["tradeoff"], dpi=DPI, layout="constrained")
    xs, ys, means = [], [], {}
    for group in inputs.groups:
        runs = inputs.of_group(group)
        certified = np.array([r.certify["headline_certified_accuracy"] for r in runs])
        clean = np.array([r.certify["clean_accuracy"] for r in runs])
        means[group] = (certified.mean(), clean.mean())
        spread = (certified.std(ddof=1), clean.std(ddof=1)) if len(runs) > 1 else (None, None)
        s = style(group)
        ax.errorbar(certified.mean(), clean.mean(), xerr=spread[0], yerr=spread[1], marker="o", markersize=6,
                    capsize=3, linestyle="none", color=s["color"], alpha=s["alpha"], zorder=s["zorder"],
                    label=f"{runs[0].label} (n = {len(runs)})")
        xs += [certified.mean()] + ([certified.mean() - spread[0], certified.mean() + spread[0]] if spread[0] else [])
        ys += [clean.mean()] + ([clean.mean() - spread[1], clean.mean() + spread[1]] if spread[1] else [])
    for method, groups in frontier_groups(inputs).items():
        base = inputs.of_group(groups[0])[0]
        ax.plot(*zip(*sorted(means[g] for g in groups)), color=style(groups[0])["color"], linewidth=1, alpha=0.6,
                label=f"{base.label} frontier ({', '.join(FRONTIER_KEYS.values())} moved)")
    vanilla = vanilla_clean(inputs)
    ax.axhline(vanilla.accuracy, color="black", linestyle="--", linewidth=1,
               label=f"vanilla model, clean ({vanilla.accuracy:.1f} %)")
    ax.axhline(CHANCE, color="grey", linestyle=":", linewidth=1, label=f"chance, clean ({CHANCE:g} %)")
    ax.set_xlim(*percent_limits(xs))
    ax.set_ylim(*percent_limits(ys + [vanilla.accuracy, CHANCE]))
    ax.set_xlabel(f"certified accuracy at ε = {inputs.params['certify']['eps'] * 255:.0f}/255 (%)")
    ax.set_ylabel("clean accuracy (%)")
    ax.set_title(f"Clean against certified accuracy ({inputs.test_images:,} test images)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return fig


BUILDERS = {"fig2_clean": fig2_clean, "fig3_certified": fig3_certified, "radius_curve": radius_curve,
            "similarity_per_layer": similarity_per_layer, "tradeoff": tradeoff}


def write_figures(inputs: ReportInputs, layout: RunLayout, root: Path) -> list[Path]:
    written = []
    for name in FIGURES:
        fig = BUILDERS[name](inputs)
        for extension in FORMATS:
            path = root / layout.figure(name, extension)
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=extension, dpi=DPI)
            written.append(path)
        plt.close(fig)
    return written


def make_figures(params: dict, root: Path) -> list[Path]:
    """The `figures` stage: the training curves, radius curves, similarity and trade-off figures."""
    written = write_figures(collect(params, root), RunLayout.of(params), root)
    print(f"[figures] wrote {len(written)} files under "
          f"{RunLayout.of(params).figure('x', 'png').rsplit('/', 1)[0]}/")
    return written
