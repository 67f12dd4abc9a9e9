"""Duet (pipeline_src/methods/duet.py): BCP plus lambda * loss_sim pulling each
layer's rank-r rotation U_r V_r^T towards the vanilla model's; the rotation
factors (pipeline_src/spectral/rotation.py) and the similarity metric
(pipeline_src/certify/similarity.py).

Everything runs on the CPU with one torch thread; the guide (vanilla model and
its SVD factors) is built here, except in the training test, which lays out a
tiny run (data cache, vanilla model, `export_svd`) and calls `train_certified`.
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
from pipeline_src.certify.similarity import rotation_similarity
from pipeline_src.config import load_params
from pipeline_src.data.cifar import build_cache
from pipeline_src.methods import METHODS, build_method
from pipeline_src.methods.duet import Duet
from pipeline_src.models import WeightLayer, build_model
from pipeline_src.paths import RunLayout
from pipeline_src.spectral.operator_norm import matrix_view, power_iteration
from pipeline_src.spectral.rotation import (SubspaceIteration, apply_rotation, exact_rotation, layer_matrix,
                                            polar_factor, rotation_cosine, rotation_from_subspace,
                                            top_right_subspace)
from pipeline_src.spectral.svd_export import export_svd
from pipeline_src.training import certified as certified_training
from pipeline_src.training.common import seed_everything, stage_seed

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
    """The certification model as `train_certified` initialises it for duet."""
    seed_everything(stage_seed(SEED, "train", "duet"))
    return build_model(params["model"])


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


def rota_scale(vanilla, factors, rank, x) -> float:
    """sum over layers of mean_batch ||Rota_van(x_l)||: the size of what the paper form compares."""
    _, inputs = vanilla.forward_with_layer_inputs(x)
    total = 0.0
    for layer, f, h in zip(vanilla.weight_layers(), factors["layers"], inputs):
        r = min(f["matrix_shape"]) if rank == "full" else min(rank, min(f["matrix_shape"]))
        rotation = f["U"][:, :r] @ f["V"][:, :r].t()
        total += apply_rotation(layer, rotation, h).flatten(1).norm(dim=1).mean().item()
    return total


def projector_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spectral norm of the difference of the orthogonal projectors onto span(a), span(b)."""
    a, b = a.double(), b.double()
    return torch.linalg.matrix_norm(a @ a.t() - b @ b.t(), ord=2).item()


def with_singular_values(rows: int, cols: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(values), generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, len(values), generator=generator, dtype=torch.float64)).Q
    return u @ torch.diag(values.double()) @ v.t()


# ---------------------------------------------------------------- 1. zero for identical weights
@pytest.mark.parametrize("form,rank,probe", [("direction", 1, "cer"), ("direction", 4, "van"),
                                             ("direction", "full", "cer"), ("cosine", 4, "cer"),
                                             ("cosine", "full", "van")])
def test_similarity_loss_vanishes_for_the_vanilla_weights(params, vanilla, factors, batch, form, rank, probe):
    x, y = batch
    cfg = duet_cfg(params, sim_form=form, rank=rank, probe=probe, cert_factors="svd")
    method = make_duet(copy_of(vanilla), cfg, vanilla, factors)
    loss = sim_loss(method, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    if form == "direction":
        assert abs(loss.item()) < 1e-5
    else:
        # The rotations themselves agree (cosine 1 in float64); the float32 cosine of the
        # 512 x 4096 layer would be off by ~1e-4, hence rotation_cosine works in float64.
        rotations = method.cert_rotations()
        for i, rotation in rotations.items():
            cos64 = rotation_cosine(method.van_rotation[i].double(), rotation.double()).item()
            assert cos64 == pytest.approx(1.0, abs=1e-6), i
        assert abs(loss.item()) < 1e-3
    if rank == 4:  # ... and the same method on other weights does see a difference
        other = make_duet(_certification_model(params), cfg, vanilla, factors)
        assert sim_loss(other, x, y).item() > 1e-2


def test_cosine_form_is_exactly_zero_for_the_vanilla_weights(params, vanilla, factors, batch):
    x, y = batch
    cfg = duet_cfg(params, sim_form="cosine", rank=1, cert_factors="svd")
    loss = sim_loss(make_duet(copy_of(vanilla), cfg, vanilla, factors), x, y)
    assert loss.item() >= -1e-5 and abs(loss.item()) < 1e-5


@pytest.fixture(scope="module")
def exact_sigma_factors(params, vanilla, factors) -> dict:
    """Factors whose operator-norm estimates are exactly the sigmas the method's own
    persistent power iteration (same generator seed) reaches after 200 iterations."""
    cfg = duet_cfg(params, sim_form="paper", rank=4, cert_factors="svd", power_iterations=200)
    probe = make_duet(copy_of(vanilla), cfg, vanilla, factors)
    state = copy.deepcopy(probe.power)
    sigmas = [s.item() for s in state.norms(probe.model.weight_layers(), 200)]
    return {**factors, "layers": [{**f, "operator_norm_estimate": s} for f, s in zip(factors["layers"], sigmas)]}


@pytest.mark.parametrize("rank", [4, "full"])
def test_paper_form_vanishes_when_the_norm_estimates_agree(params, vanilla, exact_sigma_factors, batch, rank):
    x, y = batch
    cfg = duet_cfg(params, sim_form="paper", rank=rank, cert_factors="svd", power_iterations=200)
    loss = sim_loss(make_duet(copy_of(vanilla), cfg, vanilla, exact_sigma_factors), x, y).item()
    scale = rota_scale(vanilla, exact_sigma_factors, rank, x)
    assert scale > 1.0
    # sigma ratio exactly 1: only float32 rounding of the rotations is left.
    assert abs(loss) < 1e-5 * scale


@pytest.mark.parametrize("rank", [4, "full"])
def test_paper_form_vanishes_with_power_iteration_estimates(params, vanilla, factors, batch, rank):
    """The guide's sigma is power_iteration's estimate (200 steps), the method's its own
    persistent power iteration (200 steps): both are estimates from below that agree to
    ~1e-3 on these convs (close top singular values), so the loss is ~|s/s' - s'/s| of the
    rotation terms' size, not 0."""
    x, y = batch
    cfg = duet_cfg(params, sim_form="paper", rank=rank, cert_factors="svd", power_iterations=200)
    method = make_duet(copy_of(vanilla), cfg, vanilla, factors)
    loss = sim_loss(method, x, y).item()
    scale = rota_scale(vanilla, factors, rank, x)
    ratio_tolerance = 2e-3
    assert 0.0 <= loss <= 2.0 * ratio_tolerance * scale + 1e-5 * scale
    # sigma_cer (the method's power iteration, kept for BCP's bounds) against the guide's estimate
    for sigma, f in zip(method._sigmas, factors["layers"]):
        assert sigma.item() == pytest.approx(f["operator_norm_estimate"], rel=ratio_tolerance)
    if rank == 4:  # other weights are far off (power factors: no second SVD needed)
        other = make_duet(_certification_model(params), {**cfg, "cert_factors": "power"}, vanilla, factors)
        assert sim_loss(other, x, y).item() > 0.1 * scale


# ---------------------------------------------------------------- 2. SVD sign invariance
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
    cfg = duet_cfg(params, sim_form=form, rank=8, cert_factors="power")
    losses = []
    for guide in (factors, flipped(factors)):
        method = make_duet(copy.deepcopy(model), cfg, vanilla, guide, seed=3)
        losses.append([sim_loss(method, x, y).item() for _ in range(2)])
    assert all(math.isfinite(v) and v > 0 for v in losses[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-7)
    # The flips did change the factors (the test is not vacuous).
    assert not torch.equal(factors["layers"][0]["U"], flipped(factors)["layers"][0]["U"])


def test_certification_rotation_is_invariant_to_subspace_sign_flips():
    w = with_singular_values(12, 30, torch.linspace(3.0, 0.5, 12), seed=4).float()
    basis = top_right_subspace(w, 5)
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])
    torch.testing.assert_close(rotation_from_subspace(w, basis * signs, 15),
                               rotation_from_subspace(w, basis, 15), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- 3. Rota as the matrix view
def _conv(c_in, c_out, k, s, p, side, dtype=torch.float64) -> WeightLayer:
    torch.manual_seed(7)
    module = nn.Conv2d(c_in, c_out, k, s, p).to(dtype)
    out = (side + 2 * p - k) // s + 1
    return WeightLayer(0, module, (c_in, side, side), (c_out, out, out), None, False)


@pytest.mark.parametrize("c_in,c_out,k,s,p,side", [(3, 5, 3, 1, 1, 8), (2, 4, 4, 2, 1, 9), (3, 6, 3, 2, 0, 9),
                                                   (4, 3, 3, 1, 0, 7)])
def test_rota_of_a_conv_is_the_matrix_view_on_unfolded_input(c_in, c_out, k, s, p, side):
    layer = _conv(c_in, c_out, k, s, p, side)
    generator = torch.Generator().manual_seed(0)
    rotation = torch.randn(c_out, c_in * k * k, generator=generator, dtype=torch.float64)
    x = torch.randn(3, c_in, side, side, generator=generator, dtype=torch.float64)
    out = layer.output_shape
    expected = (rotation @ F.unfold(x, k, padding=p, stride=s)).reshape(3, *out)
    got = apply_rotation(layer, rotation, x)
    assert tuple(got.shape) == (3, *out)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    assert layer_matrix(layer).shape == rotation.shape


def test_rota_on_the_model_layers(params):
    """The 6C2F layers (stride 1 and 2 convs, padding 1, dense), in float32."""
    model = _certification_model(params)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator)
    _, inputs = model.forward_with_layer_inputs(x)
    strides = set()
    for layer, h in zip(model.weight_layers(), inputs):
        rotation = torch.randn(layer_matrix(layer).shape, generator=generator)
        got = apply_rotation(layer, rotation, h)
        if isinstance(layer.module, nn.Conv2d):
            m = layer.module
            strides.add(m.stride[0])
            expected = (rotation @ F.unfold(h, m.kernel_size, padding=m.padding, stride=m.stride)
                        ).reshape(len(h), *layer.output_shape)
        else:
            expected = h @ rotation.t()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert strides == {1, 2}


def test_rota_of_a_linear_layer_is_x_times_r_transposed():
    torch.manual_seed(0)
    layer = WeightLayer(0, nn.Linear(20, 7).double(), (20,), (7,), None, False)
    rotation, x = torch.randn(7, 20, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(apply_rotation(layer, rotation, x), x @ rotation.t(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- 4. rotation factors
@pytest.mark.parametrize("rank,iterations", [(1, 15), (4, 15), (10, 15), (40, 30)])
def test_rotation_from_the_exact_subspace_is_u_r_v_r_transposed(rank, iterations):
    w64 = with_singular_values(40, 90, 2.0 * torch.logspace(0, -1.3, 40), seed=1)
    w = w64.float()
    got = rotation_from_subspace(w, top_right_subspace(w, rank), iterations)
    expected = exact_rotation(w64, rank)
    assert got.shape == expected.shape == (40, 90)
    assert (got.double() - expected).abs().max().item() < 1e-4
    # and not the rotation of another rank (the comparison can fail)
    if rank < 40:
        assert (got.double() - exact_rotation(w64, rank + 1)).abs().max().item() > 1e-2


def test_exact_rotation_full_rank_and_none():
    w = with_singular_values(6, 9, torch.tensor([5.0, 4, 3, 2, 1, 0.5]), seed=2)
    r = exact_rotation(w, None)
    torch.testing.assert_close(r @ r.t(), torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(exact_rotation(w, 100), r)


def test_subspace_iteration_converges_to_the_top_subspace():
    values = torch.cat([torch.tensor([4.0, 3.6, 3.3, 3.0]), torch.linspace(1.5, 0.1, 26)])
    w = with_singular_values(30, 50, values, seed=3).float()
    exact = top_right_subspace(w, 4)
    iteration = SubspaceIteration(50, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert iteration.basis.shape == (50, 4)
    torch.testing.assert_close(iteration.basis.t() @ iteration.basis, torch.eye(4), rtol=0, atol=1e-5)
    assert projector_distance(iteration.basis, exact) > 0.1   # a random start is far off
    for _ in range(25):   # gap sigma_5 / sigma_4 = 0.5: error ~ 0.25 per step
        basis = iteration.step(w)
    assert projector_distance(basis, exact) < 1e-4
    torch.testing.assert_close(basis.t() @ basis, torch.eye(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape,iterations", [((50, 6), 15), ((64, 64), 40), ((200, 1), 2)])
def test_polar_factor_has_orthonormal_columns(shape, iterations):
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = polar_factor(b, iterations)
    torch.testing.assert_close(q.t() @ q, torch.eye(shape[1], dtype=torch.float64), rtol=0, atol=1e-6)
    u, _, vh = torch.linalg.svd(b, full_matrices=False)
    torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-6)


def test_rotation_gradient_stays_finite_at_repeated_singular_values():
    """The reason for the polar route: an SVD's gradient has 1/(s_i^2 - s_j^2) terms."""
    w = with_singular_values(8, 12, torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5]), seed=6)
    w = w.float().requires_grad_(True)
    rotation = rotation_from_subspace(w, top_right_subspace(w.detach(), 5), 15)
    target = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    (rotation * target).sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


# ---------------------------------------------------------------- 5. rotation similarity metric
RANKS = [1, 4, "full", None]


def test_rotation_similarity_of_identical_models_is_100(vanilla):
    similarity = rotation_similarity(vanilla, copy.deepcopy(vanilla), RANKS)
    assert set(similarity) == set(RANKS)
    for rank, values in similarity.items():
        assert len(values) == len(vanilla.weight_layers())
        assert all(abs(v - 100.0) < 1e-6 for v in values), (rank, values)


def test_rotation_similarity_of_an_independent_model_is_low_and_sign_free(params, vanilla, monkeypatch):
    """Much lower than 100% for an independently initialised model, and the same
    whatever signs the SVD picks for its singular-vector pairs."""
    other = _certification_model(params)
    reference = rotation_similarity(other, vanilla, RANKS)
    assert sum(reference["full"]) / len(reference["full"]) < 50.0
    assert max(abs(v) for v in reference["full"]) < 50.0
    assert sum(reference[4]) / len(reference[4]) < 50.0
    assert reference[None] == reference["full"]

    original_svd = torch.linalg.svd
    generator = torch.Generator().manual_seed(11)
    flips = []

    def sign_flipping_svd(a, *args, **kwargs):
        u, s, vh = original_svd(a, *args, **kwargs)
        signs = torch.where(torch.rand(s.shape[-1], generator=generator) < 0.5, -1.0, 1.0).to(u.dtype)
        flips.append(int((signs < 0).sum()))
        return torch.return_types.linalg_svd((u * signs, s, vh * signs[:, None]))

    monkeypatch.setattr(torch.linalg, "svd", sign_flipping_svd)
    flipped_similarity = rotation_similarity(other, vanilla, RANKS)
    for rank, values in reference.items():
        assert flipped_similarity[rank] == pytest.approx(values, abs=1e-9), rank
    assert flips and min(flips) > 0   # the SVDs it used did pick other signs


# ---------------------------------------------------------------- 6. the certificate is BCP's
def test_duet_is_certified_by_bcp():
    assert METHODS["duet"] is Duet
    assert METHODS["duet"].certifier == "bcp" == METHODS["bcp"].certifier


@pytest.mark.parametrize("form", ["paper", "direction", "cosine"])
def test_duet_bounds_are_bcp_worst_logits(params, vanilla, factors, batch, form):
    x, y = batch
    eps, index = params["duet"]["eps_train"], torch.arange(len(y))
    model = _certification_model(params)
    cfg = duet_cfg(params, sim_form=form, rank=4, cert_factors="power", power_iterations=2,
                   translation_iterations=2)
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
        # Step by step the same as the BCP method with the same generator seed (same power state).
        reference = bcp.bounds(x, y, bcp.forward(x), eps, index)
        torch.testing.assert_close(got.worst_logits, reference.worst_logits, rtol=0, atol=0)
        # The worst logits do depend on the norms: the check is not vacuous.
        doubled = bcp_worst_logits(model, x, y, eps, [2 * s for s in sigmas], cfg["translation_iterations"])
        assert not torch.allclose(doubled, expected)


def test_lambda_zero_adds_nothing_and_keeps_bcp(params, vanilla, factors, batch):
    x, y = batch
    model = _certification_model(params)
    method = make_duet(model, duet_cfg(params, **{"lambda": 0.0}), vanilla, factors, seed=5)
    bcp = build_method("bcp", model, params["bcp"], torch.Generator().manual_seed(5), 200)
    logits = method.forward(x)
    assert method.regulariser(x, y, logits) is None
    eps = params["duet"]["eps_train"]
    torch.testing.assert_close(method.bounds(x, y, logits, eps, None).worst_logits,
                               bcp.bounds(x, y, bcp.forward(x), eps, None).worst_logits, rtol=0, atol=0)


def test_method_state_resumes_the_same_steps(params, vanilla, factors, batch):
    x, y = batch
    model = _certification_model(params)
    for cert in ("power", "svd"):
        cfg = duet_cfg(params, cert_factors=cert, rank=4, refresh_every=3)
        first = make_duet(copy.deepcopy(model), cfg, vanilla, factors, seed=2)
        for _ in range(2):
            sim_loss(first, x, y)
        second = make_duet(copy.deepcopy(model), cfg, vanilla, factors, seed=9)
        second.load_state_dict(copy.deepcopy(first.state_dict()))
        assert second.steps == first.steps == 2
        assert sim_loss(second, x, y).item() == pytest.approx(sim_loss(first, x, y).item(), rel=1e-6)


# ---------------------------------------------------------------- 7. training stays finite
@pytest.fixture(scope="module")
def guide_root(tmp_path_factory, params, vanilla) -> Path:
    """A tiny run's inputs to duet training: a 200-image cut of the sample cache, the
    (untrained) vanilla model, and its SVD export."""
    root = tmp_path_factory.mktemp("duet_run")
    layout = RunLayout.of(params)
    cache = build_cache({**params["data"], "val_size": 100}, root / "full.pt", root / "full.json", root)
    small = {**cache.__dict__, "train_x": cache.train_x[:200], "train_y": cache.train_y[:200]}
    (root / layout.data_cache).parent.mkdir(parents=True)
    torch.save(small, root / layout.data_cache)
    (root / layout.vanilla_model).parent.mkdir(parents=True)
    torch.save({"state_dict": vanilla.state_dict(), "model": params["model"], "data_sha256": "x"},
               root / layout.vanilla_model)
    export_svd(params, root)
    return root


# A few hundred optimizer steps per rank (batch 4 of the 200 images: 50 steps per epoch).
TRAIN_BATCH = 4
# Full rank takes exact SVD factors, refreshed every 10 steps (an exact SVD of the
# 512 x 4096 layer at every step would cost minutes of CI); gradients still flow
# through the polar factor at every step.
TRAIN_RUNS = [pytest.param(1, "power", 1, 6, id="rank1-power"),
              pytest.param(4, "power", 1, 6, id="rank4-power"),
              pytest.param("full", "svd", 10, 4, id="full-svd")]


@pytest.mark.parametrize("rank,cert_factors,refresh_every,epochs", TRAIN_RUNS)
def test_training_stays_finite(params, guide_root, vanilla, tmp_path, monkeypatch, rank, cert_factors,
                               refresh_every, epochs):
    params = copy.deepcopy(params)
    layout = RunLayout.of(params)
    root = tmp_path / "run"
    for rel in (layout.data_cache, layout.vanilla_model, layout.svd_factors):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(guide_root / rel, root / rel)
    assert params["duet"]["sim_form"] == "paper" and params["duet"]["lambda"] == 1.0
    params["duet"].update(epochs=epochs, warmup_epochs=0, ramp_epochs=0.5, batch_size=TRAIN_BATCH, rank=rank,
                          cert_factors=cert_factors, refresh_every=refresh_every,
                          lr_schedule={**params["duet"]["lr_schedule"], "kind": "constant"})
    params["certify"] = {**params["certify"], "batch_size": 100}

    seen = {"steps": 0, "bounds": 0, "regulariser": [], "initial": None}
    original_build_model = certified_training.build_model

    def recording_build_model(model_params):
        model = original_build_model(model_params)
        seen["initial"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    def finite(tensor, what):
        assert torch.isfinite(tensor).all(), f"step {seen['steps']}: non-finite {what}"

    original_forward, original_regulariser, original_bounds = Duet.forward, Duet.regulariser, Duet.bounds

    def forward(self, x):
        logits = original_forward(self, x)
        finite(logits, "logits")
        return logits

    def regulariser(self, x, y, logits):
        value = original_regulariser(self, x, y, logits)
        finite(value, "loss_sim")
        seen["regulariser"].append(value.item())
        return value

    def bounds(self, x, y, logits, eps, index):
        out = original_bounds(self, x, y, logits, eps, index)
        finite(out.worst_logits, "worst logits")
        finite(out.lipschitz, "Lipschitz product")
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

    monkeypatch.setattr(certified_training, "build_model", recording_build_model)
    monkeypatch.setattr(Duet, "forward", forward)
    monkeypatch.setattr(Duet, "regulariser", regulariser)
    monkeypatch.setattr(Duet, "bounds", bounds)
    monkeypatch.setattr(torch.optim, "Adam", CheckedAdam)

    metrics = certified_training.train_certified(params, "duet", root)

    steps_per_epoch = -(-200 // TRAIN_BATCH)
    assert seen["steps"] == epochs * steps_per_epoch >= 200
    assert len(seen["regulariser"]) == seen["steps"]
    assert all(math.isfinite(v) and v > 0 for v in seen["regulariser"])
    assert seen["bounds"] >= seen["steps"] - 1          # the BCP term is on from the second step
    # The certification model did not start from the vanilla weights.
    vanilla_state = vanilla.state_dict()
    assert any(not torch.equal(seen["initial"][k], vanilla_state[k]) for k in vanilla_state if k.endswith("weight"))

    with open(root / layout.train("duet", "history.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == epochs
    for row in rows:
        for column in ("clean_loss", "robust_loss", "lipschitz", "regulariser"):
            assert math.isfinite(float(row[column])), (column, row)
        assert float(row["regulariser"]) > 0
        assert float(row["kappa"]) < 1.0
    trained = torch.load(root / layout.train("duet", "model.pt"), weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert metrics["method"] == "duet"


# ---------------------------------------------------------------- 8. other starting weights
def test_certification_model_starts_from_other_weights(params, vanilla):
    assert stage_seed(SEED, "vanilla") != stage_seed(SEED, "train", "duet")
    assert stage_seed(SEED, "train", "duet") == stage_seed(SEED, "train", "duet")
    first, second = _vanilla_model(params), _certification_model(params)
    vanilla_state = vanilla.state_dict()
    for key, value in first.state_dict().items():          # the stage seed does fix the weights
        assert torch.equal(value, vanilla_state[key]), key
    for layer_a, layer_b in zip(first.weight_layers(), second.weight_layers()):
        assert not torch.allclose(layer_a.module.weight, layer_b.module.weight)
        # not merely a sign or a permutation away: the rotations of the first layers differ
        if layer_a.index == 0:
            cosine = rotation_cosine(exact_rotation(layer_matrix(layer_a).detach(), None),
                                     exact_rotation(layer_matrix(layer_b).detach(), None)).item()
            assert abs(cosine) < 0.5


# ---------------------------------------------------------------- 9. bad config
def test_unknown_sim_form_is_a_clear_error(params, vanilla, factors):
    with pytest.raises(ValueError, match=r"duet\.sim_form"):
        make_duet(_certification_model(params), duet_cfg(params, sim_form="foo"), vanilla, factors)


@pytest.mark.parametrize("context", [None, {}, {"root": "x"}])
def test_missing_guide_is_a_clear_error(params, context):
    with pytest.raises(ValueError, match="guide"):
        build_method("duet", _certification_model(params), duet_cfg(params), torch.Generator().manual_seed(0),
                     200, context)
