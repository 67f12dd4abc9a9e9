"""The numerics of certification (pipeline_src/bounds/certifiers.py and the
certification path of pipeline_src/bounds): certificates sound to the last bit.

  1. the relative-margin rule (MARGIN_RTOL) by hand, for every certifier's form;
  2. boundary cases that a round-to-nearest float32 certifier (the code before
     float64 certification, reimplemented here) accepts and ours refuses: the
     Lipschitz margin against exact rational arithmetic, BCP and the local
     bound against a float64 bisection of their margins;
  3. no needless loss: on a float32 model, the certifiers equal the float64
     model's, and the old float32 certifier's decisions away from the boundary;
  4. soundness in float64 (hypothesis): no point of the ball, sampled or found
     by PGD on the float64 model, beats a certified margin, without tolerance;
  5. outward rounding of the translation bound where it meets float32 logits;
  6. the certify stage (float64 certificates, the numerics string, LocalBCP's
     reference-style estimate beside, never inside, the certificates) and the
     attack stage (fp32 numerics: TF32 off, eval mode).
"""
from __future__ import annotations

import json
import math
from fractions import Fraction
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline_src.models.architectures as architectures
from pipeline_src.bounds.bcp import (_pairwise_directions, ball_box_bounds, bcp_worst_logits,
                                     certified_translation, round_up, translation_upper_bound)
from pipeline_src.bounds.local import local_certified_state, local_estimated_state, local_worst_logits
from pipeline_src.certify import attack as attack_stage
from pipeline_src.bounds import certifiers
from pipeline_src.certify import stage as certify_stage
from pipeline_src.bounds.certifiers import MARGIN_RTOL, certified_at, certify_batch, margin_certified
from pipeline_src.bounds.numerics import float64_model, fp32_numerics, layer_norms, sound_numerics
from tiny_nets import (TINY, certified_radius_lipschitz, dense_operator, margin_attack,  # noqa: F401
                       single_thread, tiny_net)
from conftest import save_cut_cache


# ------------------------------------------------------------------ helpers
def old_float32_lipschitz(logits: torch.Tensor, y: torch.Tensor, lipschitz: float, eps: float) -> torch.Tensor:
    """The Lipschitz certifier before float64 certification: float32 logits, a float32
    radius compared strictly with eps."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return ((true - others) / (math.sqrt(2.0) * lipschitz)).clamp_min(0.0) > eps


def old_float32_worst(name: str, model, x: torch.Tensor, y: torch.Tensor, eps: float, upper: list[float]):
    """BCP's / the local bound's worst-case logits before float64 certification: the
    propagation in the model's float32, the float64 translation bound cast to float32
    by rounding to nearest, added to the float32 logits."""
    if name == "bcp":
        state, logits = ball_box_bounds(model, x, eps, upper)
    else:
        state, logits = local_certified_state(model, x, eps, upper)
    c = _pairwise_directions(model.weight_layers()[-1].module, y)
    low, high = (state.lower - state.centre).unsqueeze(1), (state.upper - state.centre).unsqueeze(1)
    shift = translation_upper_bound(c, low, high, state.radius).to(logits.dtype)
    return logits + shift * (1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype))


def old_float32_certified(name: str, model, x, y, eps: float, norms) -> torch.Tensor:
    logits = model(x)
    if name == "lipschitz":
        return old_float32_lipschitz(logits, y, norms.lipschitz_upper, eps) & (logits.argmax(1) == y)
    worst = old_float32_worst(name, model, x, y, eps, norms.upper)
    true = worst.gather(1, y[:, None]).squeeze(1)
    return (true > worst.scatter(1, y[:, None], float("-inf")).amax(1)) & (logits.argmax(1) == y)


def float64_margin_and_scale(name: str, model64, x64: torch.Tensor, y: torch.Tensor, eps: float, norms
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """min over i != y of z_y - z_i - t_i (no relative rule), and the rule's scale
    max_i (|z_y| + |z_i| + |t_i|), both float64 per example."""
    if name == "lipschitz":
        z = model64(x64)
        t = torch.full_like(z, math.sqrt(2.0) * norms.lipschitz_upper * eps)
    else:
        state, z = (ball_box_bounds(model64, x64, eps, norms.upper) if name == "bcp"
                    else local_certified_state(model64, x64, eps, norms.upper))
        t = certified_translation(model64, state, y)
    true = z.gather(1, y[:, None])
    label = F.one_hot(y, z.shape[1]).bool()
    margin = (true - z - t).masked_fill(label, float("inf")).amin(1)
    scale = (true.abs() + z.abs() + t.abs()).masked_fill(label, 0.0).amax(1)
    return margin, scale


def margin_zero(name: str, model64, x: torch.Tensor, y: torch.Tensor, norms, top: float = 4.0,
                steps: int = 60) -> tuple[float | None, float | None]:
    """(lo, hi) with the float64 bare margin of one point > 0 at lo and <= 0 at hi, hi - lo
    at most top / 2^steps, by bisection (the margin falls as eps grows: balls and boxes
    grow, and so do the local masks); (None, None) if it is not > 0 at 0 or not <= 0 at `top`
    (a point whose every unit saturates keeps a bounded margin)."""
    def margin(eps):
        return float(float64_margin_and_scale(name, model64, x.double(), y, eps, norms)[0])

    if margin(1e-12) <= 0 or margin(top) > 0:
        return None, None
    lo, hi = 0.0, top
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if margin(mid) > 0 else (lo, mid)
    return lo, hi


def exact_dense_relu_logits(model, x_row: torch.Tensor) -> list[Fraction]:
    """The logits of a dense ReLU tiny net at one float32 input in exact rational arithmetic."""
    h = [Fraction(float(v)) for v in x_row.flatten().tolist()]
    for layer in model.weight_layers():
        weight = layer.module.weight.detach().double().tolist()
        bias = layer.module.bias.detach().double().tolist()
        h = [sum((Fraction(w) * v for w, v in zip(row, h)), Fraction(b)) for row, b in zip(weight, bias)]
        if layer.activation is not None:
            assert isinstance(layer.activation, torch.nn.ReLU)
            h = [max(v, Fraction(0)) for v in h]
    return h


def exact_lipschitz_certifies(z: list[Fraction], y: int, lipschitz: float, eps: float) -> bool:
    """z_y - z_i > sqrt(2) L eps for every i != y, decided exactly (squares, signs)."""
    bound_sq = 2 * Fraction(lipschitz) ** 2 * Fraction(eps) ** 2
    return all(z[y] - z[i] > 0 and (z[y] - z[i]) ** 2 > bound_sq for i in range(len(z)) if i != y)


def net_and_points(arch: str, activation: str, seed: int, batch: int, scale: float = 0.6,
                   theta_max: float = 1.5):
    """A tiny net, points labelled by its float64 prediction, its guaranteed norms."""
    model = tiny_net(arch, activation, seed, scale=scale, theta_max=theta_max)
    x = torch.rand(batch, *TINY[arch][0], generator=torch.Generator().manual_seed(seed + 100))
    with sound_numerics(model):
        norms = layer_norms(model, power_iterations=30)
        y = float64_model(model)(x.double()).argmax(1)
    return model, x, y, norms


# ------------------------------------------------------------------ 1. the rule by hand
def test_margin_rule_by_hand():
    assert MARGIN_RTOL == 1e-6
    y = torch.tensor([0])
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # Margin 1 - t against 1e-6 (|1| + |0| + |t|).
    for t, expected in ((1 - 0.5e-6, False), (1 - 1.5e-6, False), (1 - 2.5e-6, True), (0.5, True)):
        shift = torch.tensor([[0.0, t]], dtype=torch.float64)
        assert bool(margin_certified(z, shift, y)) == expected, t
        assert bool(margin_certified(z, t, y)) == expected, t
    # Every wrong class counts, not only the runner-up: class 2's margin is the larger,
    # but its |z_i| makes its tolerance larger too.
    z3 = torch.tensor([[1e6, 1e6 - 3.0, -1e6 + 1.0]], dtype=torch.float64)
    assert bool(margin_certified(z3, torch.tensor([[0.0, 0.0, 2e6 - 2.5]], dtype=torch.float64), y)) is False
    assert bool(margin_certified(z3, torch.tensor([[0.0, 0.0, 2e6 - 5.0]], dtype=torch.float64), y)) is True
    # All zero: 0 > 0 is false. The label's own entry of t is ignored.
    assert not margin_certified(torch.zeros(1, 3, dtype=torch.float64), 0.0, y).any()
    assert bool(margin_certified(z, torch.tensor([[1e9, 0.5]], dtype=torch.float64), y))
    # The Lipschitz form: t = sqrt(2) L eps; L = 1 / sqrt(2) makes t = eps.
    lip = 1 / math.sqrt(2.0)
    assert bool(certifiers.lipschitz_certified(z, y, lip, 1 - 2.5e-6))
    assert not bool(certifiers.lipschitz_certified(z, y, lip, 1 - 1.5e-6))
    # ... and its radius: (1 - 1e-6 (1 + 0)) / (sqrt 2 L (1 + 1e-6)), certified strictly below it.
    radius = float(certified_radius_lipschitz(z, y, lip))
    assert radius == pytest.approx((1 - 1e-6) / (1 + 1e-6), rel=1e-14)
    assert bool(certifiers.lipschitz_certified(z, y, lip, radius * (1 - 1e-12)))
    assert not bool(certifiers.lipschitz_certified(z, y, lip, radius * (1 + 1e-12)))


def test_certifiers_refuse_a_margin_within_the_rule():
    """The rule reaches every certifier: scale eps up to a hair below the float64 margin's
    zero, where the bare margin is still positive, and all three refuse."""
    model, x, y, norms = net_and_points("tiny_conv", "clipped_relu", 7, 8, scale=0.5, theta_max=0.3)
    model64 = float64_model(model)
    with sound_numerics(model):
        logits = model(x)
        for name in ("lipschitz", "bcp", "local"):
            refused = 0
            for j in range(len(y)):
                xj, yj = x[j:j + 1], y[j:j + 1]
                lo, hi = margin_zero(name, model64, xj, yj, norms)
                if lo is None:
                    continue
                margin, scale = float64_margin_and_scale(name, model64, xj.double(), yj, lo, norms)
                assert 0 < margin <= MARGIN_RTOL * scale, (name, j, margin, scale)
                assert not certified_at(name, model, xj, yj, logits[j:j + 1], lo, norms)
                # Well inside: certified.
                assert certified_at(name, model, xj, yj, logits[j:j + 1], lo * 0.5, norms)
                refused += 1
            assert refused >= 4, (name, refused)


# ------------------------------------------------------------------ 2. float32 accepts, we refuse
def test_lipschitz_float32_certifier_accepts_a_point_exact_arithmetic_refuses():
    """At eps a hair above a point's float64 certified radius the exact (rational)
    Lipschitz margin does not certify; the old float32 computation says it does for
    some points, deterministically found here; ours refuses them all."""
    found = []
    for seed in range(6):
        model, x, y, norms = net_and_points("tiny_dense", "relu", seed, 24, scale=1.0)
        lip = norms.lipschitz_upper
        with sound_numerics(model):
            logits32 = model(x)
            z64 = float64_model(model)(x.double())
        bare = (z64.gather(1, y[:, None]) - z64).masked_fill(F.one_hot(y, 4).bool(), float("inf")).amin(1)
        for j in range(len(y)):
            if not (logits32[j].argmax() == y[j] and bare[j] > 1e-3):
                continue
            exact_z = exact_dense_relu_logits(model, x[j])
            r_star = float(bare[j]) / (math.sqrt(2.0) * lip)
            for k in range(1, 8):
                eps = r_star * (1 + k * 2e-8)
                if exact_lipschitz_certifies(exact_z, int(y[j]), lip, eps):
                    continue                       # only cases exact arithmetic refuses
                if bool(old_float32_lipschitz(logits32[j:j + 1], y[j:j + 1], lip, eps)):
                    found.append((seed, j, eps))
                    with sound_numerics(model):
                        ours = certify_batch(model, x[j:j + 1], y[j:j + 1], eps, norms, ["lipschitz"])
                        inside = certify_batch(model, x[j:j + 1], y[j:j + 1], r_star * 0.999, norms,
                                               ["lipschitz"])
                    assert not ours["lipschitz"].any(), (seed, j, eps)
                    assert inside["lipschitz"].all(), (seed, j)       # not refusing everything
                    assert exact_lipschitz_certifies(exact_z, int(y[j]), lip, r_star * 0.999)
    assert len(found) >= 3, f"the search found only {found}"


@pytest.mark.parametrize("name, activation", [("bcp", "relu"), ("local", "clipped_relu")])
def test_bcp_and_local_float32_certifier_accepts_a_point_float64_refuses(name, activation):
    """The float64 margin z_y - z_i - t_i is monotone in eps; its zero is found by
    bisection and eps set 1e-8 (relative) above it, where the float64 margin is
    negative by far more than float64 round-off. The old float32 computation
    certifies some of these points; ours refuses every one."""
    found = 0
    for seed in range(4):
        model, x, y, norms = net_and_points("tiny_conv", activation, seed, 12, scale=0.5, theta_max=0.3)
        model64 = float64_model(model)
        with sound_numerics(model):
            logits32 = model(x)
            for j in range(len(y)):
                if logits32[j].argmax() != y[j]:
                    continue
                xj, yj = x[j:j + 1], y[j:j + 1]
                lo, hi = margin_zero(name, model64, xj, yj, norms)
                if lo is None:
                    continue
                eps = hi * (1 + 1e-8)
                margin, scale = float64_margin_and_scale(name, model64, xj.double(), yj, eps, norms)
                assert margin < -1e-13 * scale, (margin, scale)           # refused in float64, clearly
                if bool(old_float32_certified(name, model, xj, yj, eps, norms)):
                    found += 1
                    assert not certify_batch(model, xj, yj, eps, norms, [name])[name].any(), (seed, j)
                    assert certify_batch(model, xj, yj, lo * 0.99, norms, [name])[name].all(), (seed, j)
    assert found >= 3, f"only {found} float32-accepted, float64-refused points found"


# ------------------------------------------------------------------ 3. no needless loss
@pytest.mark.parametrize("arch, activation", [("tiny_conv", "clipped_relu"), ("tiny_dense", "relu"),
                                              ("tiny_conv", "maxmin")])
def test_float32_model_certifies_as_the_float64_path_and_as_float32_far_from_the_boundary(arch, activation):
    model, x, y, norms = net_and_points(arch, activation, 11, 48, scale=0.5, theta_max=0.3)
    model64 = float64_model(model)
    assert model64 is not model and next(model.parameters()).dtype == torch.float32
    assert float64_model(model64) is model64
    names = ["lipschitz", "bcp"] + (["local"] if activation != "maxmin" else [])
    with sound_numerics(model):
        y[:3] = (y[:3] + 1) % 3            # a few wrong labels: never certified
        for eps in (0.005, 0.02, 0.08):
            ours = certify_batch(model, x, y, eps, norms, names)
            ours64 = certify_batch(model64, x.double(), y, eps, norms, names)
            old = {name: old_float32_certified(name, model, x, y, eps, norms) for name in names}
            for name in names:
                assert torch.equal(ours[name], ours64[name]), (name, eps)
                assert not ours[name][:3].any()
                margin, scale = float64_margin_and_scale(name, model64, x.double(), y, eps, norms)
                far = margin.abs() > 1e-4 * scale
                assert torch.equal(ours[name][far], old[name][far]), (name, eps)
                # Where the float64 margin is clear of the rule, it decides alone.
                clear = margin.abs() > 2 * MARGIN_RTOL * scale
                assert torch.equal(ours[name][clear], (margin > 0)[clear] & (model(x).argmax(1) == y)[clear])
            # The comparison is not vacuous: far from the boundary both outcomes occur.
            margin, scale = float64_margin_and_scale("bcp", model64, x.double(), y, eps, norms)
            if eps == 0.02:
                assert ours["bcp"].any() and (~ours["bcp"]).any(), ours["bcp"]
    # The model was left as it was (eval, float32), and the copy holds no gradients.
    assert next(model.parameters()).dtype == torch.float32
    assert all(not p.requires_grad for p in model64.parameters())


# ------------------------------------------------------------------ 4. soundness in float64
def float64_ball_points(x64: torch.Tensor, eps: float, per_point: int, generator: torch.Generator):
    """Points of each ball B(x_b, eps) in float64: half on the sphere (shrunk by one part
    in 1e12 against rounding), half inside; and the index b of each."""
    batch, shape = x64.shape[0], x64.shape[1:]
    ones = [1] * len(shape)
    base = torch.arange(batch).repeat_interleave(per_point)
    direction = torch.randn(batch * per_point, *shape, generator=generator, dtype=torch.float64)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, *ones)
    radius = torch.rand(batch * per_point, generator=generator, dtype=torch.float64) * eps
    radius[::2] = eps * (1 - 1e-12)
    return x64[base] + radius.view(-1, *ones) * direction, base


@pytest.mark.parametrize("activation", ["relu", "clipped_relu", "maxmin"])
@settings(max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=st.sampled_from(sorted(TINY)), seed=st.integers(0, 2**31 - 1), scale=st.floats(0.3, 1.0),
       radius_factor=st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_no_float64_point_of_the_ball_beats_a_certificate(activation, arch, seed, scale, radius_factor):
    """eps is set near the largest radius at which BCP certifies some point, so the
    certificates are tight; every certified point's margin, at sampled and attacked
    points of the ball on the float64 model, stays > 0 with no tolerance, and every
    point's margins stay within the float64 bound (z_y - z_i - t_i) to 1e-9 relative."""
    model, x, y, norms = net_and_points(arch, activation, seed % 10_000, 6, scale=scale, theta_max=0.5)
    model64 = float64_model(model)
    names = ["lipschitz", "bcp"] + (["local"] if activation != "maxmin" else [])
    x64 = x.double()
    with sound_numerics(model):
        # The largest radius at which BCP certifies a point, by bisection on its float64 margin.
        lo, hi = 0.0, 4.0
        for _ in range(40):
            mid = (lo + hi) / 2
            margin, _ = float64_margin_and_scale("bcp", model64, x64, y, mid, norms)
            lo, hi = (mid, hi) if (margin > 0).any() else (lo, mid)
        eps = max(lo * radius_factor, 1e-6)
        out = certify_batch(model, x, y, eps, norms, names)
    if radius_factor <= 0.99:
        assert out["bcp"].any(), "vacuous: BCP certifies nothing below its largest radius"
    g = torch.Generator().manual_seed(seed)
    points, base = float64_ball_points(x64, eps, 24, g)
    with torch.no_grad():
        z = model64(points)
    yb = y[base]
    true = z.gather(1, yb[:, None])
    sampled_margin = (true - z).masked_fill(F.one_hot(yb, z.shape[1]).bool(), float("inf")).amin(1)
    for name in names:
        certified = out[name]
        if name != "lipschitz":
            with torch.no_grad():
                state, z0 = (ball_box_bounds(model64, x64, eps, norms.upper) if name == "bcp"
                             else local_certified_state(model64, x64, eps, norms.upper))
                t = certified_translation(model64, state, y)
            bound = (z0.gather(1, y[:, None]) - z0 - t)[base]               # lower bounds of z_y - z_i
            tol = 1e-9 * (z0.abs().amax(1) + t.abs().amax(1))[base]
            assert ((true - z) >= bound - tol[:, None]).all(), f"{name}: a sampled point beats the bound"
        assert (sampled_margin[certified[base]] > 0).all(), f"{name}: a certified point flipped"
        if certified.any():
            attacked = margin_attack(model64, x64[certified], y[certified], eps, steps=30, restarts=2,
                                     seed=seed % 1000)
            assert attacked.dtype == torch.float64
            assert (attacked < 0).all(), f"{name}: PGD in float64 flipped a certified point: {attacked}"


# ------------------------------------------------------------------ 5. outward rounding
def test_round_up_is_the_least_float32_not_below():
    g = torch.Generator().manual_seed(0)
    value = torch.cat([torch.randn(2000, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -8, 8, (2000,), generator=g, dtype=torch.float64), torch.tensor([0.0, 1.0, -1.0, 0.1], dtype=torch.float64)])
    up = round_up(value, torch.float32)
    assert up.dtype == torch.float32
    assert (up.double() >= value).all()
    below = torch.nextafter(up, torch.full_like(up, float("-inf")))
    assert (below.double() < value).all()          # the least such float32
    nearest = value.to(torch.float32)
    assert (nearest.double() < value).any()        # rounding to nearest would have gone down
    assert torch.equal(round_up(value, torch.float64), value)


def test_translated_logits_round_the_bound_upwards_on_a_float32_model():
    model, x, y, norms = net_and_points("tiny_conv", "relu", 3, 16)
    with torch.no_grad():
        worst = bcp_worst_logits(model, x, y, 0.05, norms.upper, translation_iterations=None)
        state, logits = ball_box_bounds(model, x, 0.05, norms.upper)
        t = certified_translation(model, state, y)
        worst_local, _ = local_worst_logits(model, x, y, 0.05, norms.upper, power=None, index=None,
                                            power_iterations=0, translation_iterations=None)
    assert worst.dtype == torch.float32 and t.dtype == torch.float64
    shift = round_up(t, torch.float32)
    assert (shift.double() >= t).all() and (t > 0).any()
    torch.testing.assert_close(worst, logits + shift, rtol=0, atol=0)
    assert worst_local.dtype == torch.float32


def test_translation_bound_is_float64_and_zero_for_the_label():
    model, x, y, norms = net_and_points("tiny_dense", "maxmin", 2, 8)
    model64 = float64_model(model)
    state, _ = ball_box_bounds(model64, x.double(), 0.1, norms.upper)
    assert state.radius.dtype == torch.float64 and state.lower.dtype == torch.float64
    t = certified_translation(model64, state, y)
    assert t.dtype == torch.float64 and (t.gather(1, y[:, None]) == 0).all() and (t >= 0).all()


def test_fp32_numerics_keeps_gradients_and_restores():
    model = tiny_net("tiny_dense", "relu", 0).train()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with fp32_numerics(model):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert not model.training and torch.is_grad_enabled()      # an attack needs gradients
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and model.training
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------ 6. the stages
TINY_STAGE_ARCH = {"tiny_conv": TINY["tiny_conv"][1]}


def write_tiny_run(tmp_path, activation: str, eps: float):
    """Smoke params on a tiny conv net (patched architecture) and random test images
    labelled by the net; returns (params, layout, model)."""
    from pipeline_src.config import load_params
    from pipeline_src.paths import RunLayout

    params = load_params("smoke")
    params["certify"] = {**params["certify"], "eps": eps, "test_images": 40, "batch_size": 16,
                         "radius_points": 3, "power_iterations": 20, "reference_power_iterations": 30}
    params["pgd"] = {**params["pgd"], "steps": 5, "restarts": 1, "apgd": False, "batch_size": 16}
    layout = RunLayout.of(params)
    model = tiny_net("tiny_conv", activation, 5, scale=0.5, theta_max=0.5)
    g = torch.Generator().manual_seed(9)
    images = torch.randint(0, 256, (40, *TINY["tiny_conv"][0]), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        labels = model(images.float() / 255.0).argmax(1)
    labels[:4] = (labels[:4] + 1) % 3
    empty = torch.zeros(0, *TINY["tiny_conv"][0], dtype=torch.uint8)
    provenance = {"source": "test", "sha256": "0" * 64, "lossy_jpeg": False, "note": "random"}
    cache = tmp_path / layout.data_cache
    save_cut_cache({"train_x": empty, "train_y": torch.zeros(0, dtype=torch.long), "val_x": empty,
                    "val_y": torch.zeros(0, dtype=torch.long), "test_x": images, "test_y": labels,
                    "classes": ("a", "b", "c"), "provenance": provenance}, cache, params["data"])
    method = "localbcp" if activation == "clipped_relu" else "bcp"
    trained = tmp_path / layout.train(method, "model.pt")
    trained.parent.mkdir(parents=True)
    torch.save({"model": {"arch": "tiny_conv", "activation": activation, "clipped_relu_theta": 1.0,
                          "init": "kaiming"}, "state_dict": model.state_dict()}, trained)
    return params, layout, model, method


def patched_tiny_arch():
    return (mock.patch.object(architectures, "INPUT_SHAPE", TINY["tiny_conv"][0]),
            mock.patch.dict(architectures.ARCHITECTURES, TINY_STAGE_ARCH))


@pytest.mark.parametrize("activation", ["clipped_relu", "relu"])
def test_certify_stage_float64_and_reference_estimate(tmp_path, activation, monkeypatch):
    params, layout, model, method = write_tiny_run(tmp_path, activation, eps=0.02)
    shape_patch, arch_patch = patched_tiny_arch()
    seen_dtypes = []
    real_certified_at = certifiers.certified_at

    def spy(name, model_, *args, **kwargs):
        seen_dtypes.append(next(model_.parameters()).dtype)
        return real_certified_at(name, model_, *args, **kwargs)

    monkeypatch.setattr(certifiers, "certified_at", spy)
    with shape_patch, arch_patch:
        metrics = certify_stage.certify_model(params, method, tmp_path)
    assert seen_dtypes and set(seen_dtypes) == {torch.float64}
    saved = json.loads((tmp_path / layout.certify(method, "metrics.json")).read_text())
    assert saved["numerics"] == metrics["numerics"] == certify_stage.NUMERICS
    assert "float64" in saved["numerics"] and "1e-06" in saved["numerics"]
    certified = torch.load(tmp_path / layout.certify(method, "certified.pt"), weights_only=False)
    expected = ["lipschitz", "gloro", "bcp"] + (["local"] if activation == "clipped_relu" else [])
    assert sorted(certified["certified"]) == sorted(expected)              # no estimate inside
    # The certificates equal certify_batch's on the same images.
    x = torch.load(tmp_path / layout.data_cache, weights_only=False)["test_x"].float() / 255.0
    y = torch.load(tmp_path / layout.data_cache, weights_only=False)["test_y"]
    with sound_numerics(model):
        norms = layer_norms(model, 20, params["run"]["seed"])
        direct = certify_batch(model, x, y, 0.02, norms, expected)
    for name in expected:
        assert torch.equal(certified["certified"][name], direct[name]), name
    assert certified["certified"]["bcp"].any(), "vacuous: nothing certified"
    if activation == "clipped_relu":
        ref = saved["reference_estimates"]
        assert set(ref) == {"local_masked_power_iteration", "note", "power_iterations", "tolerance"}
        assert ref["note"] == "reference estimate, not guaranteed: masked conv norms by power iteration"
        assert ref["power_iterations"] == 30 and ref["tolerance"] == 1e-3    # certify.reference_power_iterations
        # Estimates are below the guaranteed norms: never fewer points than the certificate
        # (on this net, away from rounding at the boundary).
        assert saved["certified_accuracy"]["local"] <= ref["local_masked_power_iteration"] <= \
            saved["clean_accuracy"]
    else:
        assert "reference_estimates" not in saved


def test_reference_iterations():
    from pipeline_src.bounds.local import REFERENCE_POWER_ITERATIONS
    from pipeline_src.config import load_params

    assert REFERENCE_POWER_ITERATIONS == 2000                   # the reference's --test_sniter
    assert load_params("paper")["certify"]["reference_power_iterations"] == REFERENCE_POWER_ITERATIONS
    assert certify_stage.reference_iterations({"power_iterations": 50, "reference_power_iterations": 7}) == 7


def test_reference_estimate_uses_masked_conv_power_iteration():
    """The estimate's radius is eps times the product of per-example masked power-iteration
    norms (convolutions included): below the certificate's radius, near the exact masked
    norms (dense operators of the tiny net), and a lower bound of them."""
    from pipeline_src.bounds.local import varying_unit_masks

    model, x, y, norms = net_and_points("tiny_conv", "clipped_relu", 4, 6, scale=0.5, theta_max=0.5)
    model64 = float64_model(model)
    eps = 0.02
    with torch.no_grad():
        certified_state, _ = local_certified_state(model64, x.double(), eps, norms.upper)
        estimated, _ = local_estimated_state(model64, x.double(), eps, norms.upper, torch.Generator().manual_seed(0))
        boxes: list = []
        ball_box_bounds(model64, x.double(), eps, norms.upper, pre_activation=boxes)
        masks = varying_unit_masks(model64, boxes)
    assert (estimated.radius <= certified_state.radius * (1 + 1e-6)).all()
    assert (estimated.radius < certified_state.radius * 0.999).any()     # the convs' masked norms count
    for b in range(x.shape[0]):
        product = eps
        for layer in model64.weight_layers()[:-1]:
            m = masks[layer.index][b].flatten()[:, None] * dense_operator(layer)
            if layer.index > 0:
                m = m * masks[layer.index - 1][b].flatten()[None, :]
            product *= torch.linalg.matrix_norm(m, ord=2).item()
        expected = min(product, float(certified_state.radius[b]))
        assert float(estimated.radius[b]) <= expected * (1 + 1e-5)
        assert float(estimated.radius[b]) == pytest.approx(expected, rel=1e-2)


def test_attack_stage_runs_with_fp32_numerics(tmp_path, monkeypatch):
    params, layout, model, method = write_tiny_run(tmp_path, "relu", eps=0.02)
    shape_patch, arch_patch = patched_tiny_arch()
    with shape_patch, arch_patch:
        certify_stage.certify_model(params, method, tmp_path)
    seen = []

    class Recorder:
        def __init__(self, model_):
            self.model = model_

        def __call__(self, x, y):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                         self.model.training, x.dtype, next(self.model.parameters()).dtype))
            return x.clone()

    monkeypatch.setattr(attack_stage, "_attacks",
                        lambda model_, cfg, eps, seed: [("recorder", Recorder(model_), seed)])
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with shape_patch, arch_patch:
            metrics = attack_stage.attack_model(params, method, tmp_path)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32   # restored
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen and all(s == (False, False, False, torch.float32, torch.float32) for s in seen), seen
    assert metrics["certified_points_broken"] == 0 and metrics["certified_points"] > 0


def test_attacks_run_on_the_correct_points_and_a_forged_certificate_still_stops(tmp_path, monkeypatch):
    """The attacks see exactly the correctly classified test points (every certified point
    among them); each later attack only the points the earlier ones left robust; a
    certificate on a misclassified point (a forged one) still stops the stage."""
    from pipeline_src.data.subsets import evaluated_test_split
    from pipeline_src.data.cifar import load_cache

    params, layout, model, method = write_tiny_run(tmp_path, "relu", eps=0.02)
    shape_patch, arch_patch = patched_tiny_arch()
    with shape_patch, arch_patch:
        certify_stage.certify_model(params, method, tmp_path)
    seen = []

    def first(x, y):
        seen.append(("first", x.clone()))
        return x.clone()

    def second(x, y):
        seen.append(("second", x.clone()))
        return x.clone()

    monkeypatch.setattr(attack_stage, "_attacks", lambda model_, cfg, eps, seed: [("a", first, seed),
                                                                                  ("b", second, seed)])
    with shape_patch, arch_patch:
        metrics = attack_stage.attack_model(params, method, tmp_path)
    test_x, test_y = evaluated_test_split(load_cache(tmp_path / layout.data_cache), params["certify"])
    x = test_x.float() / 255.0
    with torch.no_grad():
        correct = model.eval()(x).argmax(1) == test_y
    assert 0 < int(correct.sum()) < len(test_y), "the check needs both kinds of points"
    attacked = torch.cat([batch for name, batch in seen if name == "first"])
    assert torch.equal(attacked, x[correct])
    assert torch.equal(torch.cat([batch for name, batch in seen if name == "second"]), x[correct])
    assert metrics["pgd_accuracy"] == pytest.approx(100.0 * correct.float().mean().item())

    certificates_path = tmp_path / layout.certify(method, "certified.pt")
    certificates = torch.load(certificates_path, weights_only=False)
    wrong = int(torch.nonzero(~correct).flatten()[0])
    name = next(iter(certificates["certified"]))
    certificates["certified"][name][wrong] = True
    torch.save(certificates, certificates_path)
    with pytest.raises(attack_stage.UnsoundCertificateError, match=f"indices \\[{wrong}"), shape_patch, arch_patch:
        attack_stage.attack_model(params, method, tmp_path)
