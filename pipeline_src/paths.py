"""Where each stage of a run reads and writes, relative to the project root.

The one place that names the files: the stages, the Snakemake rules and the
generated dvc.yaml all take their paths from here. Kept free of torch."""
from __future__ import annotations

from dataclasses import dataclass

from .runs import SIMILARITY_CONTROLS, benchmark_archs, compose_runs, similarity_settings


# What the report stages write (rules and stages both read these).
REPORT_TABLES = (1, 2, 3)
REPORT_FIGURES = ("fig2_clean", "fig3_certified", "radius_curve", "similarity_per_layer", "tradeoff")


@dataclass(frozen=True)
class RunLayout:
    root: str  # results/<run.name>

    @classmethod
    def of(cls, params: dict) -> "RunLayout":
        return cls(f"results/{params['run']['name']}")

    def _at(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    # data stage
    @property
    def data_cache(self) -> str:
        return self._at("data", "cifar10.pt")

    @property
    def data_provenance(self) -> str:
        return self._at("data", "provenance.json")

    # vanilla pretraining stage
    @property
    def vanilla_model(self) -> str:
        return self._at("vanilla", "model.pt")

    @property
    def vanilla_history(self) -> str:
        return self._at("vanilla", "history.csv")

    @property
    def vanilla_metrics(self) -> str:
        return self._at("vanilla", "metrics.json")

    @property
    def vanilla_checkpoint(self) -> str:
        return self._at("vanilla", "checkpoint.pt")

    # the second vanilla model, a control of Table 1 (another seed, same recipe)
    def vanilla_control(self, name: str) -> str:
        """model.pt, history.csv, metrics.json, checkpoint.pt"""
        return self._at("vanilla_control", name)

    # offline SVD export stage
    @property
    def svd_factors(self) -> str:
        return self._at("svd", "factors.pt")

    @property
    def svd_summary(self) -> str:
        return self._at("svd", "summary.json")

    # certified training stage, one folder per method
    def train(self, method: str, name: str) -> str:
        """model.pt (selected on validation), history.csv, metrics.json, checkpoint.pt"""
        return self._at("train", method, name)

    # certification and attack stages
    def certify(self, method: str, name: str) -> str:
        """metrics.json, certified.pt (per-example certificates)"""
        return self._at("certify", method, name)

    def attack(self, method: str, name: str) -> str:
        """metrics.json (PGD accuracy and the cross-check)"""
        return self._at("pgd", method, name)

    def compose(self, method: str, name: str) -> str:
        """metrics.json of certify or predict (the run composed with the guide at every tau)"""
        return self._at("compose", method, name)

    def similarity(self, method: str, name: str) -> str:
        """metrics.json (rotation similarity to the vanilla model, Lipschitz product)"""
        return self._at("similarity", method, name)

    def similarity_control(self, control: str, name: str = "metrics.json") -> str:
        """metrics.json of a control row of Table 1 (SIMILARITY_CONTROLS) against the vanilla model.
        A folder of its own, so no {method} pattern of the per-run stages can match it."""
        return self._at("similarity_control", control, name)

    # the benchmark (seconds per epoch and peak memory beside the floor)
    def benchmark_result(self, arch: str) -> str:
        return self._at("benchmark", f"benchmark_{arch}.json")

    @property
    def benchmark_depth(self) -> str:
        return self._at("benchmark", "benchmark_depth.json")

    # the report stages: the paper's tables and figures, and REPORT.md
    def table(self, number: int, extension: str) -> str:
        """table{1,2,3}.{md,html,csv,tex}"""
        return self._at("tables", f"table{number}.{extension}")

    def summary(self, group: str) -> str:
        """One row of Table 2 in six numbers, for `dvc metrics show results/<run>/summary`:
        a small file per row keeps DVC's table narrow (one file with every row would be
        one line of 20-odd columns)."""
        return self._at("summary", f"{group}.json")

    def figure(self, name: str, extension: str) -> str:
        """fig2_clean, fig3_certified, radius_curve, similarity_per_layer, tradeoff as png and pdf"""
        return self._at("figures", f"{name}.{extension}")

    @property
    def report(self) -> str:
        return self._at("REPORT.md")

    @property
    def report_html(self) -> str:
        """REPORT.md rendered, for `snakemake --report` (which shows HTML, not Markdown)."""
        return self._at("REPORT.html")

    # runner bookkeeping
    def log(self, stage: str) -> str:
        return self._at("logs", f"{stage}.log")

    def benchmark(self, stage: str) -> str:
        return self._at("benchmarks", f"{stage}.tsv")


def benchmark_outputs(params: dict) -> list[str]:
    """The files the benchmark writes: one per architecture, and the depth table for several."""
    layout, archs = RunLayout.of(params), benchmark_archs(params)
    return [layout.benchmark_result(arch) for arch in archs] + ([layout.benchmark_depth] if len(archs) > 1 else [])


def control_outputs(params: dict) -> dict[str, str]:
    """{control: its similarity metrics file} when `similarity.controls` is on, else {}."""
    if not similarity_settings(params)["controls"]:
        return {}
    layout = RunLayout.of(params)
    return {control: layout.similarity_control(control) for control in SIMILARITY_CONTROLS}


# The per-run stages every run goes through; `compose` too for the runs of compose.methods.
RUN_STAGES = ("train", "certify", "pgd", "similarity")


def run_stages(params: dict, run: str) -> tuple[str, ...]:
    return RUN_STAGES + (("compose",) if run in compose_runs(params) else ())


def committed_run_files(params: dict, run: str) -> list[str]:
    """What a committed run keeps in git (a campaign's or a GPU window's): the metrics file of
    each of its stages and its history, no weights."""
    layout = RunLayout.of(params)
    metrics = {"certify": layout.certify, "pgd": layout.attack, "similarity": layout.similarity,
               "compose": layout.compose}
    return [layout.train(run, "metrics.json"), layout.train(run, "history.csv"),
            *(metrics[stage](run, "metrics.json") for stage in run_stages(params, run) if stage != "train")]
