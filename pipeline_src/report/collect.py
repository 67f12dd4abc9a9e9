"""Read the metrics files of every run of a profile, and refuse those that are
missing or were made with other params than the ones the report is asked for.

A run's four metrics files (train, certify, pgd, similarity) are tied together
by the sha256 of the trained weights, and each is checked against the params
it depends on, so a table never mixes a stale file into a fresh run. The
similarity files (the runs' and Table 1's control rows') are also tied to the
vanilla model they were compared with, so every seed of a row shares one guide; a run
whose training did not read the guide (BCP, LMT, LocalBCP) but was compared with another
one keeps its Table 2 numbers and its Lipschitz constant, not its rotation measures
(`against_guide`).
The seeds of a row must also have run the same code in every stage
(`code_identity`): seeds from different commits are averaged only where the
files each stage ran are the same at both."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import StageError
from ..paths import RunLayout, control_outputs
from ..runs import (INIT_SUFFIX, METHOD_FACTS, SIMILARITY_CONTROLS, CertifiedRun, compose_reference_run, compose_runs,
                    control_rank, control_seed, method_runs, similarity_rank, similarity_settings, trains_with_guide)
from .code_identity import CodeUnknown, code_difference

METHOD_LABELS = {**{name: facts.label for name, facts in METHOD_FACTS.items()}, "vanilla": "Vanilla"}


class ReportError(StageError, ValueError):
    """A metrics file is missing or does not match the params; names the file."""


INIT_LABELS = {"scratch": "scratch", "vanilla_init": "vanilla init", "vanilla_unit_norm": "trained vanilla, unit norm"}


def init_from(config: dict) -> str:
    """How a run was initialised: `scratch` (its own seed; the default), `vanilla_init`
    (exactly the vanilla model's initial weights) or `vanilla_unit_norm` (the trained
    vanilla model, each layer scaled to operator norm <= 1)."""
    return config.get("init_from", "scratch")


def base_group(group: str, run: CertifiedRun) -> str:
    """The group without the suffix an `init_variants` run carries (`bcp-vinit` -> `bcp`)."""
    suffix = f"-{INIT_SUFFIX.get(init_from(run.config), init_from(run.config))}"
    return group[:-len(suffix)] if group != run.method and group.endswith(suffix) else group


def is_method_base(group: str, run: CertifiedRun) -> bool:
    """The method's own run (whatever its initialisation), not a point of a similarity
    grid (Duet's, Duet-local's): the rows that have a number in the paper."""
    return base_group(group, run) == run.method


def group_label(group: str, run: CertifiedRun) -> str:
    """`BCP`; a grid point shows the values it changes: `Duet r=1 λ=0.1 direction`
    (`Duet-local r=4 ...`); a named variant its name: `Duet lambda_0p01`; an
    `init_variants` run its initialisation: `BCP (vanilla init)`."""
    if is_method_base(group, run):
        label = METHOD_LABELS[run.method]
    elif run.config.get("variant"):
        label = f"{METHOD_LABELS[run.method]} {run.config['variant']}"
    else:
        cfg = run.config
        label = f"{METHOD_LABELS[run.method]} r={cfg['rank']} λ={cfg['lambda']:g} {cfg['sim_form']}"
    return label if base_group(group, run) == group else f"{label} ({INIT_LABELS[init_from(run.config)]})"


@dataclass
class RunResult:
    """One certified training run: its identity and the metrics of its stages."""
    name: str
    group: str
    method: str
    seed: int
    label: str
    config: dict
    train: dict
    certify: dict
    attack: dict
    similarity: dict
    history: pd.DataFrame
    base: bool = True  # the method's own run (any initialisation), not a point of Duet's grid

    @property
    def init_from(self) -> str:
        return init_from(self.config)


@dataclass
class ReportInputs:
    """Everything the tables, figures and REPORT.md are made from."""
    params: dict
    provenance: dict
    vanilla: dict
    runs: list[RunResult]
    svd: dict = field(default_factory=dict)
    # The size of the test subset every certified row was measured on (`certify.test_images`,
    # at most the whole test split): seeded and stratified across the classes.
    test_images: int = 0
    # Table 1's control rows against the vanilla model (similarity.controls): {control: metrics}
    controls: dict = field(default_factory=dict)
    # The compose stage's metrics of every composed run (certify or predict; report.composition)
    compositions: list = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """The table rows, in the order of `method_runs` (methods, then grid points)."""
        return list(dict.fromkeys(run.group for run in self.runs))

    def of_group(self, group: str) -> list[RunResult]:
        return [run for run in self.runs if run.group == group]

    @property
    def seeds(self) -> list[int]:
        return sorted({run.seed for run in self.runs})

    @property
    def commits(self) -> list[str]:
        """The commits of the code that trained and evaluated the runs."""
        found = {self.vanilla["git_commit"]}
        for run in self.runs:
            found |= {m["git_commit"] for m in (run.train, run.certify, run.attack, run.similarity)}
        found |= {m["git_commit"] for m in self.controls.values()}
        return sorted(found)

    @property
    def other_guide_runs(self) -> list[RunResult]:
        """The runs whose rotation measures were taken against another guide (`against_guide`)."""
        return [run for run in self.runs if "other_guide" in run.similarity]

    @property
    def devices(self) -> list[str]:
        return sorted({run.train["timing"]["device"] for run in self.runs})


def _read_json(path: Path, stage: str, run: str) -> dict:
    if not path.is_file():
        raise ReportError(f"{path}: missing; run the {stage} stage{' of ' + run if run else ''} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None


def _same(value, expected) -> bool:
    """Equality as JSON stores it (tuples are lists, ints and floats compare by value)."""
    return json.loads(json.dumps(value)) == json.loads(json.dumps(expected))


def _expect(path: Path, metrics: dict, key: str, expected) -> None:
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ReportError(f"{path}: no '{key}' (made by an older version of the pipeline?); "
                              "rerun its stage")
        value = value[part]
    if not _same(value, expected):
        shown = lambda v: json.dumps(v)[:200]  # noqa: E731
        raise ReportError(f"{path}: {key} is {shown(value)} but the params ask for {shown(expected)}; "
                          "it comes from another configuration: rerun its stage")


def run_settings(config: dict) -> dict:
    """A run's config as far as its training reads it: a method block's `variants` names
    the sibling runs the block adds (each variant run records `variants: None`), which a
    run does not train with; a variant added to or dropped from a profile between seeds
    leaves the base run's seeds comparable."""
    return {key: value for key, value in config.items() if key != "variants"}


def _read_history(path: Path, run: str) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"{path}: missing; run the train stage of {run} first")
    history = pd.read_csv(path)
    required = {"epoch", "clean_loss", "clean_accuracy", "robust_loss", "certified_accuracy",
                "val_certified_accuracy", "eps", "kappa"}
    missing = sorted(required - set(history.columns))
    if missing:
        raise ReportError(f"{path}: columns {missing} missing; rerun the train stage of {run}")
    return history


def collect(params: dict, root: Path) -> ReportInputs:
    """The metrics of every run of `method_runs(params)`, checked against the params."""
    layout = RunLayout.of(params)
    provenance = _read_json(root / layout.data_provenance, "data", "")
    vanilla_path = root / layout.vanilla_metrics
    vanilla = _read_json(vanilla_path, "vanilla", "")
    for key, expected in (("arch", params["model"]["arch"]), ("epochs", params["vanilla"]["epochs"]),
                          ("seed", params["run"]["seed"]), ("data.sha256", provenance["sha256"])):
        _expect(vanilla_path, vanilla, key, expected)

    eps = params["certify"]["eps"]
    test_images = min(params["certify"]["test_images"] or provenance["images"]["test"],
                      provenance["images"]["test"])
    if "certify_subset" in vanilla:  # absent from metrics files older than the subset (whole test split only)
        _expect(vanilla_path, vanilla, "certify_subset.images", test_images)
    runs = []
    for name, run in method_runs(params).items():
        model = {**params["model"], **run.config.get("model", {})}
        train_path = root / layout.train(name, "metrics.json")
        train = _read_json(train_path, "train", name)
        for key, expected in (("run", name), ("method", run.method), ("config", run_settings(run.config)),
                              ("seed", run.seed), ("arch", model["arch"]),
                              ("activation", model["activation"]), ("eps_test", eps),
                              ("data.sha256", provenance["sha256"])):
            _expect(train_path, {**train, "config": run_settings(train.get("config", {}))}, key, expected)
        weights = train["weights_sha256"]
        evaluated = {}
        for stage, path, checks in (
                ("certify", root / layout.certify(name, "metrics.json"),
                 {"eps": eps, "test_images": test_images}),
                ("pgd", root / layout.attack(name, "metrics.json"),
                 {"eps": eps, "test_images": test_images, "steps": params["pgd"]["steps"],
                  "restarts": params["pgd"]["restarts"]}),
                ("similarity", root / layout.similarity(name, "metrics.json"),
                 {"rank": similarity_rank(params, name)})):
            metrics = _read_json(path, stage, name)
            for key, expected in {"method": name, **checks, "weights_sha256": weights}.items():
                _expect(path, metrics, key, expected)
            evaluated[stage] = against_guide(metrics, vanilla, run, path) if stage == "similarity" else metrics
        if evaluated["pgd"]["certified_points_broken"]:
            raise ReportError(f"{root / layout.attack(name, 'metrics.json')}: certified points broken by "
                              "the attack: the certificates are unsound")
        runs.append(RunResult(
            name=name, group=run.group, method=run.method, seed=run.seed, label=group_label(run.group, run),
            config=run.config, train=train, certify=evaluated["certify"], attack=evaluated["pgd"],
            similarity=evaluated["similarity"],
            history=_read_history(root / layout.train(name, "history.csv"), name),
            base=is_method_base(run.group, run)))
    check_same_code(runs, layout, root)
    svd_path = root / layout.svd_summary
    svd = json.loads(svd_path.read_text()) if svd_path.is_file() else {}
    return ReportInputs(params=params, provenance=provenance, vanilla=vanilla, runs=runs, svd=svd,
                        controls=collect_controls(params, root, vanilla), test_images=test_images,
                        compositions=collect_compositions(params, root, runs, vanilla))


def collect_compositions(params: dict, root: Path, runs: list, vanilla: dict) -> list[dict]:
    """The compose stage's metrics of every composed run, checked against its trained run (the
    same weights), the params and its attack (no certified point handed to h or broken)."""
    layout = RunLayout.of(params)
    trained = {run.name: run for run in runs}
    found = []
    for name in compose_runs(params):
        path = root / layout.compose(name, "metrics.json")
        metrics = _read_json(path, "compose", name)
        reference = compose_reference_run(params, name)
        for key, expected in (("method", name), ("eps", params["certify"]["eps"]),
                              ("weights_sha256", trained[name].train["weights_sha256"]),
                              ("taus_over_eps", params["compose"]["taus"]), ("reference.run", reference),
                              ("reference.val_certified_accuracy", trained[reference].train["val_certified_accuracy"]),
                              ("reference.certified_slack", params["compose"]["certified_slack"]),
                              ("guide_weights_sha256.vanilla", vanilla["weights_sha256"]),
                              ("attack.steps", params["pgd"]["steps"]), ("attack.restarts", params["pgd"]["restarts"]),
                              ("test_images", trained[name].certify["test_images"])):
            _expect(path, metrics, key, expected)
        if metrics["attack"]["certified_points_broken"]:
            raise ReportError(f"{path}: certified points handed to the guide or broken: the certificate is unsound")
        found.append({**metrics, "seed": trained[name].seed, "group": trained[name].group,
                      "label": trained[name].label, "reference_result": trained[reference]})
    return found


# What a similarity file measures of the certified model alone, whichever guide it was compared with.
GUIDE_FREE_SIMILARITY_KEYS = ("stage", "method", "profile", "init_from", "weights_sha256", "rank",
                              "lipschitz_upper", "lipschitz_estimate", "git_commit")


def against_guide(metrics: dict, vanilla: dict, run: CertifiedRun, path: Path) -> dict:
    """A run's similarity metrics, checked against the profile's guide (`vanilla`). A run
    that trained with the guide (`trains_with_guide`) must have been compared with this one.
    A run that trained without it and was compared with another guide (its seed was measured
    before the guide was replaced) keeps only GUIDE_FREE_SIMILARITY_KEYS, with `other_guide`
    naming the guide its rotation measures were taken against: those are left out of Table 1."""
    expected = vanilla["weights_sha256"]
    if trains_with_guide(run) or "vanilla_weights_sha256" not in metrics:
        _expect(path, metrics, "vanilla_weights_sha256", expected)
    if metrics["vanilla_weights_sha256"] == expected:
        return metrics
    return {**{key: metrics[key] for key in GUIDE_FREE_SIMILARITY_KEYS if key in metrics},
            "other_guide": metrics["vanilla_weights_sha256"]}


# The stages whose code a seed's numbers come from, and the RunResult field of each.
STAGE_FIELDS = {"train": "train", "certify": "certify", "pgd": "attack", "similarity": "similarity"}


def check_same_code(runs: list[RunResult], layout: RunLayout, root: Path) -> None:
    """Refuse to average the seeds of a row that ran different code in a stage: each
    seed is compared with the row's first, stage by stage, and the error names the
    runs, the commits and the files that differ."""
    by_group: dict[str, list[RunResult]] = {}
    for run in runs:
        by_group.setdefault(run.group, []).append(run)
    files = {"train": layout.train, "certify": layout.certify, "pgd": layout.attack,
             "similarity": layout.similarity}
    for first, *others in by_group.values():
        for other in others:
            for stage, field_name in STAGE_FIELDS.items():
                a, b = (getattr(r, field_name)["git_commit"] for r in (first, other))
                try:
                    differ = code_difference(a, b, stage, root)
                    why = f"{', '.join(differ)} differ" if differ else ""
                except CodeUnknown as err:
                    why = f"the code cannot be compared: {err}"
                if why:
                    raise ReportError(
                        f"{root / files[stage](other.name, 'metrics.json')}: {other.name} ran the {stage} stage "
                        f"at {b}, {first.name} at {a} ({why}); the report does not average seeds made with "
                        f"different code: rerun {other.name} (or the other seeds) at one commit, or leave it "
                        "out of committed_runs")


def collect_controls(params: dict, root: Path, vanilla: dict) -> dict[str, dict]:
    """Table 1's control rows, when `similarity.controls` is on: each against this
    vanilla model, at `duet.rank`, from the params' control seed."""
    controls = {}
    offset = similarity_settings(params)["control_seed_offset"]
    for control, rel in control_outputs(params).items():
        path = root / rel
        metrics = _read_json(path, "similarity_control", "")
        checks = {"control": control, "rank": control_rank(params), "control_seed_offset": offset,
                  "vanilla_weights_sha256": vanilla["weights_sha256"]}
        if control == "vanilla_control":
            checks["seed"] = control_seed(params)
        for key, expected in checks.items():
            _expect(path, metrics, key, expected)
        controls[control] = metrics
    assert set(controls) <= set(SIMILARITY_CONTROLS)
    return controls
