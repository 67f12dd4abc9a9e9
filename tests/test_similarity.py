"""Table 1's measures (pipeline_src/spectral/similarity.py) and the stage that
applies them (pipeline_src/certify/similarity.py): the channel-matched
cosine sees through a permutation of hidden units (which leaves the function
unchanged) where the plain cosine does not; the subspace overlap is free of
signs and of rotations within the subspace; the runs are measured at their
own rank; the control rows."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from pipeline_src.certify.similarity import (control_metrics, random_network, similarity_controls,
                                             similarity_metrics)
from pipeline_src.config import load_params
from pipeline_src.io import save_json, save_torch, state_dict_sha256
from pipeline_src.models import build_model
from pipeline_src.paths import RunLayout, control_outputs
from pipeline_src.runs import control_seed, method_runs, similarity_rank
from pipeline_src.spectral.operator_norm import operator_norm_upper_bound
from pipeline_src.spectral.rotation import layer_matrix
from pipeline_src.spectral.similarity import (comparison_metrics, layer_svds, match_hidden_units,
                                              measures_from_svds, permute_hidden_units, subspace_overlap)
from tiny_nets import TINY, single_thread, tiny_net  # noqa: F401  (the fixture: one thread)


def _random_perms(model, seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    return [None if layer.activation is None else torch.randperm(layer.module.weight.shape[0], generator=g)
            for layer in model.weight_layers()]


def _model_6c2f(seed: int, activation: str = "relu"):
    params = load_params("smoke")
    torch.manual_seed(seed)
    return build_model({**params["model"], "activation": activation}).double().eval()


@pytest.mark.parametrize("arch,activation", [("tiny_conv", "relu"), ("tiny_conv", "clipped_relu"),
                                             ("tiny_dense", "relu")])
def test_permuting_hidden_units_keeps_the_function_and_the_matched_cosine(arch, activation):
    model = tiny_net(arch, activation, seed=3).double()
    permuted = permute_hidden_units(model, _random_perms(model, seed=5))
    x = torch.rand((16, *TINY[arch][0]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(permuted.state_dict().values(), model.state_dict().values()))

    metrics = comparison_metrics(permuted, model, rank=2)
    assert metrics["matched_similarity_mean"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["matched_similarity_full_rank_mean"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["matched_subspace_overlap_mean"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["similarity_mean"] < 90.0 and metrics["similarity_full_rank_mean"] < 90.0
    assert all(c is None or c == pytest.approx(100.0) for c in metrics["unit_match_cosine_per_layer"])


def test_the_match_undoes_a_permutation_of_6c2f_through_the_flatten():
    """6C2F: 512 dense units after the flatten of 64 channels of 8x8; the match finds
    the permutation back, channel blocks of the C,H,W order included."""
    model = _model_6c2f(seed=0)
    perms = _random_perms(model, seed=9)
    permuted = permute_hidden_units(model, perms)
    x = torch.rand((4, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(permuted(x), model(x), rtol=1e-10, atol=1e-10)

    found, cosines = match_hidden_units(permuted, model)
    assert found[-1] is None and cosines[-1] is None   # the logits keep their order
    restored = permute_hidden_units(permuted, found)
    for a, b in zip(restored.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    metrics = comparison_metrics(permuted, model, rank=8)
    assert metrics["matched_similarity_mean"] == pytest.approx(100.0, abs=1e-9)
    assert metrics["similarity_mean"] < 50.0        # the plain cosine: units out of order
    assert metrics["units_moved_per_layer"][0] > 0 and metrics["units_moved_per_layer"][-1] is None


def test_matched_measures_from_permuted_factors_are_those_of_the_permuted_network():
    """comparison_metrics permutes the SVD factors instead of decomposing the matched
    network again: the same numbers as measuring the permuted network itself."""
    model, vanilla = _model_6c2f(seed=0), _model_6c2f(seed=1)
    perms, _ = match_hidden_units(model, vanilla)
    direct = measures_from_svds(layer_svds(permute_hidden_units(model, perms)), layer_svds(vanilla), rank=4)
    via_factors = comparison_metrics(model, vanilla, rank=4)
    for name in ("similarity", "similarity_full_rank", "subspace_overlap_u", "subspace_overlap_v"):
        assert via_factors[f"matched_{name}_per_layer"] == pytest.approx(direct[name], abs=1e-8), name
    for layer, (u, s, vh) in zip(model.weight_layers(), layer_svds(model)):   # wide layers: transposed
        torch.testing.assert_close(u @ torch.diag(s) @ vh, layer_matrix(layer).double(), rtol=0, atol=1e-10)


def test_unrelated_networks_score_low_on_every_measure():
    a, b = _model_6c2f(seed=0), _model_6c2f(seed=1)
    metrics = comparison_metrics(a, b, rank=8)
    assert abs(metrics["similarity_mean"]) < 10.0
    assert abs(metrics["matched_similarity_mean"]) < 30.0
    # Random subspaces overlap about r / dim: the chance level beside the measure.
    assert metrics["subspace_overlap_mean"] == pytest.approx(metrics["subspace_overlap_chance_mean"], abs=10.0)
    assert metrics["rank_per_layer"] == [8] * 8


def test_identical_networks_score_100_on_every_measure():
    model = _model_6c2f(seed=0)
    measures = measures_from_svds(layer_svds(model), layer_svds(copy.deepcopy(model)), rank=4)
    for name in ("similarity", "similarity_full_rank", "subspace_overlap_u", "subspace_overlap_v",
                 "subspace_overlap"):
        assert measures[name] == pytest.approx([100.0] * 8, abs=1e-9), name


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn((n, r), generator=g, dtype=torch.float64)).Q


def test_subspace_overlap_is_one_for_the_same_subspace_whatever_its_basis():
    u = _orthonormal(20, 5, seed=0)
    assert subspace_overlap(u, u) == pytest.approx(1.0)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    assert subspace_overlap(u * signs, u) == pytest.approx(1.0)
    rotation = _orthonormal(5, 5, seed=1)               # any rotation within the span
    assert subspace_overlap(u @ rotation, u) == pytest.approx(1.0)
    assert subspace_overlap(u[:, [3, 1, 4, 0, 2]], u) == pytest.approx(1.0)   # order-free


@pytest.mark.parametrize("shared", [0, 1, 2, 3, 4])
def test_subspace_overlap_is_the_shared_fraction(shared: int):
    r, n = 4, 12
    eye = torch.eye(n, dtype=torch.float64)
    a = eye[:, :r]
    b = torch.cat([eye[:, :shared], eye[:, r:r + r - shared]], dim=1)
    assert subspace_overlap(a, b) == pytest.approx(shared / r)
    mixed = b @ _orthonormal(r, r, seed=shared)
    assert subspace_overlap(a, mixed) == pytest.approx(shared / r)
    with pytest.raises(ValueError):
        subspace_overlap(a, eye[:, :r + 1])


# ------------------------------------------------------------------ the stages
def _save_model(model, path: Path, model_params: dict) -> None:
    save_torch({"state_dict": model.float().state_dict(), "model": model_params}, path)


def _certify_metrics(path: Path) -> None:
    save_json({"spectral_norms": {"lipschitz_upper": 12.5, "lipschitz_estimate": 12.0}}, path)


@pytest.fixture
def smoke_run(tmp_path: Path) -> tuple[dict, Path]:
    params = load_params("smoke")
    params["run"]["device"] = "cpu"
    params["duet"]["ranks"] = [1, params["duet"]["rank"]]   # a grid point at another rank
    layout = RunLayout.of(params)
    _save_model(_model_6c2f(seed=0), tmp_path / layout.vanilla_model, params["model"])
    for name in ("bcp", "duet-r1-l1-paper"):
        _save_model(_model_6c2f(seed=1), tmp_path / layout.train(name, "model.pt"), params["model"])
        _certify_metrics(tmp_path / layout.certify(name, "metrics.json"))
    return params, tmp_path


def test_a_duet_grid_run_is_measured_at_its_own_rank(smoke_run):
    params, root = smoke_run
    runs = method_runs(params)
    assert runs["duet-r1-l1-paper"].config["rank"] == 1 != params["duet"]["rank"]
    assert similarity_rank(params, "duet-r1-l1-paper") == 1
    assert similarity_rank(params, "duet") == params["duet"]["rank"]
    assert similarity_rank(params, "bcp") == params["duet"]["rank"]
    grid = similarity_metrics(params, "duet-r1-l1-paper", root)
    bcp = similarity_metrics(params, "bcp", root)
    assert grid["rank"] == 1 and grid["rank_per_layer"] == [1] * 8
    assert bcp["rank"] == params["duet"]["rank"] and bcp["rank_per_layer"] == [params["duet"]["rank"]] * 8
    # Same weights, other rank: other numbers; the Lipschitz column is the certify stage's.
    assert grid["similarity_mean"] != bcp["similarity_mean"]
    assert grid["lipschitz_upper"] == 12.5 and grid["init_from"] == "scratch"
    written = json.loads((root / RunLayout.of(params).similarity("duet-r1-l1-paper", "metrics.json")).read_text())
    assert written["rank"] == 1 and "matched_similarity_mean" in written and "subspace_overlap_v_mean" in written
    assert written["vanilla_weights_sha256"] == state_dict_sha256(_model_6c2f(seed=0).float().state_dict())


def test_control_rows_score_the_unrelated_networks(smoke_run):
    params, root = smoke_run
    layout = RunLayout.of(params)
    assert set(control_outputs(params)) == {"vanilla_control", "random"}
    assert control_seed(params) == params["run"]["seed"] + params["similarity"]["control_seed_offset"]
    _save_model(_model_6c2f(seed=7), root / layout.vanilla_control("model.pt"), params["model"])
    save_json({"test_accuracy": 21.5, "epochs": 3}, root / layout.vanilla_control("metrics.json"))

    both = similarity_controls(params, root)
    second, random = both["vanilla_control"], both["random"]
    assert second["control"] == "vanilla_control" and second["test_accuracy"] == 21.5
    assert second["rank"] == params["duet"]["rank"] and abs(second["similarity_mean"]) < 10.0
    assert second["seed"] == control_seed(params)
    assert control_metrics(params, "vanilla_control", root)["similarity_mean"] == second["similarity_mean"]

    torch.manual_seed(12345)                # its own seed: the global random state does not matter
    network = random_network(params, torch.device("cpu"))
    state = torch.random.get_rng_state()
    assert random["weights_sha256"] == state_dict_sha256(network.state_dict())
    assert torch.equal(torch.random.get_rng_state(), state) and torch.equal(
        random_network(params, torch.device("cpu")).body[0].weight, network.body[0].weight)
    # The Lipschitz product: guaranteed upper bounds per layer (checked on the cheap layers).
    layers, upper = network.weight_layers(), random["spectral_norms"]["upper"]
    for k in (0, 1, len(layers) - 1):
        assert upper[k] == pytest.approx(operator_norm_upper_bound(layers[k]), rel=1e-12)
    assert random["lipschitz_upper"] == pytest.approx(math.prod(upper), rel=1e-12)
    assert random["lipschitz_upper"] >= random["lipschitz_estimate"]
    for control in ("vanilla_control", "random"):
        written = json.loads((root / control_outputs(params)[control]).read_text())
        assert written["control"] == control and "matched_subspace_overlap_mean" in written


def test_controls_off_write_nothing():
    params = load_params("smoke")
    params["similarity"] = {"controls": False, "control_seed_offset": 1}
    assert control_outputs(params) == {}
