"""Duet (pipeline_src/methods/duet.py): BCP plus lambda * loss_sim pulling each
layer's rotation towards the vanilla model's rank-r U_r V_r^T; the rotation
factors (pipeline_src/spectral/rotation.py) and the similarity metric
(pipeline_src/spectral/similarity.py).

Everything runs on the CPU with one torch thread; the guide (vanilla model and
its SVD factors) is built here, except in the training tests, which lay out a
tiny run (data cache, vanilla model, `export_svd`) and call `train_certified`.
"""
from __future__ import annotations

import copy
import csv
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_src.bounds.bcp import bcp_worst_logits
from pipeline_src.config import load_params
from pipeline_src.data.cifar import build_cache
from pipeline_src.methods import METHODS, build_method
from pipeline_src.methods.base import CertifiedMethod
from pipeline_src.methods.duet import Duet
from pipeline_src.models import WeightLayer, build_model
from pipeline_src.paths import RunLayout
from pipeline_src.spectral.operator_norm import apply_operator, matrix_view, power_iteration
from pipeline_src.spectral.rotation import (FactorisedRotation, apply_rotation, exact_rotation, layer_matrix,
                                            top_rank_rotation)
from pipeline_src.spectral.similarity import layer_svds, measures_from_svds
from pipeline_src.spectral.svd_export import export_svd
from pipeline_src.training import certified as certified_training
from pipeline_src.training import vanilla as vanilla_training
from pipeline_src.training.vanilla_checks import check_guide
from pipeline_src.runtime import seed_everything, stage_seed
from pipeline_src.runs import method_runs, trains_with_guide
from pipeline_src.training.common import vanilla_initial_model
from conftest import save_cut_cache

SEED = 0
GUIDE_POWER_ITERATIONS = 200


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params("smoke")


def _vanilla_model(params: dict) -> nn.Module:
    """The guide as `train_vanilla` initialises it (its stage seed), untrained."""
    seed_everything(stage_seed(SEED, "vanilla"))
    return build_model(params["model"]).eval()


def _certification_model(params: dict) -> nn.Module:
    """The certification model as `train_certified` initialises it for duet (BCP's seed)."""
    seed_everything(stage_seed(SEED, "train", "bcp"))
    return build_model({**params["model"], **params["duet"]["model"]})


@pytest.fixture(scope="module")
def vanilla(params) -> nn.Module:
    return _vanilla_model(params).requires_grad_(False)


def make_factors(model: nn.Module, estimates: list[float] | None = None) -> dict:
    """The export's per-layer format: U (out x k), S, V (in x k) of the matrix view from a
    float64 SVD stored as float32, the matrix shape, and the operator-norm estimate."""
    generator = torch.Generator().manual_seed(SEED)
    layers = []
    for i, layer in enumerate(model.weight_layers()):
        weight = matrix_view(layer.module).detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        if estimates is None:
            estimate, _ = power_iteration(layer, GUIDE_POWER_ITERATIONS, generator=generator)
        else:
            estimate = estimates[i]
        layers.append({"U": u.float().contiguous(), "S": s.float(), "V": vh.t().float().contiguous(),
                       "matrix_shape": tuple(weight.shape), "operator_norm_estimate": estimate})
    return {"metadata": {}, "layers": layers}


@pytest.fixture(scope="module")
def factors(vanilla) -> dict:
    return make_factors(vanilla)


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand((8, 3, 32, 32), generator=generator),
            torch.randint(0, 10, (8,), generator=generator))


def duet_cfg(params: dict, **overrides) -> dict:
    return {**copy.deepcopy(params["duet"]), **overrides}


def make_duet(model, cfg, vanilla, factors, seed: int = 1):
    return build_method("duet", model, cfg, torch.Generator().manual_seed(seed), 200,
                        {"guide": {"model": vanilla, "factors": factors}})


def copy_of(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model).requires_grad_(True)
    clone.train()
    return clone


def sim_loss(method, x, y) -> torch.Tensor:
    logits = method.forward(x)
    return method.regulariser(x, y, logits)


def van_rotation(factors: dict, i: int, rank) -> torch.Tensor:
    f = factors["layers"][i]
    r = min(f["matrix_shape"]) if rank == "full" else min(rank, min(f["matrix_shape"]))
    return f["U"][:, :r] @ f["V"][:, :r].t()


def with_singular_values(rows: int, cols: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64)).Q
    return u @ torch.diag(values.double()) @ v.t()


def by_hand_vanilla_sigma(vanilla, factors, i: int, reading: str) -> float:
    """sigma_van from the vanilla layer's weight itself (the operator norm: the export's
    estimate, which only a power iteration gives)."""
    matrix = matrix_view(vanilla.weight_layers()[i].module).detach().double()
    if reading == "weight_matrix":
        return torch.linalg.svdvals(matrix)[0].item()
    if reading == "frobenius":
        return matrix.norm().item()
    return factors["layers"][i]["operator_norm_estimate"]


def by_hand_loss(model, vanilla, factors, cfg, x, sigmas) -> torch.Tensor:
    """loss_sim from its definition, with full-size rotation matrices and explicit
    layer maps (none of the method's shortcuts): eq. 11 / the direction form, with
    Rota_cer(x) = W x / sigma (normalized_weight) or U_r V_r^T x of an exact SVD (polar)."""
    _, van_inputs = vanilla.forward_with_layer_inputs(x)
    _, cer_inputs = model.forward_with_layer_inputs(x)
    if cfg["detach_probe"]:
        cer_inputs = [h.detach() for h in cer_inputs]
    probes = {"own": (van_inputs, cer_inputs), "cer": (cer_inputs, cer_inputs),
              "van": (van_inputs, van_inputs)}[cfg["probe"]]
    total = 0.0
    for i, layer in enumerate(model.weight_layers()):
        van_x, cer_x = probes[0][i], probes[1][i]
        rota_van = apply_rotation(layer, van_rotation(factors, i, cfg["rank"]), van_x).flatten(1)
        if cfg["cert_rotation"] == "polar":
            r = min(layer_matrix(layer).shape) if cfg["rank"] == "full" else cfg["rank"]
            rota_cer = apply_rotation(layer, exact_rotation(layer_matrix(layer), r).float(), cer_x).flatten(1)
        else:
            rota_cer = (apply_operator(layer, cer_x) / sigmas[i]).flatten(1)
        if cfg["sim_form"] == "paper":
            ratio = sigmas[i] / by_hand_vanilla_sigma(vanilla, factors, i, cfg["van_sigma"])
            total = total + (ratio * rota_van - rota_cer / ratio).norm(dim=1).mean()
        else:
            total = total + (rota_van - rota_cer).norm(dim=1).mean() / math.sqrt(rota_van.shape[1])
    return cfg["lambda"] * total


# ---------------------------------------------------------------- 1. the paper's reading: normalized_weight
def test_the_paper_reading_is_the_default(params):
    base = load_params("paper")["duet"]
    assert (base["sim_form"], base["cert_rotation"], base["probe"], base["lambda"]) == \
        ("paper", "normalized_weight", "own", 1.0)
    assert base["detach_probe"] is False
    # Algorithm 1, line 6: sigma_van from the SVD that gives U and V, of the weight matrix.
    assert base["van_sigma"] == "weight_matrix"


def test_the_readings_of_sigma_van_differ(params, vanilla, factors):
    """sigma_1 of the reshaped kernel, the convolution's operator norm and ||sigma||_2 are
    three numbers (for a convolution the first is the smallest of the three here), so
    the key changes the term."""
    from pipeline_src.methods.duet import vanilla_sigma

    first = factors["layers"][0]
    readings = {r: vanilla_sigma(first, r) for r in ("weight_matrix", "operator", "frobenius")}
    assert readings["weight_matrix"] < readings["operator"] and readings["weight_matrix"] < readings["frobenius"]
    assert readings["weight_matrix"] == pytest.approx(by_hand_vanilla_sigma(vanilla, factors, 0, "weight_matrix"),
                                                      rel=1e-6)


@pytest.mark.parametrize("form,probe,rotation,detach,van_sigma", [
    ("paper", "own", "normalized_weight", False, "weight_matrix"),
    ("paper", "cer", "normalized_weight", False, "weight_matrix"),
    ("paper", "van", "normalized_weight", False, "weight_matrix"),
    ("paper", "own", "normalized_weight", True, "weight_matrix"),
    ("paper", "own", "normalized_weight", False, "operator"),
    ("paper", "own", "normalized_weight", False, "frobenius"),
    ("direction", "own", "normalized_weight", False, "weight_matrix"),
    ("paper", "own", "polar", False, "weight_matrix"),
    ("direction", "cer", "polar", True, "weight_matrix")])
def test_loss_matches_its_definition(params, vanilla, factors, batch, form, probe, rotation, detach, van_sigma):
    """The method's loss (clean-pass reuse, factorised vanilla map) equals the by-hand
    value for each probe, rotation, form and reading of sigma_van, and so does its gradient."""
    x, y = batch
    cfg = duet_cfg(params, sim_form=form, probe=probe, cert_rotation=rotation, detach_probe=detach, rank=4,
                   van_sigma=van_sigma)
    model = _certification_model(params)
    method = make_duet(model, cfg, vanilla, factors)
    power = copy.deepcopy(method.power)
    loss = sim_loss(method, x, y)
    (grad,) = torch.autograd.grad(loss, model.weight_layers()[3].module.weight)
    sigmas = power.norms(model.weight_layers(), cfg["power_iterations"])
    expected = by_hand_loss(model, vanilla, factors, cfg, x, sigmas)
    (expected_grad,) = torch.autograd.grad(expected, model.weight_layers()[3].module.weight)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    cosine = (grad * expected_grad).sum() / (grad.norm() * expected_grad.norm())
    assert cosine.item() > 0.9999 and grad.norm().item() == pytest.approx(expected_grad.norm().item(), rel=1e-3)


def test_the_probe_choice_matters(params, vanilla, factors, batch):
    """own, cer and van are three different terms (the test above is not vacuous)."""
    x, y = batch
    model = _certification_model(params)
    values = {probe: sim_loss(make_duet(copy_of(model), duet_cfg(params, probe=probe), vanilla, factors), x, y).item()
              for probe in ("own", "cer", "van")}
    assert len({round(v, 3) for v in values.values()}) == 3, values


def test_gradient_reaches_earlier_layers_unless_the_probe_is_detached(params, vanilla, factors, batch):
    x, y = batch
    layers = [0, 3]
    for detach, reaches in ((False, True), (True, False)):
        model = _certification_model(params)
        cfg = duet_cfg(params, layers=[3], detach_probe=detach)
        loss = sim_loss(make_duet(model, cfg, vanilla, factors), x, y)
        first, own = torch.autograd.grad(loss, [model.weight_layers()[i].module.weight for i in layers],
                                         allow_unused=True)
        assert own is not None and own.abs().sum() > 0
        assert (first is not None and first.abs().sum() > 0) == reaches


def test_gradient_flows_through_the_step_sigma(params, vanilla, factors, batch):
    """sigma_cer is the power iteration's ||W v|| with v fixed (as in BCP's bound): the
    term's gradient includes its path through sigma (dropping it changes the gradient)."""
    x, y = batch
    model = _certification_model(params)
    cfg = duet_cfg(params, layers=[6], rank=4)
    method = make_duet(model, cfg, vanilla, factors)
    power = copy.deepcopy(method.power)
    weight = model.weight_layers()[6].module.weight
    (with_sigma,) = torch.autograd.grad(sim_loss(method, x, y), weight)
    sigmas = [s.detach() for s in power.norms(model.weight_layers(), cfg["power_iterations"])]
    (without,) = torch.autograd.grad(by_hand_loss(model, vanilla, factors, cfg, x, sigmas), weight)
    assert not torch.allclose(with_sigma, without, rtol=1e-3, atol=0)


def test_normalized_weight_is_the_rotation_when_all_singular_values_agree(params, vanilla, factors, batch):
    """The paper's premise (eq. 8): a certified layer's singular values all equal sigma,
    so W / sigma = U V^T and the two readings coincide at full rank."""
    x, _ = batch
    model = _certification_model(params)
    generator = torch.Generator().manual_seed(3)
    dense = [layer for layer in model.weight_layers() if layer.kind == "linear"]
    probe = torch.randn(4, dense[0].input_shape[0], generator=generator)
    for layer in dense:
        rows, cols = layer_matrix(layer).shape
        q = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64)).Q.t()
        with torch.no_grad():
            layer.module.weight.copy_(2.5 * q)
        h = probe if layer.input_shape[0] == probe.shape[1] else torch.randn(4, cols, generator=generator)
        normalized = make_duet(model, duet_cfg(params, rank="full", detach_probe=True), vanilla, factors)
        polar = make_duet(model, duet_cfg(params, rank="full", cert_rotation="polar", detach_probe=True),
                          vanilla, factors)
        sigma = torch.tensor(2.5)
        got = normalized._rota_cer(x, layer.index, h, sigma)
        torch.testing.assert_close(got, apply_operator(layer, h) / sigma)
        torch.testing.assert_close(got, polar._rota_cer(x, layer.index, h, sigma), rtol=1e-5, atol=1e-5)


def test_cosine_form_of_normalized_weight_is_the_top_singular_mass(params, vanilla, factors, batch):
    """cos(U_r V_r^T, W) = sum_{i<=r} s_i / (sqrt(r) ||W||_F): for the vanilla weights
    themselves the cosine form reads the energy of the top r singular values."""
    x, y = batch
    rank = 4
    cfg = duet_cfg(params, sim_form="cosine", rank=rank)
    loss = sim_loss(make_duet(copy_of(vanilla), cfg, vanilla, factors), x, y).item()
    expected = 0.0
    for layer in vanilla.weight_layers():
        s = torch.linalg.svdvals(layer_matrix(layer).double())
        r = min(rank, len(s))
        expected += 1.0 - (s[:r].sum() / (math.sqrt(r) * s.norm())).item()
    assert loss == pytest.approx(cfg["lambda"] * expected, rel=1e-4)


@pytest.mark.parametrize("rank", [1, 4, "full"])
def test_polar_cosine_and_direction_vanish_for_the_vanilla_weights(params, vanilla, factors, batch, rank):
    x, y = batch
    for form, tolerance in (("cosine", 1e-3), ("direction", 1e-5)):   # float32 cosines of 8 layers
        cfg = duet_cfg(params, sim_form=form, rank=rank, cert_rotation="polar", probe="van")
        assert abs(sim_loss(make_duet(copy_of(vanilla), cfg, vanilla, factors), x, y).item()) < tolerance
    other = make_duet(_certification_model(params), duet_cfg(params, sim_form="cosine", rank=rank,
                                                             cert_rotation="polar"), vanilla, factors)
    assert sim_loss(other, x, y).item() > 1e-2


# ---------------------------------------------------------------- 2. the exact reading: polar's gradient
@pytest.mark.parametrize("rows,cols,rank", [(20, 30, 1), (20, 30, 4), (20, 30, 20), (30, 20, 4), (30, 20, 20),
                                            (12, 12, 5)])
def test_polar_gradient_matches_autograd_through_the_svd(rows, cols, rank):
    values = torch.linspace(3.0, 0.5, min(rows, cols))
    w = with_singular_values(rows, cols, values, seed=rank)
    target = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_of(rotation):
        return (rotation * target).sum() + (rotation.square() * target.abs()).sum()

    reference_w = w.clone().requires_grad_(True)
    u, _, vh = torch.linalg.svd(reference_w, full_matrices=False)
    loss_of(u[:, :rank] @ vh[:rank]).backward()
    ours_w = w.clone().requires_grad_(True)
    rotation = top_rank_rotation(ours_w, rank)
    torch.testing.assert_close(rotation, exact_rotation(w, rank))
    loss_of(rotation).backward()
    cosine = (reference_w.grad * ours_w.grad).sum() / (reference_w.grad.norm() * ours_w.grad.norm())
    assert cosine.item() >= 0.99
    torch.testing.assert_close(ours_w.grad, reference_w.grad, rtol=1e-8, atol=1e-10)


def test_polar_gradient_stays_finite_at_repeated_singular_values():
    """An SVD's own gradient has 1/(s_i^2 - s_j^2) terms; ours clamps them."""
    w = with_singular_values(8, 12, torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5]), seed=6)
    for rank in (2, 3, 5):
        weight = w.float().clone().requires_grad_(True)
        target = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
        (top_rank_rotation(weight, rank) * target).sum().backward()
        assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0


def test_polar_rotation_is_invariant_to_svd_sign_choices(monkeypatch):
    w = with_singular_values(12, 30, torch.linspace(3.0, 0.5, 12), seed=4)
    reference = top_rank_rotation(w, 5)
    original_svd = torch.linalg.svd

    def flipping_svd(a, *args, **kwargs):
        u, s, vh = original_svd(a, *args, **kwargs)
        signs = torch.tensor([1.0, -1.0] * (len(s) // 2) + [1.0] * (len(s) % 2), dtype=u.dtype)
        return torch.return_types.linalg_svd((u * signs, s, vh * signs[:, None]))

    monkeypatch.setattr(torch.linalg, "svd", flipping_svd)
    torch.testing.assert_close(top_rank_rotation(w, 5), reference, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- 3. the vanilla rotation, factorised
def _conv(c_in, c_out, k, s, p, side, dtype=torch.float64) -> WeightLayer:
    torch.manual_seed(7)
    module = nn.Conv2d(c_in, c_out, k, s, p).to(dtype)
    out = (side + 2 * p - k) // s + 1
    return WeightLayer(0, module, (c_in, side, side), (c_out, out, out), None, False)


@pytest.mark.parametrize("c_in,c_out,k,s,p,side,rank", [(3, 5, 3, 1, 1, 8, 2), (2, 4, 4, 2, 1, 9, 4),
                                                        (3, 6, 3, 2, 0, 9, 1), (4, 3, 3, 1, 0, 7, 3)])
def test_factorised_rotation_of_a_conv_is_u_r_v_r_transposed_on_unfolded_input(c_in, c_out, k, s, p, side, rank):
    layer = _conv(c_in, c_out, k, s, p, side)
    generator = torch.Generator().manual_seed(0)
    u, _, vh = torch.linalg.svd(torch.randn(c_out, c_in * k * k, generator=generator, dtype=torch.float64),
                                full_matrices=False)
    u_r, v_r = u[:, :rank], vh[:rank].t()
    x = torch.randn(3, c_in, side, side, generator=generator, dtype=torch.float64)
    rotation_map = FactorisedRotation(layer, u_r, v_r)
    # r filters of the layer's shape and an r -> C_out 1x1 map: never the full-size weight
    assert tuple(rotation_map.filters.shape) == (rank, c_in, k, k)
    assert tuple(rotation_map.mixing.shape) == (c_out, rank, 1, 1)
    expected = ((u_r @ v_r.t()) @ F.unfold(x, k, padding=p, stride=s)).reshape(3, *layer.output_shape)
    torch.testing.assert_close(rotation_map(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(apply_rotation(layer, u_r @ v_r.t(), x), expected, rtol=1e-10, atol=1e-10)


def test_factorised_rotation_of_a_dense_layer_is_two_thin_matmuls():
    torch.manual_seed(0)
    layer = WeightLayer(0, nn.Linear(20, 7).double(), (20,), (7,), None, False)
    u_r = torch.linalg.qr(torch.randn(7, 3, dtype=torch.float64)).Q
    v_r = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64)).Q
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(FactorisedRotation(layer, u_r, v_r)(x), x @ (u_r @ v_r.t()).t(),
                               rtol=1e-12, atol=1e-12)


def test_factorised_rotation_on_the_model_layers(params, factors, vanilla):
    """The 6C2F layers (stride 1 and 2 convs, padding 1, dense), in float32."""
    model = _certification_model(params)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, inputs = model.forward_with_layer_inputs(x)
    for layer, h in zip(model.weight_layers(), inputs):
        f = factors["layers"][layer.index]
        got = FactorisedRotation(layer, f["U"][:, :4], f["V"][:, :4])(h)
        torch.testing.assert_close(got, apply_rotation(layer, van_rotation(factors, layer.index, 4), h),
                                   rtol=1e-4, atol=1e-4)


def flipped(factors: dict, columns=(0, 2, 5)) -> dict:
    layers = []
    for f in factors["layers"]:
        u, v = f["U"].clone(), f["V"].clone()
        for c in columns:
            if c < u.shape[1]:
                u[:, c], v[:, c] = -u[:, c], -v[:, c]
        layers.append({**f, "U": u, "V": v})
    return {**factors, "layers": layers}


@pytest.mark.parametrize("form", ["paper", "direction", "cosine"])
def test_loss_is_invariant_to_singular_vector_sign_flips(params, vanilla, factors, batch, form):
    x, y = batch
    model = _certification_model(params)
    cfg = duet_cfg(params, sim_form=form, rank=8)
    losses = []
    for guide in (factors, flipped(factors)):
        method = make_duet(copy.deepcopy(model), cfg, vanilla, guide, seed=3)
        losses.append([sim_loss(method, x, y).item() for _ in range(2)])
    assert all(math.isfinite(v) and v > 0 for v in losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert not torch.equal(factors["layers"][0]["U"], flipped(factors)["layers"][0]["U"])


# ---------------------------------------------------------------- 4. rotation similarity metric
RANKS = [1, 4, "full", None]


def rotation_similarity(model, vanilla, ranks: list) -> dict:
    """{rank: per-layer cosine (%) between the two models' U_r V_r^T} (the `similarity`
    measure at each rank; None and 'full': every singular vector)."""
    svds, vanilla_svds = layer_svds(model), layer_svds(vanilla)
    return {rank: measures_from_svds(svds, vanilla_svds, rank)["similarity"] for rank in ranks}


def test_rotation_similarity_of_identical_models_is_100(vanilla):
    similarity = rotation_similarity(vanilla, copy.deepcopy(vanilla), RANKS)
    assert set(similarity) == set(RANKS)
    for rank, values in similarity.items():
        assert len(values) == len(vanilla.weight_layers())
        assert all(abs(v - 100.0) < 1e-6 for v in values), (rank, values)


def test_rotation_similarity_of_an_independent_model_is_low(params, vanilla):
    other = _certification_model(params)
    reference = rotation_similarity(other, vanilla, RANKS)
    assert sum(reference["full"]) / len(reference["full"]) < 50.0
    assert sum(reference[4]) / len(reference[4]) < 50.0
    assert reference[None] == reference["full"]


# ---------------------------------------------------------------- 5. the certificate is BCP's
def test_duet_is_certified_by_bcp_and_paired_with_it():
    assert METHODS["duet"] is Duet
    assert METHODS["duet"].certifier == "bcp" == METHODS["bcp"].certifier
    assert METHODS["duet"].seed_family() == "bcp" == METHODS["bcp"].seed_family()
    assert METHODS["localbcp"].seed_family() == "localbcp"


@pytest.mark.parametrize("form", ["paper", "direction", "cosine"])
def test_duet_bounds_are_bcp_worst_logits(params, vanilla, factors, batch, form):
    x, y = batch
    eps, index = params["duet"]["eps_train"], torch.arange(len(y))
    model = _certification_model(params)
    cfg = duet_cfg(params, sim_form=form, rank=4, power_iterations=2, translation_iterations=2)
    method = make_duet(model, cfg, vanilla, factors, seed=5)
    bcp = build_method("bcp", model, {**params["bcp"], "power_iterations": 2, "translation_iterations": 2},
                       torch.Generator().manual_seed(5), 200)
    for _ in range(3):
        state = copy.deepcopy(method.power)
        logits = method.forward(x)
        regulariser = method.regulariser(x, y, logits)
        assert regulariser is not None and torch.isfinite(regulariser)
        got = method.bounds(x, y, logits, eps, index)
        sigmas = state.norms(model.weight_layers(), cfg["power_iterations"])
        expected = bcp_worst_logits(model, x, y, eps, sigmas, cfg["translation_iterations"])
        torch.testing.assert_close(got.worst_logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(got.lipschitz, torch.stack(sigmas).prod().detach(), rtol=1e-6, atol=0)
        reference = bcp.bounds(x, y, bcp.forward(x), eps, index)
        torch.testing.assert_close(got.worst_logits, reference.worst_logits, rtol=0, atol=0)
        doubled = bcp_worst_logits(model, x, y, eps, [2 * s for s in sigmas], cfg["translation_iterations"])
        assert not torch.allclose(doubled, expected)
        method.after_step()
        bcp.after_step()


# ---------------------------------------------------------------- 6. training: finite, paired, lambda = 0 is BCP
@pytest.fixture(scope="module")
def guide_root(tmp_path_factory, params, vanilla) -> Path:
    """A tiny run's inputs to duet training: a 200-image cut of the sample cache, the
    (untrained) vanilla model, and its SVD export."""
    root = tmp_path_factory.mktemp("duet_run")
    layout = RunLayout.of(params)
    cache = build_cache({**params["data"], "val_size": 100}, root / "full.pt", root / "full.json", root)
    # 200 training and 20 validation images: each epoch's validation certifies them all.
    small = {**cache.__dict__, "train_x": cache.train_x[:200], "train_y": cache.train_y[:200],
             "val_x": cache.val_x[:20], "val_y": cache.val_y[:20]}
    save_cut_cache(small, root / layout.data_cache, params["data"])
    (root / layout.vanilla_model).parent.mkdir(parents=True)
    torch.save({"state_dict": vanilla.state_dict(), "model": params["model"], "data_sha256": "x"},
               root / layout.vanilla_model)
    export_svd(params, root, check_guide)
    return root


def run_root(guide_root: Path, params: dict, tmp_path: Path, name: str) -> Path:
    layout = RunLayout.of(params)
    root = tmp_path / name
    for rel in (layout.data_cache, layout.vanilla_model, layout.svd_factors):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(guide_root / rel, root / rel)
    return root


def short_schedule(params: dict, method: str, **overrides) -> dict:
    params = copy.deepcopy(params)
    params[method].update({"epochs": 2, "warmup_epochs": 0, "ramp_epochs": 1, "batch_size": 50,
                           "lr_schedule": {**params[method]["lr_schedule"], "kind": "constant"}, **overrides})
    params["certify"] = {**params["certify"], "batch_size": 100}
    return params


class Recorder:
    """The weights a training run started from (at its first step) and the batches it saw."""

    def __init__(self, monkeypatch):
        self.initial, self.batches = None, []
        original_forward = CertifiedMethod.forward

        def forward(method, x):
            if self.initial is None:
                self.initial = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
            self.batches.append(x.detach().clone())
            return original_forward(method, x)

        monkeypatch.setattr(CertifiedMethod, "forward", forward)


def test_lambda_zero_is_bcp_bit_for_bit(params, guide_root, tmp_path):
    """Same seed, lambda = 0: Duet's weights are BCP's, bit for bit."""
    bcp = certified_training.train_certified(short_schedule(params, "bcp"), "bcp",
                                             run_root(guide_root, params, tmp_path, "bcp"))
    duet = certified_training.train_certified(short_schedule(params, "duet", **{"lambda": 0.0}), "duet",
                                              run_root(guide_root, params, tmp_path, "duet"))
    assert duet["weights_sha256"] == bcp["weights_sha256"]
    # ... and with the term on, the weights do move away (the comparison can fail)
    on = certified_training.train_certified(short_schedule(params, "duet"), "duet",
                                            run_root(guide_root, params, tmp_path, "duet-on"))
    assert on["weights_sha256"] != bcp["weights_sha256"]


def test_a_similarity_term_scheduled_off_is_bcp_bit_for_bit(params, guide_root, tmp_path):
    """regulariser_schedule (issue 22, candidate 1): until_ramp_end is off after the ramp;
    with no warm-up and no ramp it is never on and Duet trains BCP's weights; with a ramp
    it is on there, and the weights differ from BCP's and from the constant term's (both
    comparisons can fail)."""
    no_ramp = {"ramp_epochs": 0}
    bcp = certified_training.train_certified(short_schedule(params, "bcp", **no_ramp), "bcp",
                                             run_root(guide_root, params, tmp_path, "bcp"))
    off = certified_training.train_certified(
        short_schedule(params, "duet", **no_ramp, regulariser_schedule="until_ramp_end"), "duet",
        run_root(guide_root, params, tmp_path, "duet-until_ramp_end"))
    assert off["weights_sha256"] == bcp["weights_sha256"]
    ramp_root = run_root(guide_root, params, tmp_path, "duet-ramp-only")
    certified_training.train_certified(
        short_schedule(params, "duet", regulariser_schedule="until_ramp_end"), "duet", ramp_root)
    # The term's column: on over the ramp (epoch 1), 0 after it.
    with open(ramp_root / RunLayout.of(params).train("duet", "history.csv")) as fh:
        term = [float(row["regulariser"]) for row in csv.DictReader(fh)]
    assert term[0] > 0 and term[1] == 0


def test_the_untrained_guide_control_needs_no_trained_guide(params, guide_root, tmp_path, monkeypatch):
    """guide: untrained (the similarity term's no-guide control, issue 22): the vanilla
    model's initial weights and their SVD take the guide's place; no vanilla model or SVD
    export is read."""
    layout = RunLayout.of(params)
    root = tmp_path / "untrained"
    (root / layout.data_cache).parent.mkdir(parents=True)
    shutil.copy2(guide_root / layout.data_cache, root / layout.data_cache)   # nothing else
    handed = {}
    original = certified_training.untrained_guide

    def spy(model, svd, seed, device):
        handed["guide"] = original(model, svd, seed, device)
        return handed["guide"]

    monkeypatch.setattr(certified_training, "untrained_guide", spy)
    untrained = certified_training.train_certified(short_schedule(params, "duet", guide="untrained"), "duet", root)
    initial = vanilla_initial_model(params)
    for layer, factors in zip(initial.weight_layers(), handed["guide"]["factors"]["layers"]):
        expected = torch.linalg.svdvals(layer_matrix(layer).double()).float()
        assert torch.allclose(factors["S"], expected, rtol=1e-5)
    for ours, theirs in zip(handed["guide"]["model"].state_dict().values(), initial.state_dict().values()):
        assert torch.equal(ours.cpu(), theirs)
    assert untrained["method"] == "duet"   # (this module's guide is itself untrained: no weight comparison)
    assert not trains_with_guide(method_runs(short_schedule(params, "duet", guide="untrained"))["duet"])
    assert trains_with_guide(method_runs(params)["duet"])


def test_duet_and_bcp_start_from_the_same_weights_and_batches(params, guide_root, tmp_path, monkeypatch):
    seen = {}
    for method in ("bcp", "duet"):
        recorder = Recorder(monkeypatch)
        run = short_schedule(params, method, epochs=1)
        certified_training.train_certified(run, method, run_root(guide_root, params, tmp_path, method))
        seen[method] = recorder
        monkeypatch.undo()
    bcp, duet = seen["bcp"], seen["duet"]
    assert bcp.initial.keys() == duet.initial.keys()
    assert all(torch.equal(bcp.initial[k], duet.initial[k]) for k in bcp.initial)
    assert len(bcp.batches) == len(duet.batches) == 4
    assert all(torch.equal(a, b) for a, b in zip(bcp.batches, duet.batches))
    # LMT is not paired: its own seed
    recorder = Recorder(monkeypatch)
    certified_training.train_certified(short_schedule(params, "lmt", epochs=1), "lmt",
                                       run_root(guide_root, params, tmp_path, "lmt"))
    assert any(not torch.equal(recorder.initial[k], bcp.initial[k]) for k in bcp.initial)


@pytest.mark.parametrize("method", ["bcp", "localbcp"])
def test_vanilla_init_starts_from_the_vanilla_models_initial_weights(params, guide_root, tmp_path, monkeypatch,
                                                                     method):
    """`init_from: vanilla_init`: exactly the weights the vanilla stage starts from."""
    captured = {}
    original = vanilla_training.build_model

    def build(model_params):
        model = original(model_params)
        captured["vanilla"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        raise KeyboardInterrupt   # only the initial weights are wanted

    root = run_root(guide_root, params, tmp_path, "vanilla")
    monkeypatch.setattr(vanilla_training, "build_model", build)
    with pytest.raises(KeyboardInterrupt):
        vanilla_training.train_vanilla(params, root)
    monkeypatch.undo()
    recorder = Recorder(monkeypatch)
    run = short_schedule(params, method, epochs=1, init_from="vanilla_init")
    metrics = certified_training.train_certified(run, method, root)
    weights = [k for k in captured["vanilla"] if k.endswith(("weight", "bias"))]
    assert len(weights) == 2 * len(build_model(params["model"]).weight_layers())
    for key in weights:
        assert torch.equal(recorder.initial[key], captured["vanilla"][key]), key
    assert metrics["config"]["init_from"] == "vanilla_init"
    # the scratch run starts elsewhere
    monkeypatch.undo()
    scratch = Recorder(monkeypatch)
    certified_training.train_certified(short_schedule(params, method, epochs=1), method,
                                       run_root(guide_root, params, tmp_path, "scratch"))
    assert any(not torch.equal(scratch.initial[k], captured["vanilla"][k]) for k in weights)


def test_vanilla_unit_norm_starts_from_the_rescaled_trained_guide(params, guide_root, tmp_path, monkeypatch):
    """`init_from: vanilla_unit_norm`: the vanilla model's file, each layer divided by its
    guaranteed norm (tests/test_unit_norm_init.py), as the certified run's initial weights."""
    from pipeline_src.models.loading import load_trained
    from pipeline_src.spectral.operator_norm import unit_norm_rescaled_

    root = run_root(guide_root, params, tmp_path, "vunit")
    guide = load_trained(root / RunLayout.of(params).vanilla_model, torch.device("cpu"))
    unit_norm_rescaled_(guide)
    recorder = Recorder(monkeypatch)
    metrics = certified_training.train_certified(short_schedule(params, "bcp", epochs=1, init_from="vanilla_unit_norm"),
                                                 "bcp", root)
    expected = {k: v for k, v in guide.state_dict().items() if k.endswith(("weight", "bias"))}
    assert expected and all(torch.equal(recorder.initial[k], v) for k, v in expected.items())
    assert metrics["config"]["init_from"] == "vanilla_unit_norm"


# A few hundred optimizer steps (batch 4 of the 200 images: 50 steps per epoch).
TRAIN_BATCH = 4
TRAIN_RUNS = [pytest.param({"rank": 8}, 6, id="paper-normalized-rank8"),
              pytest.param({"rank": "full"}, 4, id="paper-normalized-full"),
              pytest.param({"rank": 4, "cert_rotation": "polar"}, 1, id="paper-polar-rank4")]


@pytest.mark.parametrize("overrides,epochs", TRAIN_RUNS)
def test_training_stays_finite(params, guide_root, vanilla, tmp_path, monkeypatch, overrides, epochs):
    params = copy.deepcopy(params)
    layout = RunLayout.of(params)
    root = run_root(guide_root, params, tmp_path, "run")
    assert params["duet"]["sim_form"] == "paper" and params["duet"]["lambda"] == 1.0
    params["duet"].update(epochs=epochs, warmup_epochs=0, ramp_epochs=0.5, batch_size=TRAIN_BATCH,
                          lr_schedule={**params["duet"]["lr_schedule"], "kind": "constant"}, **overrides)
    params["certify"] = {**params["certify"], "batch_size": 100}

    seen = {"steps": 0, "bounds": 0, "regulariser": []}

    def finite(tensor, what):
        assert torch.isfinite(tensor).all(), f"step {seen['steps']}: non-finite {what}"

    original_regulariser, original_bounds = Duet.regulariser, Duet.bounds

    def regulariser(self, x, y, logits):
        value = original_regulariser(self, x, y, logits)
        finite(value, "loss_sim")
        seen["regulariser"].append(value.item())
        return value

    def bounds(self, x, y, logits, eps, index):
        out = original_bounds(self, x, y, logits, eps, index)
        finite(out.worst_logits, "worst logits")
        finite(F.cross_entropy(out.worst_logits, y), "robust loss")
        seen["bounds"] += 1
        return out

    class CheckedAdam(torch.optim.Adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        finite(p.grad, "gradient")
            out = super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    finite(p.detach(), "weight")
            seen["steps"] += 1
            return out

    monkeypatch.setattr(Duet, "regulariser", regulariser)
    monkeypatch.setattr(Duet, "bounds", bounds)
    monkeypatch.setattr(torch.optim, "Adam", CheckedAdam)

    metrics = certified_training.train_certified(params, "duet", root)

    steps_per_epoch = -(-200 // TRAIN_BATCH)
    assert seen["steps"] == epochs * steps_per_epoch
    assert len(seen["regulariser"]) == seen["steps"]
    assert all(math.isfinite(v) and v > 0 for v in seen["regulariser"])
    assert seen["bounds"] >= seen["steps"] - 1
    with open(root / layout.train("duet", "history.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == epochs
    for row in rows:
        for column in ("clean_loss", "robust_loss", "lipschitz", "regulariser"):
            assert math.isfinite(float(row[column])), (column, row)
    trained = torch.load(root / layout.train("duet", "model.pt"), weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert metrics["method"] == "duet"


# ---------------------------------------------------------------- 7. bad config
@pytest.mark.parametrize("key,value", [("sim_form", "foo"), ("cert_rotation", "svd"), ("probe", "both")])
def test_unknown_choice_is_a_clear_error(params, vanilla, factors, key, value):
    with pytest.raises(ValueError, match=rf"duet\.{key}"):
        make_duet(_certification_model(params), duet_cfg(params, **{key: value}), vanilla, factors)


@pytest.mark.parametrize("context", [None, {}, {"root": "x"}])
def test_missing_guide_is_a_clear_error(params, context):
    with pytest.raises(ValueError, match="guide"):
        build_method("duet", _certification_model(params), duet_cfg(params), torch.Generator().manual_seed(0),
                     200, context)
