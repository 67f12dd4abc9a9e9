"""Which runs a profile has: the certified runs (methods, grid points, named
variants, init variants, seeds, committed runs), the similarity rank of each,
and Table 1's control rows and their seed. Every run-level decision is made
here and handed to the stages, the DAG and the report; `duet.rank` is read
here only.

Kept free of torch so that the Snakefile can import it cheaply; it reads
params but never loads or validates them (`config` does, and checks its
run-level keys against this module)."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple

import yaml


def benchmark_archs(params: dict) -> list[str]:
    """The architectures the benchmark times: `benchmark.archs`, or model.arch."""
    return params["benchmark"]["archs"] or [params["model"]["arch"]]


def benchmark_methods(params: dict) -> list[str]:
    """What the benchmark times: `benchmark.methods` (any method with a params
    block, or a run of the profile), or the profile's `methods`."""
    return params["benchmark"].get("methods") or params["methods"]


# The params schema: each certified method's block states its facts under `x-method`.
SCHEMA = "workflow/schemas/params.schema.yaml"
METHOD_FACTS_KEY = "x-method"


class MethodFacts(NamedTuple):
    """What the DAG, the training stage and the report need to know of a certified method,
    written once, in its schema block (`x-method`; the comment above the blocks explains
    each field). Kept free of torch: the Snakefile reads this module."""
    label: str                # the method's name in the tables and figures
    paired_with: str | None   # the method this one is plus a term: for a seed both start from
                              # the same weights and see the same batches (Table 2 pairs them)
    similarity_term: bool     # adds Duet's similarity term: reads the vanilla model and its SVD
                              # export, and its block's ranks/lambdas/sim_forms span a grid
    colour: str               # its base run's colour in every figure
    reads_guide: bool = False  # reads the vanilla model (not its SVD export) as a teacher;
                               # implied by similarity_term
    no_guide_controls: dict | None = None  # {block key: values} that make a run of the method its
                                           # no-guide control: the same term, without the trained guide


def read_method_facts(schema: dict) -> dict[str, MethodFacts]:
    """{method: its facts} for every top-level block of the params schema that states
    `x-method`, in the schema's order (the order of the tables' methods and the figures')."""
    return {name: MethodFacts(**block[METHOD_FACTS_KEY]) for name, block in schema["properties"].items()
            if isinstance(block, dict) and METHOD_FACTS_KEY in block}


# The certified methods. Adding one: a module in pipeline_src/methods/ (registered with
# `methods.base.register`), its params block in params.yaml and its block in the schema with
# its `x-method` facts; nothing else names it (docs/methods.md, "Adding a method").
METHOD_FACTS = read_method_facts(yaml.safe_load((Path(__file__).resolve().parent.parent / SCHEMA).read_text()))


# The ablation grid of a method with the similarity term (Duet, Duet-local): each list
# given in its block adds runs that differ from the base run (named after the method) in
# that key.
DUET_GRID = {"ranks": "rank", "lambdas": "lambda", "sim_forms": "sim_form"}


def _grid_value_name(key: str, value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    prefix = {"rank": "r", "lambda": "l", "sim_form": ""}[key]
    return prefix + text.replace(".", "p").replace("-", "m").replace("+", "")


# How a run that starts from another initialisation than its block's is named.
INIT_SUFFIX = {"scratch": "scratch", "vanilla_init": "vinit", "vanilla_unit_norm": "vunit"}


class CertifiedRun(NamedTuple):
    """One certified training run of the DAG."""
    method: str   # a key of METHOD_FACTS (lmt, bcp, ...): the module that trains it
    config: dict  # the method's params block, with the grid point's values
    seed: int     # run.seed, or one of `seeds`
    group: str    # the run name without its seed: the row of the tables


def reads_guide_model(method: str, cfg: dict) -> bool:
    """Whether a run of `method` with this params block reads the trained vanilla model for
    its extra term (Duet's similarity term, a teacher): not when the block makes it the
    method's no-guide control (`guide: untrained`, `distill_teacher: labels`, ...)."""
    facts = METHOD_FACTS[method]
    return (facts.similarity_term or facts.reads_guide) and not is_no_guide_config(method, cfg)


def trains_with_guide(run: CertifiedRun) -> bool:
    """Whether the trained vanilla model enters the run's training (its similarity term, a
    teacher, or its initial weights): then every number of the run depends on which guide it
    had; otherwise only its rotation similarity does (measured after training). A no-guide
    control (`guide: untrained`, an untrained or the labels' teacher) does not read it."""
    return reads_guide_model(run.method, run.config) or run.config.get("init_from") == "vanilla_unit_norm"


def is_no_guide_config(method: str, cfg: dict) -> bool:
    """Whether this params block makes a run of `method` its no-guide control
    (`no_guide_controls` of its facts): the method's extra term with an untrained network
    or the labels in the guide's place, there to tell the guide's gain from the term's
    (issue 22)."""
    controls = METHOD_FACTS[method].no_guide_controls or {}
    return any(cfg.get(key) in values for key, values in controls.items())


def is_no_guide_control(run: CertifiedRun) -> bool:
    return is_no_guide_config(run.method, run.config)


def seed_run_name(group: str, seed: int) -> str:
    return f"{group}-s{seed}"


def method_runs(params: dict) -> dict[str, CertifiedRun]:
    """{run name: CertifiedRun} for every certified training run.

    Every method in `methods` runs once under its own name; a method with the
    similarity term (Duet, Duet-local) also runs once per point of its ablation
    grid (`duet.ranks` x `duet.lambdas` x `duet.sim_forms`, a missing list
    meaning the base value) other than the base point, named e.g.
    `duet-r4-l0p1-direction` (`duet_local-r1-l1-paper`); every method once per named
    variant of its block (`duet.variants: {lam0p01: {lambda: 0.01}}`: `duet-lam0p01`,
    the block with those keys overridden). With `init_variants` set,
    each of these also runs from every listed initialisation other than its own
    (`init_from`), named e.g. `bcp-vinit`. With `seeds` set, each of
    these runs once per seed, named with the seed (`bcp-s1`); without it, once
    with run.seed under the plain name."""
    groups = {}
    for method in params["methods"]:
        cfg = params[method]
        groups[method] = (method, cfg)
        if not METHOD_FACTS[method].similarity_term:
            continue
        axes = {key: cfg.get(grid) or [cfg[key]] for grid, key in DUET_GRID.items()}
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values))
            if all(point[k] == cfg[k] for k in point):
                continue
            name = "-".join([method] + [_grid_value_name(k, v) for k, v in point.items()])
            groups[name] = (method, {**cfg, **point})
    # `variants`: named runs of any certified method, each a set of its block's keys
    # overridden (readings a grid's cross product cannot express, e.g. `direction` with
    # the probe detached, or BCP at another kappa_final), named `<method>-<name>`.
    for method in params["methods"]:
        for name, overrides in (params[method].get("variants") or {}).items():
            groups[f"{method}-{name}"] = (method, {**params[method], **overrides, "variants": None,
                                                   "variant": name})
    # `init_variants`: every run also from the other initialisations, named after them
    # (`bcp-vinit`: BCP started from the vanilla model's initial weights).
    base_groups = list(groups.items())
    for init in params.get("init_variants") or []:
        for group, (method, cfg) in base_groups:
            if cfg["init_from"] != init:
                groups[f"{group}-{INIT_SUFFIX[init]}"] = (method, {**cfg, "init_from": init})
    seeds = params.get("seeds")
    if seeds is None:
        return {group: CertifiedRun(method, cfg, params["run"]["seed"], group)
                for group, (method, cfg) in groups.items()}
    return {seed_run_name(group, seed): CertifiedRun(method, cfg, seed, group)
            for group, (method, cfg) in groups.items() for seed in seeds}


def runs_to_train(params: dict) -> dict[str, CertifiedRun]:
    """The runs of `method_runs` that the DAG trains, certifies, attacks and compares:
    all but those listed in `committed_runs`. A committed run's metrics files and history
    are in git (results/<run>/, no weights); the report stages read them like any other
    run's, but no train, certify, pgd or similarity job exists for it, so neither
    Snakemake nor DVC can try to rebuild it (nor needs its weights). This is how the
    seeds of successive GPU windows add up (docs/gpu-window.md)."""
    committed = set(params.get("committed_runs") or [])
    return {name: run for name, run in method_runs(params).items() if name not in committed}


def committed_seeds(params: dict) -> list[int]:
    """The seeds of `seeds` whose every run is in `committed_runs`: the seeds the committed
    tables of a campaign are made from (the next seed may be half trained); none without
    a `seeds` list."""
    committed = set(params.get("committed_runs") or [])
    runs = method_runs(params)
    return [seed for seed in params.get("seeds") or []
            if all(name in committed for name, run in runs.items() if run.seed == seed)]


def compose_runs(params: dict) -> list[str]:
    """The runs the compose stage composes with the guide (certify or predict, issue 22): every
    run (committed ones included) of a method in `compose.methods`."""
    methods = set(params["compose"]["methods"])
    return [name for name, run in method_runs(params).items() if run.method in methods]


def compose_runs_to_train(params: dict) -> list[str]:
    """The composed runs that have a compose job (committed ones keep their committed file)."""
    trained = runs_to_train(params)
    return [name for name in compose_runs(params) if name in trained]


def compose_reference_run(params: dict, run_name: str) -> str:
    """The run a composed run's tau is chosen against: `compose.reference`'s run of the same seed."""
    run = method_runs(params)[run_name]
    reference = params["compose"]["reference"]
    return seed_run_name(reference, run.seed) if params.get("seeds") is not None else reference


# Table 1's control rows: what an unrelated network scores against the vanilla model.
#   vanilla_control: a second vanilla model, trained like the first from another seed;
#   random: the certified architecture at initialisation, from its own seed.
SIMILARITY_CONTROLS = ("vanilla_control", "random")
SIMILARITY_DEFAULTS = {"controls": True, "control_seed_offset": 1}


def similarity_settings(params: dict) -> dict:
    """The `similarity` params block with its defaults (the block is optional)."""
    return {**SIMILARITY_DEFAULTS, **(params.get("similarity") or {})}


def control_rank(params: dict):
    """The rank Table 1's controls are measured at, and every run without Duet's
    similarity term: `duet.rank`."""
    return params["duet"]["rank"]


def similarity_rank(params: dict, run_name: str):
    """The rank a run's similarity is measured at: the own `rank` of a run with Duet's
    similarity term (a grid point's, e.g. duet-r4-l1-paper at 4; Duet-local's), `duet.rank`
    (`control_rank`) for every other method."""
    run = method_runs(params)[run_name]
    return run.config["rank"] if METHOD_FACTS[run.method].similarity_term else control_rank(params)


def control_seed(params: dict) -> int:
    """The seed of the controls: run.seed + similarity.control_seed_offset."""
    return params["run"]["seed"] + similarity_settings(params)["control_seed_offset"]
