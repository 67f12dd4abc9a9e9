"""Params: profiles merge over params.yaml, and every bad key or value is
stopped with a message that names it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pipeline_src.cli import main
from pipeline_src.config import PROJECT_ROOT, ParamsError, deep_merge, load_params
from pipeline_src.runs import method_runs
from pipeline_src.paths import RunLayout


def test_paper_profile_is_the_papers_configuration():
    params = load_params("paper")
    assert params["model"]["arch"] == "6C2F"
    assert params["data"]["source"] == "torchvision" and params["data"]["val_size"] == 5000
    assert RunLayout.of(params).root == "results/paper"


def test_smoke_overrides_only_its_keys():
    paper, smoke = load_params("paper"), load_params("smoke")
    assert smoke["data"]["source"] == "sample" and smoke["run"]["device"] == "cpu"
    assert smoke["vanilla"]["optimizer"] == paper["vanilla"]["optimizer"]   # inherited
    assert smoke["vanilla"]["epochs"] < paper["vanilla"]["epochs"]
    assert RunLayout.of(smoke).root != RunLayout.of(paper).root


def test_deep_merge_replaces_lists_and_leaves_inputs_alone():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 0}
    merged = deep_merge(base, {"a": {"c": [3]}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 0}
    assert base["a"]["c"] == [1, 2]


@pytest.fixture
def params_root(tmp_path: Path) -> Path:
    for name in ("params.yaml", "workflow/schemas/params.schema.yaml", "config/smoke/params.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _edit(root: Path, path: str, change) -> None:
    data = yaml.safe_load((root / path).read_text())
    change(data)
    (root / path).write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("change, key", [
    (lambda p: p["vanilla"].update(epoch=3), "vanilla.epoch"),
    (lambda p: p.update(trainig={}), "trainig"),
    (lambda p: p["data"].update(val_size=-1), "data.val_size"),
    (lambda p: p["model"].update(arch="7C2F"), "model.arch"),
    (lambda p: p["svd"].update(ranks=[]), "svd.ranks"),
    (lambda p: p["vanilla"]["augment"].update(flip="yes"), "vanilla.augment.flip"),
    (lambda p: p["data"].update(sha256="abc"), "data.sha256"),
    (lambda p: p["run"].pop("seed"), "run"),
    (lambda p: p.update(committed_runs=["bcp-s9"]), "committed_runs"),
    (lambda p: p.update(timed_runs=["bcp", "no-such-run"]), "timed_runs"),
    (lambda p: p["compose"].update(methods=["lmtt"]), "compose.methods"),
    (lambda p: p["compose"].update(methods=["lmt"], reference="gloro"), "compose.reference"),
    (lambda p: p["compose"].update(methods=["lmt"], guides=["untrained"]), "compose.guides"),
    (lambda p: p["compose"].update(methods=["lmt"], taus=[0.1, 0.2]), "compose.taus"),
    (lambda p: p["compose"].update(taus=[-0.1]), "compose.taus.0"),
    (lambda p: (p["compose"].update(methods=["lmt"]), p["data"].update(val_size=0)), "compose"),
])
def test_bad_params_name_the_key(params_root: Path, change, key: str):
    _edit(params_root, "params.yaml", change)
    with pytest.raises(ParamsError, match=rf"'{key}'") as err:
        load_params("paper", params_root)
    assert "params.yaml" in str(err.value)


def test_bad_key_in_a_profile_names_the_profile_file(params_root: Path):
    _edit(params_root, "config/smoke/params.yaml", lambda p: p["vanilla"].update(lr=-1))
    with pytest.raises(ParamsError, match=r"config/smoke/params.yaml.*'vanilla.lr'"):
        load_params("smoke", params_root)


def test_unknown_profile_lists_the_known_ones(params_root: Path):
    with pytest.raises(ParamsError, match="profiles: paper, smoke"):
        load_params("smokey", params_root)


def test_unreadable_params_file(params_root: Path):
    (params_root / "params.yaml").write_text("run: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params("paper", params_root)


def test_cli_reports_a_bad_profile_in_one_line(capsys):
    assert main(["check-params", "--profile", "no-such-profile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: profile 'no-such-profile'") and err.count("\n") == 1


def test_duet_grid_adds_runs_beside_the_base_run():
    params = load_params("paper")
    params["duet"].update(lambdas=None, sim_forms=None)
    assert list(method_runs(params)) == params["methods"]        # no grid: one run per method
    params["duet"].update(ranks=[1, 8, "full"], lambdas=[0.1, 1.0], sim_forms=None)
    runs = method_runs(params)
    duet_runs = [name for name in runs if name.startswith("duet")]
    assert duet_runs[0] == "duet" and len(duet_runs) == 6          # 3 x 2 points, the base once
    assert "duet-r8-l1-paper" not in runs                          # the base point is `duet`
    method, cfg, seed, group = runs["duet-r1-l0p1-paper"]
    assert method == "duet" and cfg["rank"] == 1 and cfg["lambda"] == 0.1
    assert seed == params["run"]["seed"] and group == "duet-r1-l0p1-paper"
    assert runs["duet-rfull-l1-paper"].config["rank"] == "full"
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-") for name in runs)
    assert params["duet"]["rank"] == 8                             # the params are not changed


def test_paper_profile_trains_the_papers_runs_only():
    params = load_params("paper")
    runs = method_runs(params)
    assert list(runs) == ["lmt", "bcp", "localbcp", "duet"]
    assert runs["duet"].config["lambda"] == 1.0 and runs["duet"].config["sim_form"] == "paper"
    assert runs["duet"].config["cert_rotation"] == "normalized_weight"


def test_ablation_profile_ablates_lambda_on_a_log_grid_for_every_form():
    runs = method_runs(load_params("ablation"))
    duet = {(r.config["lambda"], r.config["sim_form"]) for r in runs.values() if r.method == "duet"}
    assert duet == {(lam, form) for lam in (0.01, 0.1, 1.0) for form in ("paper", "direction", "cosine")}
    assert runs["duet"].config["lambda"] == 1.0 and runs["duet"].config["sim_form"] == "paper"
    assert "duet-r8-l0p01-cosine" in runs and {"lmt", "bcp", "localbcp"} <= set(runs)


def test_init_variants_add_runs_from_the_other_initialisation():
    params = load_params("smoke")
    params["init_variants"] = ["scratch", "vanilla_init"]
    runs = method_runs(params)
    base = [name for name, run in runs.items() if run.config["init_from"] == "scratch"]
    assert base == list(method_runs(load_params("smoke")))
    assert [name for name in runs if name not in base] == [f"{name}-vinit" for name in base]
    assert runs["bcp-vinit"].config["init_from"] == "vanilla_init" and runs["bcp-vinit"].method == "bcp"
    params["bcp"] = {**params["bcp"], "init_from": "vanilla_init"}
    runs = method_runs(params)
    assert runs["bcp"].config["init_from"] == "vanilla_init" and runs["bcp-scratch"].config["init_from"] == "scratch"
    assert "bcp-vinit" not in runs


def test_smoke_profile_runs_every_method_once():
    """A grid point costs the smoke run a whole chain (35 s): the grid is tested in
    memory (here, tests/test_similarity.py), the smoke DAG runs each method once."""
    params = load_params("smoke")
    assert list(method_runs(params)) == params["methods"]


def test_seeds_run_every_method_and_grid_point_once_per_seed():
    params = load_params("smoke")
    params["duet"]["ranks"] = [1, params["duet"]["rank"]]
    groups = list(method_runs(params))
    params["seeds"] = [0, 3]
    runs = method_runs(params)
    assert set(runs) == {f"{group}-s{seed}" for group in groups for seed in (0, 3)}
    assert runs["bcp-s3"].seed == 3 and runs["bcp-s3"].group == "bcp" and runs["bcp-s3"].method == "bcp"
    assert runs["duet-r1-l1-paper-s0"].config["rank"] == 1


@pytest.mark.parametrize("seeds", [[], [0, 0], [-1], "0"])
def test_bad_seeds_are_refused_with_the_key_named(seeds, tmp_path):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    base["seeds"] = seeds
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "workflow/schemas").mkdir(parents=True)
    (tmp_path / "workflow/schemas/params.schema.yaml").write_text(
        (ROOT / "workflow/schemas/params.schema.yaml").read_text())
    with pytest.raises(ParamsError, match="seeds"):
        load_params("paper", tmp_path)


def test_gpu_profile_keeps_the_papers_schedule_shapes():
    """Shorter schedules, the same shares of warm-up, ramp and decay (within 3 points)."""
    paper, gpu = load_params("paper"), load_params("gpu")
    assert gpu["data"]["source"] == "images" and gpu["model"]["arch"] == "6C2F"
    assert gpu["run"]["device"] == "cuda" and gpu["run"]["name"] == "gpu"
    for method in ("lmt", "bcp", "localbcp", "duet"):
        short, full = gpu[method], paper[method]
        assert short["epochs"] < full["epochs"]
        for key in ("warmup_epochs", "ramp_epochs"):
            assert abs(short[key] / short["epochs"] - full[key] / full["epochs"]) <= 0.03, (method, key)
        assert short["lr_schedule"]["kind"] == full["lr_schedule"]["kind"]
        assert short["batch_size"] == full["batch_size"] and short["eps_train"] == full["eps_train"]
    assert [r for r in method_runs(gpu)] == ["lmt", "bcp", "localbcp", "duet"]


def test_git_commit_names_the_commit_of_a_copy(tmp_path, monkeypatch):
    """A tree copied to a GPU machine may carry a stale .git: $PIPELINE_GIT_COMMIT wins."""
    from pipeline_src.io import git_commit

    monkeypatch.delenv("PIPELINE_GIT_COMMIT", raising=False)
    assert git_commit(tmp_path) == "unknown"                 # not a checkout
    monkeypatch.setenv("PIPELINE_GIT_COMMIT", "f831cb0")
    assert git_commit(tmp_path) == "f831cb0+copy"
    assert git_commit(Path(__file__).resolve().parents[1]) == "f831cb0+copy"


# ---------------------------------------------------------------- what a person writes
def _project_copy(tmp_path: Path) -> Path:
    for rel in ("params.yaml", "workflow/schemas/params.schema.yaml", "config/smoke/params.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, tmp_path / rel)
    return tmp_path


def test_numbers_in_any_yaml_spelling_and_hashes_as_strings(tmp_path):
    root = _project_copy(tmp_path)
    profile = root / "config/smoke/params.yaml"
    zeros = "0" * 64
    profile.write_text(profile.read_text() + f"\nbcp:\n  lr: 1e-3\n  weight_decay: 5E-6\n"
                       f"data:\n  sha256: {zeros}\n")
    params = load_params("smoke", root)
    assert params["bcp"]["lr"] == 0.001 and params["bcp"]["weight_decay"] == 5e-6
    assert params["data"]["sha256"] == zeros            # not the integer 0
    assert load_params("smoke")["bcp"]["lr"] == 0.001


def test_a_bad_key_names_the_file_that_sets_it(tmp_path):
    root = _project_copy(tmp_path)
    profile = root / "config/smoke/params.yaml"
    original = profile.read_text()
    profile.write_text(original.replace("  val_size: 100", "  val_size: -5"))
    with pytest.raises(ParamsError, match=r"^config/smoke/params\.yaml: key 'data\.val_size'"):
        load_params("smoke", root)
    profile.write_text(original + "\nbcp:\n  bogus: 1\n")
    with pytest.raises(ParamsError, match=r"^config/smoke/params\.yaml: unknown key 'bcp\.bogus'"):
        load_params("smoke", root)
    profile.write_text(original)
    base = root / "params.yaml"
    base.write_text(base.read_text().replace("  val_size: 5000", "  val_size: 5000\n  extra: 1"))
    with pytest.raises(ParamsError, match=r"^params\.yaml: unknown key 'data\.extra'"):
        load_params("smoke", root)


def test_a_ramp_past_the_last_epoch_is_refused(tmp_path):
    root = _project_copy(tmp_path)
    profile = root / "config/smoke/params.yaml"
    profile.write_text(profile.read_text().replace("  ramp_epochs: 1\n  batch_size: 64\n  compile: false",
                                                   "  ramp_epochs: 5\n  batch_size: 64\n  compile: false", 1))
    with pytest.raises(ParamsError, match=r"key 'bcp\.ramp_epochs'.*exceed bcp\.epochs \(2\)"):
        load_params("smoke", root)


def _params_root(tmp_path: Path) -> Path:
    """params.yaml, the schema and the smoke profile: enough for load_params."""
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(ROOT / "workflow" / "schemas", tmp_path / "workflow" / "schemas")
    shutil.copytree(ROOT / "config" / "smoke", tmp_path / "config" / "smoke")
    return tmp_path


def test_a_copied_profile_that_keeps_another_profiles_run_name_is_refused(tmp_path: Path):
    root = _params_root(tmp_path)
    shutil.copytree(root / "config" / "smoke", root / "config" / "mine")
    for profile, other in (("mine", "smoke"), ("smoke", "mine")):
        with pytest.raises(ParamsError, match=f"run.name.*'smoke' is also profile '{other}'s") as err:
            load_params(profile, root)
        assert "\n" not in str(err.value) and f"config/{profile}/params.yaml" in str(err.value)
    # Its own name: both load, each into its own folder.
    path = root / "config" / "mine" / "params.yaml"
    path.write_text(path.read_text().replace("name: smoke", "name: mine"))
    assert RunLayout.of(load_params("mine", root)).root != RunLayout.of(load_params("smoke", root)).root
    # A profile named after the paper's results folder is refused too.
    path.write_text(path.read_text().replace("name: mine", "name: paper"))
    with pytest.raises(ParamsError, match="also profile 'paper'"):
        load_params("mine", root)


def test_every_bad_key_of_a_file_is_reported_at_once_with_its_line(tmp_path: Path):
    root = _params_root(tmp_path)
    path = root / "config" / "smoke" / "params.yaml"
    lines = path.read_text().splitlines()
    val_line = next(i for i, line in enumerate(lines) if line == "  val_size: 100") + 1
    text = path.read_text().replace("  val_size: 100", "  val_sise: 100").replace(
        "  power_iterations: 100", "  power_iterations: -1").replace("\nlmt:\n", "\nlmt:\n  epohcs: 2\n")
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params("smoke", root)
    message = str(err.value)
    assert "\n" not in message and message.endswith("(3 problems)")
    assert (f"config/smoke/params.yaml: unknown key 'data.val_sise' at line {val_line} "
            "(did you mean 'data.val_size'?)") in message
    assert "unknown key 'lmt.epohcs'" in message and "(did you mean 'lmt.epochs'?)" in message
    assert "key 'svd.power_iterations' at line" in message


# ---------------------------------------------------------------- named variants
def _with_variants(root: Path, block: str, variants: dict) -> None:
    path = root / "config" / "smoke" / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params[block] = {**params[block], "variants": variants}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_named_variants_are_runs_with_their_keys_overridden(tmp_path: Path):
    """`variants: {name: {key: value}}` adds the run `<method>-<name>`: readings a grid's
    cross product cannot express; a Duet variant is paired with BCP like Duet."""
    root = _params_root(tmp_path)
    _with_variants(root, "duet", {"lambda_0p01": {"lambda": 0.01},
                                  "direction_detached": {"sim_form": "direction", "detach_probe": True}})
    _with_variants(root, "bcp", {"kappa_half": {"kappa_final": 0.5}})
    params = load_params("smoke", root)
    runs = method_runs(params)
    assert {"duet-lambda_0p01", "duet-direction_detached", "bcp-kappa_half"} <= set(runs)
    detached = runs["duet-direction_detached"]
    assert detached.method == "duet" and detached.config["sim_form"] == "direction"
    assert detached.config["detach_probe"] is True and detached.config["lambda"] == params["duet"]["lambda"]
    assert runs["duet-lambda_0p01"].config["lambda"] == 0.01 and runs["duet"].config["lambda"] == 1.0
    assert runs["bcp-kappa_half"].config["kappa_final"] == 0.5 and runs["bcp"].config["kappa_final"] == 0.0
    params["seeds"] = [0, 2]
    assert {"duet-lambda_0p01-s0", "duet-lambda_0p01-s2"} <= set(method_runs(params))

    from pipeline_src.report.collect import group_label
    assert group_label("duet-lambda_0p01", runs["duet-lambda_0p01"]) == "Duet lambda_0p01"


@pytest.mark.parametrize("block,variants,message", [
    ("duet", {"lam": {"lamda": 0.01}},
     r"unknown key 'duet\.variants\.lam\.lamda' at line \d+ \(did you mean 'duet\.variants\.lam\.lambda'\?\)"),
    ("bcp", {"term": {"sim_form": "direction"}}, r"key 'bcp\.variants\.term\.sim_form': not a key of the bcp block"),
    ("duet", {"lam": {"lambda": -1}}, r"key 'duet\.variants\.lam\.lambda'.*minimum"),
    ("duet", {"grid": {"ranks": [1, 2]}}, r"duet\.variants\.grid\.ranks': a variant cannot set ranks"),
    ("duet", {"Bad-Name": {"lambda": 0.1}}, r"duet\.variants"),
    ("bcp", {"vinit": {"kappa_final": 0.5}}, r"'bcp-vinit' would read as an init variant or a seed"),
    ("bcp", {"s1": {"kappa_final": 0.5}}, r"'bcp-s1' would read as an init variant or a seed"),
    ("bcp", {"long_ramp": {"ramp_epochs": 9}}, r"key 'bcp\.variants\.long_ramp\.ramp_epochs'.*exceed"),
])
def test_a_bad_variant_is_one_line_naming_its_key(tmp_path: Path, block, variants, message):
    root = _params_root(tmp_path)
    _with_variants(root, block, variants)
    with pytest.raises(ParamsError, match=message) as err:
        load_params("smoke", root)
    assert "\n" not in str(err.value) and "config/smoke/params.yaml" in str(err.value)
