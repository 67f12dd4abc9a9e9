"""Soundness and exactness of the certified bounds (pipeline_src/bounds) and of
the certifiers built on them (pipeline_src/bounds/certifiers.py).

  * property tests (hypothesis) on tiny random networks: points of the l2 ball
    B(x, eps), sampled and found by PGD, never leave the IBP box, the BCP ball
    and box (every layer), the BCP worst-case logits or the LMT margin;
  * the BCP translation against a brute-force / KKT reference;
  * the BCP layer rules on a two-layer network computed by hand;
  * certification end checks (correct points only, radius 0, PGD, numerics);
  * the persistent power iteration of training.

The tiny networks are real `CertifiableNet`s: `INPUT_SHAPE` and `ARCHITECTURES`
are patched only while one is built (the model keeps its layout afterwards).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.overrides import TorchFunctionMode

import pipeline_src.models.architectures as architectures
from pipeline_src.bounds.bcp import (BallBox, ball_box_activation, ball_box_bounds, ball_box_linear,
                                     bcp_worst_logits, translation_clip_rescale, translation_upper_bound)
from pipeline_src.bounds.ibp import flatten_if_needed, interval_activation, interval_linear
from pipeline_src.bounds.lipschitz import PersistentPowerIteration, lipschitz_worst_logits
from pipeline_src.bounds import certifiers
from pipeline_src.bounds.certifiers import certify_batch
from pipeline_src.bounds.numerics import float64_model, sound_numerics
from pipeline_src.models import CertifiableNet, WeightLayer
from pipeline_src.spectral.operator_norm import operator_norm_upper_bound
from tiny_nets import (TINY, ball_samples, certification_case, certified_radius_lipschitz,  # noqa: F401
                       dense_operator, guaranteed_layer_norms, margin_attack, pgd, single_thread, tiny_net,
                       trace)

ACTIVATIONS = ["relu", "maxmin", "clipped_relu"]
RTOL = 1e-5   # float32 slack, relative to the magnitudes involved

PROPERTY = settings(max_examples=30, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ helpers
@dataclass
class Case:
    model: CertifiableNet
    x: torch.Tensor          # (B, *input) clean points in [0, 1]
    y: torch.Tensor          # (B,) labels (random)
    eps: float
    points: torch.Tensor     # (N, *input) points of the balls B(x_b, eps)
    base: torch.Tensor       # (N,) index b of each point's centre


def make_case(arch: str, activation: str, seed: int, eps: float, scale: float,
              batch: int = 3, sampled: int = 12, attacked: int = 12, steps: int = 15) -> Case:
    model = tiny_net(arch, activation, seed, scale)
    g = torch.Generator().manual_seed(seed + 1)
    shape = TINY[arch][0]
    x = torch.rand(batch, *shape, generator=g)
    num_classes = model.weight_layers()[-1].output_shape[0]
    y = torch.randint(0, num_classes, (batch,), generator=g)

    # Sampled: uniform directions; half on the sphere, half at a uniform radius <= eps.
    sampled_points, base_s = ball_samples(x, eps, sampled, g)

    # PGD: each run pushes one random unit of one random layer up or down, or
    # (on the logits) one random margin z_t - z_y up.
    layers = model.weight_layers()
    base_a = torch.arange(batch).repeat_interleave(attacked)
    n = batch * attacked
    coefs = [torch.zeros(n, math.prod(layer.output_shape)) for layer in layers]
    for k in range(n):
        l = int(torch.randint(0, len(layers), (1,), generator=g))
        width = coefs[l].shape[1]
        if l == len(layers) - 1 and k % 2 == 0:
            coefs[l][k, int(torch.randint(0, width, (1,), generator=g))] += 1.0
            coefs[l][k, int(y[base_a[k]])] -= 1.0
        else:
            coefs[l][k, int(torch.randint(0, width, (1,), generator=g))] = 1.0 if k % 3 else -1.0

    def objective(z: torch.Tensor) -> torch.Tensor:
        return sum((coef * pre.flatten(1)).sum(1) for coef, (pre, _) in zip(coefs, trace(model, z)))

    attacked_points = pgd(x[base_a], eps, objective, steps, g)
    points = torch.cat([x, sampled_points, attacked_points])
    base = torch.cat([torch.arange(batch), base_s, base_a])
    return Case(model, x, y, eps, points, base)


def assert_in_box(value: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, what: str) -> None:
    tol = RTOL * (1.0 + torch.maximum(lower.abs(), upper.abs()).max().item())
    below = (lower - value).max().item()
    above = (value - upper).max().item()
    assert below <= tol and above <= tol, f"{what}: a point leaves the box by {max(below, above):.3g} (tol {tol:.3g})"


def assert_in_ball(value: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor, what: str) -> None:
    dist = (value - centre).flatten(1).norm(dim=1)
    tol = RTOL * (radius + centre.flatten(1).abs().amax(1) + 1.0)
    excess = dist - radius
    assert (excess <= tol).all(), (f"{what}: a point is {excess.max().item():.3g} outside the ball "
                                   f"(radius {radius[excess.argmax()].item():.3g})")


case_args = dict(arch=st.sampled_from(sorted(TINY)), seed=st.integers(0, 2**31 - 1),
                 eps=st.floats(1e-3, 0.5), scale=st.floats(0.2, 1.2))


# ------------------------------------------------------------------ helper sanity
def test_tiny_net_and_trace_match_the_forward_pass():
    for arch in TINY:
        for activation in ACTIVATIONS:
            model = tiny_net(arch, activation, 0)
            x = torch.rand(4, *TINY[arch][0], generator=torch.Generator().manual_seed(0))
            steps = trace(model, x)
            torch.testing.assert_close(steps[-1][0], model(x))
            assert len(steps) == len(TINY[arch][1])
            for (pre, post), layer in zip(steps, model.weight_layers()):
                assert tuple(pre.shape[1:]) == layer.output_shape
    # The patch is gone: the real architectures are unchanged.
    assert architectures.INPUT_SHAPE == (3, 32, 32) and "tiny_conv" not in architectures.ARCHITECTURES


# ------------------------------------------------------------------ 1. soundness
@pytest.mark.parametrize("activation", ACTIVATIONS)
@PROPERTY
@given(**case_args)
def test_ibp_box_contains_the_ball_at_every_layer(activation, arch, seed, eps, scale):
    case = make_case(arch, activation, seed, eps, scale)
    with torch.no_grad():
        steps = trace(case.model, case.points)
        lower, upper = case.x - eps, case.x + eps
        for l, layer in enumerate(case.model.weight_layers()):
            lower, upper = interval_linear(layer, flatten_if_needed(layer, lower),
                                           flatten_if_needed(layer, upper))
            pre, post = steps[l]
            assert_in_box(pre, lower[case.base], upper[case.base], f"IBP pre-activation, layer {l}")
            if layer.activation is not None:
                lower, upper = interval_activation(layer.activation, lower, upper)
                assert_in_box(post, lower[case.base], upper[case.base], f"IBP post-activation, layer {l}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@PROPERTY
@given(**case_args)
def test_bcp_ball_and_box_contain_the_ball_at_every_layer(activation, arch, seed, eps, scale):
    case = make_case(arch, activation, seed, eps, scale)
    norms = guaranteed_layer_norms(case.model)
    layers = case.model.weight_layers()
    with torch.no_grad():
        steps = trace(case.model, case.points)
        b = case.base
        state = BallBox(case.x, torch.full((case.x.shape[0],), eps), case.x - eps, case.x + eps)
        boxes = []
        for l, (layer, sigma) in enumerate(zip(layers, norms)):
            state = ball_box_linear(layer, state, sigma)
            boxes.append((state.lower, state.upper))
            pre, post = steps[l]
            what = f"BCP pre-activation, layer {l}"
            assert_in_box(pre, state.lower[b], state.upper[b], what)
            assert_in_ball(pre, state.centre[b], state.radius[b], what)
            if layer.activation is None:
                break
            state = ball_box_activation(layer.activation, state)
            what = f"BCP post-activation, layer {l}"
            assert_in_box(post, state.lower[b], state.upper[b], what)
            assert_in_ball(post, state.centre[b], state.radius[b], what)
            if l == len(layers) - 2:
                at_logit_input = state
        # ball_box_bounds is this same propagation up to the logit layer.
        recorded = []
        final, logits = ball_box_bounds(case.model, case.x, eps, norms, pre_activation=recorded)
        last = layers[-1]
        assert len(recorded) == len(layers) - 1
        for (lo, hi), (my_lo, my_hi) in zip(recorded, boxes):
            torch.testing.assert_close(lo, my_lo)
            torch.testing.assert_close(hi, my_hi)
        torch.testing.assert_close(final.lower, flatten_if_needed(last, at_logit_input.lower))
        torch.testing.assert_close(final.upper, flatten_if_needed(last, at_logit_input.upper))
        torch.testing.assert_close(final.radius, at_logit_input.radius)
        torch.testing.assert_close(logits, case.model(case.x))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@PROPERTY
@given(**case_args)
def test_bcp_worst_logits_bound_every_margin(activation, arch, seed, eps, scale):
    case = make_case(arch, activation, seed, eps, scale)
    norms = guaranteed_layer_norms(case.model)
    with torch.no_grad():
        worst = bcp_worst_logits(case.model, case.x, case.y, eps, norms, translation_iterations=None)
        clean = case.model(case.x)
        true_clean = clean.gather(1, case.y[:, None])
        # The label's own worst logit is its clean logit.
        torch.testing.assert_close(worst.gather(1, case.y[:, None]), true_clean)
        bound = (worst - true_clean)[case.base]                    # z_hat_i - z_y(x)
        z = case.model(case.points)
        y = case.y[case.base]
        margin = z - z.gather(1, y[:, None])                       # z_i(x') - z_y(x')
    tol = RTOL * (1.0 + clean.abs().max().item() + bound.abs().max().item())
    excess = (margin - bound).max().item()
    assert excess <= tol, f"BCP worst-case logits violated by {excess:.3g} (tol {tol:.3g})"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@PROPERTY
@given(**case_args)
def test_lipschitz_margin_bound(activation, arch, seed, eps, scale):
    case = make_case(arch, activation, seed, eps, scale)
    lipschitz = math.prod(guaranteed_layer_norms(case.model))
    with torch.no_grad():
        clean = case.model(case.x)
        z = case.model(case.points)
    y = case.y[case.base]
    moved = (z - z.gather(1, y[:, None])) - (clean - clean.gather(1, case.y[:, None]))[case.base]
    allowed = math.sqrt(2.0) * lipschitz * eps
    tol = RTOL * (1.0 + allowed + clean.abs().max().item())
    assert moved.abs().max().item() <= allowed + tol, (moved.abs().max().item(), allowed)
    # lipschitz_worst_logits is that bound on the wrong classes.
    worst = lipschitz_worst_logits(clean, case.y, lipschitz, eps)
    bound = (worst - clean.gather(1, case.y[:, None]))[case.base]
    assert ((z - z.gather(1, y[:, None])) - bound).max().item() <= tol


# ------------------------------------------------------------------ 2. the BCP translation
def reference_translation(c: torch.Tensor, low: torch.Tensor, high: torch.Tensor, r: float
                          ) -> tuple[float, torch.Tensor]:
    """max c.d over ||d|| <= r, low <= d <= high (low <= 0 <= high), float64, one row.
    KKT: either the box optimum is inside the ball, or d = clip(lam c) with ||d|| = r;
    the dual value at nu = 1/lam certifies the answer to 1e-9."""
    if r == 0:
        return 0.0, torch.zeros_like(c)
    corner = torch.where(c > 0, high, torch.where(c < 0, low, torch.zeros_like(c)))
    if corner.norm() <= r:
        return float(c @ corner), corner
    lam_lo, lam_hi = 0.0, 1.0
    while (lam_hi * c).clamp(low, high).norm() < r:
        lam_hi *= 2.0
    for _ in range(200):
        lam = (lam_lo + lam_hi) / 2
        if (lam * c).clamp(low, high).norm() <= r:
            lam_lo = lam
        else:
            lam_hi = lam
    d = (lam_lo * c).clamp(low, high)
    primal = float(c @ d)
    nu = 1.0 / lam_lo
    dual = float(nu * r * r / 2 + (c * d - nu * d * d / 2).sum())
    assert dual - primal <= 1e-9 * (1 + abs(primal)), (primal, dual)
    return primal, d


def grid_maximum(c: torch.Tensor, low: torch.Tensor, high: torch.Tensor, r: float, per_side: int
                 ) -> tuple[float, float]:
    """Max of c.d over a grid of the box (each axis: [low, 0] and [0, high] with
    `per_side` points each), kept inside the ball; and how far below the true
    maximum it can be (rounding the maximiser's coordinates towards 0 onto the grid)."""
    axes = [torch.cat([torch.linspace(float(lo), 0.0, per_side, dtype=torch.float64),
                       torch.linspace(0.0, float(hi), per_side, dtype=torch.float64)])
            for lo, hi in zip(low, high)]
    grid = torch.cartesian_prod(*axes)
    feasible = grid[grid.norm(dim=1) <= r]
    value = float((feasible @ c).max())
    slack = float(sum(abs(float(cj)) * max(-float(lo), float(hi)) / (per_side - 1)
                      for cj, lo, hi in zip(c, low, high)))
    return value, slack


class CaptureProduct(TorchFunctionMode):
    """Records `d` in the final `(c * d).sum(-1)` of translation_clip_rescale."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c, self.d = c, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.mul, torch.Tensor.__mul__, torch.mul) and len(args) == 2 and args[0] is self.c:
            self.d = args[1]
        return func(*args, **(kwargs or {}))


def clip_rescale_with_point(c, low, high, radius, iterations):
    with CaptureProduct(c) as capture:
        value = translation_clip_rescale(c, low, high, radius, iterations)
    assert capture.d is not None and capture.d.shape == c.shape, "could not observe the point d"
    return value, capture.d.detach()


def random_translation_problem(seed: int, batch: int, classes: int, h: int, zero_row: bool,
                               zero_coord: bool, flat_side: bool, radius_scale: float):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(batch, classes, h, generator=g, dtype=torch.float64)
    low = -torch.rand(batch, 1, h, generator=g, dtype=torch.float64)
    high = torch.rand(batch, 1, h, generator=g, dtype=torch.float64)
    radius = radius_scale * torch.rand(batch, generator=g, dtype=torch.float64)
    if zero_row:
        c[0, 0] = 0.0
    if zero_coord:
        c[..., -1] = 0.0
    if flat_side:
        low[..., 0] = 0.0          # one-sided coordinate
        if h > 2:
            high[..., 1] = 0.0
            low[..., 1] = 0.0      # a coordinate pinned at 0
    return c, low, high, radius


translation_args = dict(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), classes=st.integers(1, 4),
                        h=st.integers(2, 4), zero_row=st.booleans(), zero_coord=st.booleans(),
                        flat_side=st.booleans(), radius_scale=st.sampled_from([0.05, 0.5, 1.0, 2.0]))


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(**translation_args)
def test_translation_upper_bound_is_the_true_maximum(seed, batch, classes, h, zero_row, zero_coord,
                                                     flat_side, radius_scale):
    c, low, high, radius = random_translation_problem(seed, batch, classes, h, zero_row, zero_coord,
                                                      flat_side, radius_scale)
    bound = translation_upper_bound(c, low, high, radius)
    assert bound.shape == (batch, classes) and bound.dtype == torch.float64
    for b in range(batch):
        r = float(radius[b])
        for i in range(classes):
            exact, d = reference_translation(c[b, i], low[b, 0], high[b, 0], r)
            # the reference point is feasible
            assert (d >= low[b, 0] - 1e-12).all() and (d <= high[b, 0] + 1e-12).all()
            assert float(d.norm()) <= r * (1 + 1e-12) + 1e-15
            got = float(bound[b, i])
            assert got >= exact - 1e-12, f"unsound: bound {got} below the maximum {exact}"
            assert got <= exact + 1e-6, f"loose: bound {got} vs maximum {exact}"
            if h <= 3:
                grid, slack = grid_maximum(c[b, i], low[b, 0], high[b, 0], r, 300 if h == 2 else 40)
                assert grid <= exact + 1e-12, (grid, exact)          # the reference is a maximum
                assert grid >= exact - slack - 1e-12, (grid, exact, slack)
                assert got >= grid - 1e-12


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(**translation_args)
def test_translation_clip_rescale_is_feasible_and_close(seed, batch, classes, h, zero_row, zero_coord,
                                                        flat_side, radius_scale):
    c, low, high, radius = random_translation_problem(seed, batch, classes, h, zero_row, zero_coord,
                                                      flat_side, radius_scale)
    bound = translation_upper_bound(c, low, high, radius)
    ball_only = radius.view(-1, 1) * c.norm(dim=-1)
    for iterations in (1, 50):
        value, d = clip_rescale_with_point(c, low, high, radius, iterations)
        assert value.shape == (batch, classes)
        assert (d >= low - 1e-5).all() and (d <= high + 1e-5).all(), f"{iterations} its: d leaves the box"
        assert (d.norm(dim=-1) <= radius.view(-1, 1) * (1 + 1e-5) + 1e-5).all(), f"{iterations} its: d leaves the ball"
        torch.testing.assert_close(value, (c * d).sum(-1))
        assert (value <= bound + 1e-9).all(), f"{iterations} its: value above the upper bound"
    # 50 iterations get close to the maximum (the heuristic converges linearly).
    assert ((bound - value) <= 5e-3 * ball_only + 1e-9).all(), ((bound - value) / ball_only.clamp_min(1e-12)).max()


def test_translation_edge_cases():
    c = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 0.0, 1.0]]], dtype=torch.float64)
    low = torch.tensor([[[-0.1, -0.2, -0.05]]], dtype=torch.float64)
    high = torch.tensor([[[0.2, 0.1, 0.3]]], dtype=torch.float64)
    box_only = torch.maximum(c * low, c * high).sum(-1)          # [0.2+0.4+0.15, 0, 0.3+0+0.3]
    torch.testing.assert_close(box_only, torch.tensor([[0.75, 0.0, 0.6]], dtype=torch.float64))

    # Box entirely inside the ball (corners' norms <= sqrt(0.17) < 0.5 <= r): the box-only value.
    for r in (0.5, 10.0):
        radius = torch.tensor([r], dtype=torch.float64)
        got = translation_upper_bound(c, low, high, radius)
        assert (got >= box_only).all() and (got <= box_only + 1e-6).all(), got
        for iterations in (1, 50):
            value = translation_clip_rescale(c, low, high, radius, iterations)
            torch.testing.assert_close(value, box_only, rtol=0, atol=1e-9)

    # Ball entirely inside the box (r <= every |bound|): r ||c||.
    wide_low, wide_high = torch.full_like(low, -5.0), torch.full_like(high, 5.0)
    radius = torch.tensor([0.5], dtype=torch.float64)
    ball_only = 0.5 * c.norm(dim=-1)
    got = translation_upper_bound(c, wide_low, wide_high, radius)
    assert (got >= ball_only).all() and (got <= ball_only + 1e-6).all(), got
    value = translation_clip_rescale(c, wide_low, wide_high, radius, 1)
    torch.testing.assert_close(value, ball_only, rtol=1e-12, atol=1e-12)

    # A zero row (class i == y): nothing to gain, exactly 0.
    for lo, hi in ((low, high), (wide_low, wide_high)):
        assert abs(float(translation_upper_bound(c, lo, hi, radius)[0, 1])) <= 1e-12
        assert abs(float(translation_clip_rescale(c, lo, hi, radius, 50)[0, 1])) <= 1e-12

    # Radius 0: nothing to gain either.
    zero = torch.zeros(1, dtype=torch.float64)
    assert translation_upper_bound(c, low, high, zero).abs().max() <= 1e-12


def test_translation_upper_bound_widens_the_box_to_contain_zero():
    """Rounding can leave the centre a hair outside its box (low > 0 or high < 0 on a
    coordinate). The bound is taken over the box widened to contain 0 (a larger set: still
    an upper bound), so it equals the bound on the widened box and is never below 0, the
    value at d = 0, even where every point of the unwidened box gives a negative c . d."""
    c = torch.tensor([[[-1.0, 2.0, 0.5], [-1.0, -1.0, 0.0]]], dtype=torch.float64)
    low = torch.tensor([[[1e-7, -0.2, -0.1]]], dtype=torch.float64)      # coordinate 0 above 0
    high = torch.tensor([[[0.3, -1e-7, 0.2]]], dtype=torch.float64)     # coordinate 1 below 0
    widened_low, widened_high = low.clamp_max(0.0), high.clamp_min(0.0)
    for r in (0.05, 0.5, 5.0):
        radius = torch.tensor([r], dtype=torch.float64)
        bound = translation_upper_bound(c, low, high, radius)
        torch.testing.assert_close(bound, translation_upper_bound(c, widened_low, widened_high, radius),
                                   rtol=0, atol=0)
        assert (bound >= 0).all(), bound
        for i in range(2):
            exact, _ = reference_translation(c[0, i], widened_low[0, 0], widened_high[0, 0], r)
            assert exact - 1e-12 <= float(bound[0, i]) <= exact + 1e-6, (r, i, float(bound[0, i]), exact)
    # A ball too small to reach the unwidened box (d_0 >= 1e-7 > r): that set is empty, the
    # widened one is not; the bound is finite, >= 0 and at most r ||c||.
    tiny = translation_upper_bound(c, low, high, torch.tensor([1e-9], dtype=torch.float64))
    assert torch.isfinite(tiny).all() and (tiny >= 0).all()
    assert (tiny <= 1e-9 * c.norm(dim=-1) * (1 + 1e-6)).all(), tiny


# ------------------------------------------------------------------ 3. BCP rules by hand
def linear(weight, bias) -> nn.Linear:
    module = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        module.weight.copy_(torch.tensor(weight))
        module.bias.copy_(torch.tensor(bias))
    return module


class HandNet:
    """Duck-typed network: only weight_layers() is used by the bound code."""

    def __init__(self, layers):
        self.layers = layers

    def weight_layers(self):
        return self.layers


# W1 = [[1, 2], [-1, 1]], b1 = [0.5, 0]; W2 = [[1, -1], [0.5, 1]], b2 = [0, 0.1].
W1, B1 = [[1.0, 2.0], [-1.0, 1.0]], [0.5, 0.0]
W2, B2 = [[1.0, -1.0], [0.5, 1.0]], [0.0, 0.1]
# sigma_max(W1): W1^T W1 = [[2, 1], [1, 5]], eigenvalues (7 +- sqrt 13) / 2, so
# sigma = sqrt((7 + sqrt 13) / 2) = (1 + sqrt 13) / 2 = 2.3027756...
SIGMA1 = (1 + math.sqrt(13)) / 2


def hand_layers():
    return [WeightLayer(0, linear(W1, B1), (2,), (2,), nn.ReLU(), False),
            WeightLayer(1, linear(W2, B2), (2,), (2,), None, False)]


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-6)


def test_sigma_by_hand_matches_the_guaranteed_norm():
    layer = hand_layers()[0]
    assert operator_norm_upper_bound(layer) == pytest.approx(SIGMA1, rel=1e-8)
    assert SIGMA1 ** 2 == pytest.approx((7 + math.sqrt(13)) / 2)


def test_ball_box_linear_by_hand():
    layer = hand_layers()[0]
    # Input state: centre mu = (0.5, 0.5), radius r = 0.2, an off-centre box
    # [0.45, 0.55] x [0.3, 0.6]: mid = (0.5, 0.45), rad = (0.05, 0.15).
    state = BallBox(torch.tensor([[0.5, 0.5]]), torch.tensor([0.2]),
                    torch.tensor([[0.45, 0.3]]), torch.tensor([[0.55, 0.6]]))
    # IBP: W1 mid + b1 = (0.5 + 0.9 + 0.5, -0.5 + 0.45 + 0) = (1.9, -0.05);
    #      |W1| rad    = (0.05 + 0.30, 0.05 + 0.15)       = (0.35, 0.2)
    #      -> unit 0 in [1.55, 2.25], unit 1 in [-0.25, 0.15].
    ibp_lo, ibp_hi = interval_linear(layer, state.lower, state.upper)
    close(ibp_lo, [[1.55, -0.25]])
    close(ibp_hi, [[2.25, 0.15]])
    # Ball: W1 mu + b1 = (2.0, 0.0); r ||W1_j|| = (0.2 sqrt 5, 0.2 sqrt 2) = (0.4472136, 0.2828427)
    #      -> unit 0 in [1.5527864, 2.4472136], unit 1 in [-0.2828427, 0.2828427].
    # Intersection: unit 0 [1.5527864 (ball), 2.25 (IBP)], unit 1 [-0.25, 0.15] (IBP).
    # Radius: 0.2 sigma_max(W1) = 0.2 * 2.3027756 = 0.4605551.
    out = ball_box_linear(layer, state, SIGMA1)
    close(out.centre, [[2.0, 0.0]])
    close(out.lower, [[2.0 - 0.2 * math.sqrt(5), -0.25]])
    close(out.upper, [[2.25, 0.15]])
    close(out.radius, [0.2 * SIGMA1])
    assert out.radius.item() == pytest.approx(0.46055513, rel=1e-6)


def test_ball_box_activation_by_hand():
    relu = nn.ReLU()
    # Centre (1.0, -0.3), radius 0.2, box [0.5, 1.1] x [-0.6, 0.4].
    state = BallBox(torch.tensor([[1.0, -0.3]]), torch.tensor([0.2]),
                    torch.tensor([[0.5, -0.6]]), torch.tensor([[1.1, 0.4]]))
    # Box rule:  [relu(l), relu(u)]            = [0.5, 1.1] x [0, 0.4]
    # Ball rule: [relu(mu - r), relu(mu + r)]  = [0.8, 1.2] x [relu(-0.5), relu(-0.1)] = [0.8, 1.2] x [0, 0]
    # Intersection: [0.8, 1.1] x [0, 0]; centre relu(mu) = (1.0, 0.0); radius unchanged (ReLU is 1-Lipschitz).
    out = ball_box_activation(relu, state)
    close(out.centre, [[1.0, 0.0]])
    close(out.lower, [[0.8, 0.0]])
    close(out.upper, [[1.1, 0.0]])
    close(out.radius, [0.2])


def test_two_layer_network_by_hand():
    net = HandNet(hand_layers())
    x, eps, y = torch.tensor([[0.5, 0.5]]), 0.1, torch.tensor([0])
    norms = [SIGMA1, 1.0]
    # Layer 1 from the input box [0.4, 0.6]^2 (mid x, rad 0.1) and ball B(x, 0.1):
    #   IBP:  W1 x + b1 = (2.0, 0.0), |W1| rad = (0.3, 0.2) -> [1.7, 2.3] x [-0.2, 0.2]
    #   ball: +- 0.1 ||W1_j|| = (0.1 sqrt 5, 0.1 sqrt 2) -> [1.7763932, 2.2236068] x [-0.1414214, 0.1414214]
    #   intersection = the ball box; radius r1 = 0.1 sigma = 0.2302776.
    state = ball_box_linear(net.layers[0], BallBox(x, torch.tensor([eps]), x - eps, x + eps), SIGMA1)
    s5, s2, r1 = 0.1 * math.sqrt(5), 0.1 * math.sqrt(2), 0.1 * SIGMA1
    close(state.lower, [[2.0 - s5, -s2]])
    close(state.upper, [[2.0 + s5, s2]])
    close(state.radius, [r1])
    # ReLU: box rule [1.7763932, 2.2236068] x [0, 0.1414214];
    #       ball rule [relu(2 - r1), relu(2 + r1)] x [relu(-r1), relu(r1)] = [1.7697224, 2.2302776] x [0, 0.2302776]
    #       intersection = the box rule; centre (2, 0).
    state = ball_box_activation(nn.ReLU(), state)
    close(state.lower, [[2.0 - s5, 0.0]])
    close(state.upper, [[2.0 + s5, s2]])
    final, logits = ball_box_bounds(net, x, eps, norms)
    close(final.centre, [[2.0, 0.0]])
    close(final.lower, [[2.0 - s5, 0.0]])
    close(final.upper, [[2.0 + s5, s2]])
    close(final.radius, [r1])
    # Logits at the centre: z = W2 (2, 0) + b2 = (2.0, 1.1).
    close(logits, [[2.0, 1.1]])
    # Translation for class 1 against y = 0: c = w_1 - w_0 = (-0.5, 2),
    # d in [-s5, s5] x [0 - 0, s2 - 0] (relative to the centre), ||d|| <= r1.
    #   box corner (-s5, s2) has norm sqrt(0.05 + 0.02) = 0.2645751 > r1: the ball binds.
    #   KKT d = clip(lam c): d_2 = s2 (clipped), d_1 = -sqrt(r1^2 - s2^2) = -0.1817354 (free,
    #   inside [-s5, s5]; lam = 0.3634708 and 2 lam > s2 confirm the clipping pattern).
    #   value = 0.5 * 0.1817354 + 2 * s2 = 0.0908677 + 0.2828427 = 0.3737104.
    d1 = math.sqrt(r1 ** 2 - s2 ** 2)
    translation = 0.5 * d1 + 2 * s2
    assert translation == pytest.approx(0.3737104, abs=1e-6)
    worst = bcp_worst_logits(net, x, y, eps, norms, translation_iterations=None)
    close(worst, [[2.0, 1.1 + translation]])
    # With a generous number of clip-and-rescale iterations the training path agrees.
    trained = bcp_worst_logits(net, x, y, eps, norms, translation_iterations=100)
    torch.testing.assert_close(trained, worst, rtol=1e-4, atol=1e-4)
    assert (trained <= worst + 1e-6).all()


# ------------------------------------------------------------------ 4. certification
@pytest.fixture(scope="module", params=ACTIVATIONS)
def certified_setup(request):
    return certification_case(request.param)


def test_certify_batch_certifies_only_correct_points(certified_setup, monkeypatch):
    model, x, y, logits, norms = certified_setup
    correct = logits.argmax(1) == y
    assert 0 < correct.sum() < len(y)
    with sound_numerics(model):
        for eps in (0.0, 0.01):
            out = certify_batch(model, x, y, eps, norms, ["lipschitz", "bcp"])
            for name, certified in out.items():
                assert certified.dtype == torch.bool and certified.shape == y.shape
                assert not (certified & ~correct).any(), f"{name} certifies a misclassified point"
    # Even a certifier that says yes to everything is masked by correctness.
    def always(model, points, labels, *args, **kwargs):
        return torch.ones(len(labels), dtype=torch.bool)
    monkeypatch.setitem(certifiers.CERTIFIERS, "lipschitz", always)
    monkeypatch.setitem(certifiers.CERTIFIERS, "bcp", always)
    with sound_numerics(model):
        out = certify_batch(model, x, y, 0.5, norms, ["lipschitz", "bcp"])
    assert torch.equal(out["lipschitz"], correct) and torch.equal(out["bcp"], correct)
    with pytest.raises(ValueError):
        certify_batch(model, x, y, 0.01, norms, ["nope"])


def test_certified_curve_equals_every_point_at_every_radius(certified_setup):
    """The nested curve (each radius on the points certified at the one before) gives
    exactly the flags of certifying every point at every radius, for every certifier
    that applies, and never touches a misclassified point."""
    model, x, y, logits, norms = certified_setup
    names = certifiers.certifiers_for(model) + (["local"] if model.activation_name == "relu" else [])
    radii = [0.0, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08]
    seen = []
    with sound_numerics(model):
        model64 = float64_model(model)
        exact = model64(x.double())
        for name in names:
            full = [certifiers.certified_at(name, model64, x, y, logits, r, norms, exact) for r in radii]
            counts = [int(f.sum()) for f in full]
            assert counts[0] > counts[-1] and any(0 < c < counts[0] for c in counts), (name, counts)
            nested = certifiers.certified_curve(name, model64, x, y, logits, radii, norms, exact)
            for r, a, b in zip(radii, full, nested):
                assert torch.equal(a, b), f"{name} at radius {r}: nested {b.sum()} vs full {a.sum()}"
            seen.append(name)
        with pytest.raises(ValueError, match="ascending"):
            certifiers.certified_curve("bcp", model64, x, y, logits, [0.02, 0.01], norms, exact)
    assert {"lipschitz", "gloro", "bcp"} <= set(seen)
    assert ("local" in seen) == (model.activation_name in ("relu", "clipped_relu"))


def test_certified_curve_skips_misclassified_points(certified_setup, monkeypatch):
    model, x, y, logits, norms = certified_setup
    correct = logits.argmax(1) == y
    sizes = []
    real = certifiers.CERTIFIERS["bcp"]

    def counting(model, points, labels, *args, **kwargs):
        sizes.append(len(labels))
        return real(model, points, labels, *args, **kwargs)
    monkeypatch.setitem(certifiers.CERTIFIERS, "bcp", counting)
    with sound_numerics(model):
        model64 = float64_model(model)
        curve = certifiers.certified_curve("bcp", model64, x, y, logits, [0.0, 0.01, 0.04], norms,
                                           model64(x.double()))
    assert sizes[0] == int(correct.sum()) < len(y)
    assert sizes[1] == int(curve[1].sum())


def test_certification_at_radius_zero_is_accuracy(certified_setup):
    model, x, y, logits, norms = certified_setup
    correct = logits.argmax(1) == y
    with sound_numerics(model):
        out = certify_batch(model, x, y, 0.0, norms, ["lipschitz", "bcp"])
    assert torch.equal(out["lipschitz"], correct)
    assert torch.equal(out["bcp"], correct)
    # The certifiers themselves, not only certify_batch's shortcut at radius 0.
    with sound_numerics(model):
        assert torch.equal(certifiers.lipschitz_certified(logits, y, norms.lipschitz_upper, 0.0), correct)
        assert torch.equal(certifiers.bcp_certified(model, x, y, 0.0, norms), correct)
        worst = bcp_worst_logits(model, x, y, 0.0, norms.upper, translation_iterations=None)
    torch.testing.assert_close(worst, logits, rtol=0, atol=1e-6)
    radius = certified_radius_lipschitz(logits, y, norms.lipschitz_upper)
    assert torch.equal(radius > 0, correct)
    assert (radius[~correct] == 0).all()


@pytest.mark.parametrize("eps", [0.01, 0.03])
def test_certified_points_survive_pgd(certified_setup, eps):
    model, x, y, logits, norms = certified_setup
    with sound_numerics(model):
        out = certify_batch(model, x, y, eps, norms, ["lipschitz", "bcp"])
        # The certifiers decide on the float64 model's logits.
        radius = certified_radius_lipschitz(float64_model(model)(x.double()), y,
                                            norms.lipschitz_upper)
    assert out["bcp"].sum() > 0, "vacuous: nothing certified"
    if eps == 0.01:
        assert out["lipschitz"].sum() > 0, "vacuous: nothing certified by LMT"
    assert torch.equal(out["lipschitz"], radius > eps)
    # BCP's ball part alone is never looser than LMT's margin (||w_i - w_y|| <= sqrt 2 sigma).
    clear = radius > eps * (1 + 1e-4)
    assert not (clear & ~out["bcp"]).any()
    certified = out["lipschitz"] | out["bcp"]
    worst = margin_attack(model, x[certified], y[certified], eps, steps=50, restarts=5)
    assert (worst < 0).all(), f"a certified point was flipped by PGD: margins {worst}"
    # The attack has teeth: at a large radius it flips correctly classified points.
    correct = logits.argmax(1) == y
    strong = margin_attack(model, x[correct], y[correct], 1.0, steps=50, restarts=2)
    assert (strong > 0).sum() > 0


def test_lipschitz_margin_by_hand():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 4.0, 1.0]])
    y = torch.tensor([0, 0])
    # Example 0: margin 3 - 2 = 1, less the relative-margin rule's 1e-6 (|3| + |2|), over
    # sqrt 2 * L (1 + 1e-6) with L = 2 (class 1: (2 - 4e-6) / ..., larger); example 1 is wrong: 0.
    assert certifiers.MARGIN_RTOL == 1e-6
    radius = certified_radius_lipschitz(logits, y, 2.0)
    assert radius.dtype == torch.float64
    close(radius, [(1 - 5e-6) / (2 * math.sqrt(2) * (1 + 1e-6)), 0.0])
    assert torch.equal(certifiers.lipschitz_certified(logits, y, 2.0, 0.35), torch.tensor([True, False]))
    assert torch.equal(certifiers.lipschitz_certified(logits, y, 2.0, 0.36), torch.tensor([False, False]))
    # Worst-case logits: every wrong class raised by sqrt 2 * L * eps = sqrt 2 * 2 * 0.25.
    worst = lipschitz_worst_logits(logits, y, 2.0, 0.25)
    up = math.sqrt(2) * 0.5
    close(worst, [[3.0, 1.0 + up, 2.0 + up], [0.0, 4.0 + up, 1.0 + up]])


def test_sound_numerics_restores_settings():
    model = tiny_net("tiny_dense", "relu", 0)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for training, tf32 in ((True, True), (False, False), (True, False)):
            model.train(training)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            with sound_numerics(model):
                assert not model.training
                assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
                assert not torch.is_grad_enabled()
            assert model.training == training
            assert torch.backends.cuda.matmul.allow_tf32 == tf32 and torch.backends.cudnn.allow_tf32 == tf32
            assert torch.is_grad_enabled()
            # ... also when the body raises.
            with pytest.raises(RuntimeError):
                with sound_numerics(model):
                    raise RuntimeError("boom")
            assert model.training == training
            assert torch.backends.cuda.matmul.allow_tf32 == tf32 and torch.backends.cudnn.allow_tf32 == tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------ 5. persistent power iteration
def exact_norm(layer: WeightLayer) -> float:
    return torch.linalg.matrix_norm(dense_operator(layer).double(), ord=2).item()


@pytest.mark.parametrize("arch", sorted(TINY))
def test_persistent_power_iteration_converges_below_the_bound(arch):
    model = tiny_net(arch, "relu", 3, scale=1.0)
    layers = model.weight_layers()
    upper = guaranteed_layer_norms(model)
    assert upper == [operator_norm_upper_bound(layer) for layer in layers]
    exact = [exact_norm(layer) for layer in layers]
    assert all(u >= e * (1 - 1e-6) for u, e in zip(upper, exact))
    power = PersistentPowerIteration(layers, torch.Generator().manual_seed(0))
    previous = [0.0] * len(layers)
    for _ in range(40):
        sigmas = [s.item() for s in power.norms(layers, 3)]
        for l, (s, u, p) in enumerate(zip(sigmas, upper, previous)):
            assert s <= u * (1 + 1e-5), f"layer {l}: estimate {s} above the guaranteed bound {u}"
            assert s >= p * (1 - 1e-5), f"layer {l}: the estimate decreased ({p} -> {s})"
        previous = sigmas
    for layer, s, u, e in zip(layers, sigmas, upper, exact):
        # The estimate converges to the true operator norm. The guaranteed bound
        # equals it for a dense layer; for a padded conv on a tiny canvas the
        # circular-convolution bound is several percent above the true norm.
        assert s == pytest.approx(e, rel=0.02), (layer.name, s, e)
        if layer.kind == "linear":
            assert s == pytest.approx(u, rel=0.02), (layer.name, s, u)


def test_persistent_power_iteration_is_differentiable():
    model = tiny_net("tiny_conv", "relu", 1)
    layers = model.weight_layers()
    power = PersistentPowerIteration(layers, torch.Generator().manual_seed(0))
    power.norms(layers, 20)
    sigmas = power.norms(layers, 1)
    for layer, sigma in zip(layers, sigmas):
        assert sigma.requires_grad
        weight = layer.module.weight
        grad, = torch.autograd.grad(sigma, weight)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, layer.name
    # For a dense layer, d||W v|| / dW = u v^T with u = W v / ||W v||.
    dense = layers[-1]
    v = power.vectors[-1]
    wv = dense.module.weight @ v[0]
    sigma = nn.functional.linear(v, dense.module.weight).norm()
    grad, = torch.autograd.grad(sigma, dense.module.weight)
    torch.testing.assert_close(grad, torch.outer(wv / wv.norm(), v[0]).detach())


def test_persistent_power_iteration_state_round_trip():
    model = tiny_net("tiny_conv", "maxmin", 2)
    layers = model.weight_layers()
    first = PersistentPowerIteration(layers, torch.Generator().manual_seed(0))
    first.norms(layers, 5)
    state = first.state_dict()
    assert len(state["vectors"]) == len(layers)
    for v, layer in zip(state["vectors"], layers):
        assert not v.requires_grad and v.device.type == "cpu" and tuple(v.shape) == (1, *layer.input_shape)
    second = PersistentPowerIteration(layers, torch.Generator().manual_seed(123))
    assert not torch.equal(second.vectors[0], first.vectors[0])
    second.load_state_dict(state)
    for a, b in zip(first.vectors, second.vectors):
        assert torch.equal(a, b)
    after_first = [s.item() for s in first.norms(layers, 2)]
    after_second = [s.item() for s in second.norms(layers, 2)]
    assert after_first == after_second


# ------------------------------------------------------------------ the clean pass, reused
@pytest.mark.parametrize("method_name, activation", [("bcp", "relu"), ("localbcp", "clipped_relu"),
                                                     ("bcp", "clipped_relu")])
def test_bounds_reusing_the_clean_pass_equal_the_recomputed_ones(method_name, activation):
    """A training step's forward keeps its activations as the ball's centres: the worst-case
    logits, the loss and every gradient are those of the bounds computed from scratch."""
    import copy

    from pipeline_src.config import load_params
    from pipeline_src.methods import build_method
    from pipeline_src.training.certified import certified_loss

    cfg = copy.deepcopy(load_params("smoke")[method_name])
    model = tiny_net("tiny_conv", activation, 21, scale=0.8, theta_max=1.0).train()
    g = torch.Generator().manual_seed(22)
    x = torch.rand(5, *TINY["tiny_conv"][0], generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    index = torch.arange(5)
    results = []
    for reuse in (True, False):
        method = build_method(method_name, model, cfg, torch.Generator().manual_seed(0), num_examples=5)
        logits = method.forward(x) if reuse else model(x)
        assert (method.clean_pass(x) is not None) == reuse
        assert method.clean_pass(x.clone()) is None          # only for this very batch
        if reuse:                                             # ... and these very weights
            first = next(model.parameters())
            with torch.no_grad():
                first.mul_(1.0)
            assert method.clean_pass(x) is None
            logits = method.forward(x)
        bounds = method.bounds(x, y, logits, 0.1, index)
        loss, _ = certified_loss(torch.nn.functional.cross_entropy(logits, y), bounds, y, 0.3)
        model.zero_grad()
        loss.backward()
        results.append((bounds.worst_logits.detach(), loss.detach(),
                        [p.grad.clone() for p in model.parameters()]))
        method.after_step()
        assert method.clean_pass(x) is None                   # dropped after the step
    (worst_a, loss_a, grads_a), (worst_b, loss_b, grads_b) = results
    torch.testing.assert_close(worst_a, worst_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_bcp_bounds_equal_the_eager_ones():
    """`compile: true` (torch.compile of the bound computation, forward and backward) gives
    the eager path's worst-case logits, loss and gradients within fp32 tolerance, at several
    eps of the ramp without recompiling for each, and on a smaller last batch."""
    import copy

    from pipeline_src.config import load_params
    from pipeline_src.methods import build_method
    from pipeline_src.training.certified import certified_loss

    cfg = copy.deepcopy(load_params("smoke")["bcp"])
    model = tiny_net("tiny_conv", "relu", 31, scale=0.8).train()
    g = torch.Generator().manual_seed(32)
    batches = [(torch.rand(n, *TINY["tiny_conv"][0], generator=g), torch.randint(0, 3, (n,), generator=g))
               for n in (6, 6, 4)]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        method = build_method("bcp", model, {**cfg, "compile": compiled}, torch.Generator().manual_seed(0),
                              num_examples=16)
        out = []
        for (x, y), eps in zip(batches, (0.02, 0.07, 0.1)):
            logits = method.forward(x)
            bounds = method.bounds(x, y, logits, eps, None)
            loss, _ = certified_loss(torch.nn.functional.cross_entropy(logits, y), bounds, y, 0.4)
            model.zero_grad()
            loss.backward()
            out.append((bounds.worst_logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]))
            method.after_step()
        runs[compiled] = out
        if not compiled:
            assert not counters["stats"]["unique_graphs"]          # the eager path compiles nothing
    # Compiled for real, in one graph without breaks, once per batch size (6, then 4):
    # the three eps of the ramp did not recompile it.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for (worst_e, loss_e, grads_e), (worst_c, loss_c, grads_c) in zip(runs[False], runs[True]):
        torch.testing.assert_close(worst_c, worst_e, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
