"""Run profiles: `params.yaml` is the paper's configuration; a profile is an
override file `config/<name>/params.yaml` merged on top of it.

Which runs a profile's params make is `runs.py`'s; this module checks the params'
run-level keys (committed runs, variant names) against it. Kept free of torch so
that the Snakefile can import it cheaply.
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import StageError
from .runs import DUET_GRID, INIT_SUFFIX, METHOD_FACTS, SCHEMA, method_runs, read_method_facts

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_PARAMS = "params.yaml"
PAPER_PROFILE = "paper"


class ParamsError(StageError, ValueError):
    """A params file or key is wrong; the message names the file and the key."""


def profile_override_path(profile: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The override file of a profile; the paper profile is params.yaml alone."""
    if profile == PAPER_PROFILE:
        return None
    return root / "config" / profile / "params.yaml"


def dvc_yaml_path(profile: str, root: Path = PROJECT_ROOT) -> Path:
    """The dvc.yaml generated for a profile (`export-dvc`): ./dvc.yaml for the paper's,
    config/<name>/dvc.yaml beside the override file for any other."""
    override = profile_override_path(profile, root)
    return root / "dvc.yaml" if override is None else override.parent / "dvc.yaml"


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
    """The params schema, with what its method blocks imply written out: every block that
    states `x-method` is required, and its name is one `methods` may list."""
    schema = yaml.safe_load((root / SCHEMA).read_text())
    methods = list(read_method_facts(schema))
    schema["required"] = [*schema["required"], *methods]
    schema["properties"]["methods"]["items"] = {"enum": methods}
    return schema


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
    for key in ("committed_runs", "timed_runs"):
        unknown = sorted(set(params.get(key) or []) - set(method_runs(params)))
        if unknown:
            raise ParamsError(f"{source}: key '{key}': {', '.join(unknown)} not runs of this profile "
                              f"({', '.join(method_runs(params))})")
    check_schedules(params, source)
    check_variants(params, source)
    check_compose(params, source)
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


def check_compose(params: dict, source: str) -> None:
    """The compose stage (certify or predict) composes the runs of the methods in both
    `compose.methods` and `methods` (a profile that trains a subset of its methods composes
    what it trains), with the guide among its h's, chooses tau on a validation split against a
    method the profile trains, and has tau = 0 (the run alone) in its grid; its second vanilla
    model is Table 1's control, which `similarity.controls` must build."""
    cfg = params["compose"]
    where = f"{source}: key 'compose"
    unknown = [method for method in cfg["methods"] if method not in METHOD_FACTS]
    if unknown:
        raise ParamsError(f"{where}.methods': {', '.join(unknown)} not certified methods "
                          f"({', '.join(METHOD_FACTS)})")
    if "vanilla" not in cfg["guides"]:
        raise ParamsError(f"{where}.guides': must hold vanilla (the guide; the others are its controls)")
    if 0 not in cfg["taus"]:
        raise ParamsError(f"{where}.taus': must hold 0 (the certified run alone, the curve's start)")
    if not any(method in params["methods"] for method in cfg["methods"]):
        return
    if cfg["reference"] not in params["methods"]:
        raise ParamsError(f"{where}.reference': {cfg['reference']} not in methods ({', '.join(params['methods'])})")
    if "vanilla_control" in cfg["guides"] and not (params.get("similarity") or {}).get("controls", True):
        raise ParamsError(f"{where}.guides': vanilla_control needs similarity.controls: true (its stage builds "
                          "it), or drop it from the list")
    if params["data"]["val_size"] == 0:
        raise ParamsError(f"{where}': tau is chosen on the validation split, and data.val_size is 0")


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
