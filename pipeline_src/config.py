"""Run profiles: `params.yaml` is the paper's configuration; a profile is an
override file `config/<name>/params.yaml` merged on top of it.

Kept free of torch so that the Snakefile can import it cheaply.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .errors import StageError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_PARAMS = "params.yaml"
SCHEMA = "workflow/schemas/params.schema.yaml"
PAPER_PROFILE = "paper"


class ParamsError(StageError, ValueError):
    """A params file or key is wrong; the message names the file and the key."""


def profile_override_path(profile: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The override file of a profile; the paper profile is params.yaml alone."""
    if profile == PAPER_PROFILE:
        return None
    return root / "config" / profile / "params.yaml"


def deep_merge(base: dict, override: dict) -> dict:
    """Dicts merge key by key; any other value (lists included) is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class ParamsLoader(yaml.SafeLoader):
    """YAML as a person writes params: `1e-3` and `5E-6` are numbers (PyYAML's YAML 1.1
    resolver wants a dot, `1.0e-3`, and reads `1e-3` as a string), and a hex digest is a
    string even when all its digits are decimal (`000...0` would become the integer 0)."""


ParamsLoader.yaml_implicit_resolvers = {key: list(value) for key, value in
                                        yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "0123456789abcdef":
    ParamsLoader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:str", re.compile(r"^[0-9a-f]{64}$")))
ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.load(path.read_text(), Loader=ParamsLoader)
    except yaml.YAMLError as err:
        # One line: where the parser stopped and why (PyYAML's own message spans several).
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of params at the top level")
    return data


def load_schema(root: Path = PROJECT_ROOT) -> dict:
    return yaml.safe_load((root / SCHEMA).read_text())


def _holds(mapping: dict, path: list) -> bool:
    """Whether the nested mapping sets the key at `path` (or one of its parents); a list
    item counts as set by the file that sets the list (a list is replaced whole, not merged)."""
    for part in path:
        if isinstance(mapping, list) and isinstance(part, int) and part < len(mapping):
            mapping = mapping[part]
            continue
        if not isinstance(mapping, dict) or part not in mapping:
            return False
        mapping = mapping[part]
    return True


def _key_line(path: Path, keys: list) -> int | None:
    """The line (1-based) of the key at `keys` in a YAML file, or of its deepest parent
    that the file holds; None when the file cannot be read."""
    try:
        node = yaml.compose(path.read_text(), Loader=ParamsLoader)
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in keys:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _params_error_text(err, source: str, root: Path, override: tuple[dict, str] | None) -> str:
    """One schema error as `file: key 'a.b' at line N: message` (an unknown key: `file:
    unknown key 'a.b' at line N (did you mean 'a.c'?)`), naming the file that sets it:
    `override` (its params, its name) when that file sets the key, else `source`."""
    import difflib

    path = list(err.absolute_path)
    unknown = []
    if err.validator == "additionalProperties":
        unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        path += unknown[:1]
    if override is not None:
        source = override[1] if path and _holds(override[0], path) else source.split(" + ")[0]
    key = ".".join(str(p) for p in path)
    line = _key_line(root / source, path) if path else None
    where = f" at line {line}" if line else ""
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(err.schema.get("properties", {})), n=1)
        hint = f" (did you mean '{'.'.join([str(p) for p in path[:-1]] + close)}'?)" if close else ""
        return f"{source}: unknown key '{key}'{where}{hint}"
    return f"{source}: key '{key or '<top>'}'{where}: {err.message}"


def validate_params(params: dict, source: str = "params", root: Path = PROJECT_ROOT,
                    override: tuple[dict, str] | None = None) -> None:
    """Raise ParamsError naming every offending key (dotted path), each with the file
    that sets it and its line there, on one line (the first error first)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema(root))
    errors = sorted(validator.iter_errors(params), key=lambda e: [str(p) for p in e.absolute_path])
    if not errors:
        return
    texts = []
    for err in errors:
        if err.validator == "additionalProperties":
            # One error per unknown key (jsonschema reports their parent once).
            for name in sorted(set(err.instance) - set(err.schema.get("properties", {}))):
                single = copy.copy(err)
                single.instance = {name: None}
                texts.append(_params_error_text(single, source, root, override))
        else:
            texts.append(_params_error_text(err, source, root, override))
    texts = list(dict.fromkeys(texts))
    raise ParamsError("; ".join(texts) + (f" ({len(texts)} problems)" if len(texts) > 1 else ""))


def load_params(profile: str = PAPER_PROFILE, root: Path = PROJECT_ROOT,
                base: str | Path = BASE_PARAMS) -> dict[str, Any]:
    """The validated params of a profile: params.yaml, then the profile's overrides."""
    base_path = Path(base) if Path(base).is_absolute() else root / base
    params = _read_yaml(base_path)
    source = str(base_path.name)
    override = profile_override_path(profile, root)
    if override is not None:
        if not override.is_file():
            known = sorted(p.parent.name for p in (root / "config").glob("*/params.yaml"))
            raise ParamsError(
                f"profile '{profile}': {override} not found (profiles: {', '.join([PAPER_PROFILE] + known)})")
        override_params = _read_yaml(override)
        params = deep_merge(params, override_params)
        source = f"{base_path.name} + {override.relative_to(root)}"
        validate_params(params, source, root, (override_params, str(override.relative_to(root))))
    else:
        validate_params(params, source, root)
    unknown = sorted(set(params.get("committed_runs") or []) - set(method_runs(params)))
    if unknown:
        raise ParamsError(f"{source}: key 'committed_runs': {', '.join(unknown)} not runs of this profile "
                          f"({', '.join(method_runs(params))})")
    check_schedules(params, source)
    check_variants(params, source)
    check_run_name(profile, params, root, source)
    params["profile"] = profile
    return params


def profile_run_names(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{profile: its run.name} of params.yaml and every config/<name>/params.yaml, as
    written (a profile without run.name has params.yaml's)."""
    base = (_read_yaml(root / BASE_PARAMS).get("run") or {}).get("name", PAPER_PROFILE)
    names = {PAPER_PROFILE: base}
    for path in sorted((root / "config").glob("*/params.yaml")):
        try:
            names[path.parent.name] = (_read_yaml(path).get("run") or {}).get("name", base)
        except (ParamsError, AttributeError):
            continue   # that profile's own load names its problem
    return names


def check_run_name(profile: str, params: dict, root: Path, source: str) -> None:
    """Refuse a profile whose results folder, results/<run.name>/, is another profile's
    (a copied profile that kept its run.name would overwrite the original's results)."""
    name = params["run"]["name"]
    others = sorted(other for other, other_name in profile_run_names(root).items()
                    if other != profile and other_name == name)
    if others:
        raise ParamsError(f"{source}: key 'run.name': '{name}' is also profile '{others[0]}'s run.name "
                          f"(both would write results/{name}/): give this profile its own, e.g. "
                          f"run.name: {profile}")


def check_variants(params: dict, source: str) -> None:
    """A variant overrides keys its block has (the schema checked the values), makes no
    runs of its own, has a schedule that reaches eps_train, and a name that reads as no
    other run's (`bcp-vinit` is an init variant, `bcp-s1` a seed)."""
    import difflib

    forbidden = ("variants", *DUET_GRID)   # keys that make runs themselves
    for method in params["methods"]:
        cfg = params[method]
        for name, overrides in (cfg.get("variants") or {}).items():
            where = f"{source}: key '{method}.variants.{name}"
            if name in INIT_SUFFIX.values() or re.fullmatch(r"s[0-9]+", name):
                raise ParamsError(f"{where}': '{method}-{name}' would read as an init variant or a seed; "
                                  f"choose another name")
            for key in overrides:
                if key in forbidden:
                    raise ParamsError(f"{where}.{key}': a variant cannot set {key} (it makes runs itself)")
                if key not in cfg:
                    close = difflib.get_close_matches(key, [k for k in cfg if k not in forbidden], n=1)
                    hint = f" (did you mean '{method}.variants.{name}.{close[0]}'?)" if close else ""
                    raise ParamsError(f"{where}.{key}': not a key of the {method} block{hint}")
            check_schedules({f"{method}.variants.{name}": {**cfg, **overrides}}, source)


def check_schedules(params: dict, source: str) -> None:
    """A ramp that ends after the last epoch never reaches eps_train: refuse it."""
    for method, cfg in params.items():
        if not (isinstance(cfg, dict) and {"epochs", "warmup_epochs", "ramp_epochs"} <= cfg.keys()):
            continue   # not a certified method's block
        if cfg["warmup_epochs"] + cfg["ramp_epochs"] > cfg["epochs"]:
            raise ParamsError(
                f"{source}: key '{method}.ramp_epochs': warm-up ({cfg['warmup_epochs']}) + ramp "
                f"({cfg['ramp_epochs']}) epochs exceed {method}.epochs ({cfg['epochs']}): eps would never "
                f"reach eps_train")


def read_base_params(root: Path = PROJECT_ROOT) -> dict:
    """params.yaml as written, before any profile and unvalidated."""
    return _read_yaml(root / BASE_PARAMS)


def benchmark_archs(params: dict) -> list[str]:
    """The architectures the benchmark times: `benchmark.archs`, or model.arch."""
    return params["benchmark"]["archs"] or [params["model"]["arch"]]


def benchmark_methods(params: dict) -> list[str]:
    """What the benchmark times: `benchmark.methods` (any method with a params
    block, or a run of the profile), or the profile's `methods`."""
    return params["benchmark"].get("methods") or params["methods"]


class MethodFacts(NamedTuple):
    """What the DAG and the report need to know of a certified method, kept free of torch
    (the Snakefile reads this module). The method classes (pipeline_src/methods/) carry
    the same facts as attributes; registering a class checks that they agree."""
    label: str                # the method's name in the tables and figures
    paired_with: str | None   # the method this one is plus a term: for a seed both start from
                              # the same weights and see the same batches (Table 2 pairs them)
    similarity_term: bool     # adds Duet's similarity term: reads the vanilla model and its SVD
                              # export, and its block's ranks/lambdas/sim_forms span a grid
    colour: str               # its base run's colour in every figure


# One row per certified method. Adding a method: a module in pipeline_src/methods/, a
# params block (params.yaml and the schema) and a row here (label, pairing, guide, colour).
METHOD_FACTS = {
    "lmt": MethodFacts("LMT", None, False, "#7f7f7f"),
    "bcp": MethodFacts("BCP", None, False, "#1f77b4"),
    "localbcp": MethodFacts("LocalBCP", None, False, "#2ca02c"),
    "duet": MethodFacts("Duet", "bcp", True, "#d62728"),
    "gloro": MethodFacts("GloRo", None, False, "#17becf"),
    "duet_local": MethodFacts("Duet-local", "localbcp", True, "#8c564b"),
}


# The ablation grid of a method with the similarity term (Duet, Duet-local): each list
# given in its block adds runs that differ from the base run (named after the method) in
# that key.
DUET_GRID = {"ranks": "rank", "lambdas": "lambda", "sim_forms": "sim_form"}


def _grid_value_name(key: str, value) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    prefix = {"rank": "r", "lambda": "l", "sim_form": ""}[key]
    return prefix + text.replace(".", "p").replace("-", "m").replace("+", "")


# How a run that starts from another initialisation than its block's is named.
INIT_SUFFIX = {"scratch": "scratch", "vanilla_init": "vinit"}


class CertifiedRun(NamedTuple):
    """One certified training run of the DAG."""
    method: str   # a key of METHOD_FACTS (lmt, bcp, ...): the module that trains it
    config: dict  # the method's params block, with the grid point's values
    seed: int     # run.seed, or one of `seeds`
    group: str    # the run name without its seed: the row of the tables


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
    import itertools

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
