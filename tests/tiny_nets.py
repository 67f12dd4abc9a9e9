"""Tiny real `CertifiableNet`s and an l2 PGD for the bound tests
(tests/test_bounds.py, tests/test_local_bounds.py), and the reference oracles
they check the bounds against (`dense_operator`, `certified_radius_lipschitz`).

`INPUT_SHAPE` and `ARCHITECTURES` are patched only while a network is built
(the model keeps its layout afterwards)."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

import torch.nn.functional as F

import pipeline_src.models.architectures as architectures
from pipeline_src.bounds.certifiers import MARGIN_RTOL
from pipeline_src.bounds.ibp import flatten_if_needed
from pipeline_src.models import CertifiableNet, ClippedReLU
from pipeline_src.models.architectures import Conv, Dense, WeightLayer
from pipeline_src.spectral.operator_norm import apply_operator, operator_norm_upper_bound

# name -> (input shape, layers); even widths everywhere for MaxMin.
TINY = {
    "tiny_conv": ((2, 6, 6), [Conv(4, 3, 1, 1), Conv(4, 4, 2, 1), Dense(8), Dense(3)]),
    "tiny_dense": ((1, 3, 3), [Dense(6), Dense(6), Dense(4)]),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The networks are tiny: intra-op threads only add overhead (several times
    the run time on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_net(arch: str, activation: str, seed: int, scale: float = 0.6,
             theta_max: float = 1.5) -> CertifiableNet:
    """A tiny CertifiableNet with seeded weights (He scale times `scale`), small
    random biases and, for clipped ReLU, random thresholds theta in [0, theta_max]."""
    shape, layout = TINY[arch]
    with mock.patch.object(architectures, "INPUT_SHAPE", shape), \
            mock.patch.dict(architectures.ARCHITECTURES, {arch: layout}):
        model = CertifiableNet(arch, activation, theta_init=1.0)
    first = model.weight_layers()[0]
    assert first.input_shape == (shape if not first.flatten_before else (math.prod(shape),))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.weight_layers():
            w = layer.module.weight
            w.copy_(torch.randn(w.shape, generator=g) * math.sqrt(2.0 / w[0].numel()) * scale)
            layer.module.bias.copy_(0.1 * torch.randn(layer.module.bias.shape, generator=g))
            if isinstance(layer.activation, ClippedReLU):
                layer.activation.theta.copy_(theta_max * torch.rand(layer.activation.theta.shape, generator=g))
    return model.eval()


def dense_operator(layer: WeightLayer) -> torch.Tensor:
    """The layer operator as an explicit (out_dim, in_dim) matrix (small layers only)."""
    in_dim = math.prod(layer.input_shape)
    basis = torch.eye(in_dim, dtype=layer.module.weight.dtype).reshape(in_dim, *layer.input_shape)
    with torch.no_grad():
        return apply_operator(layer, basis).reshape(in_dim, -1).t()


def guaranteed_layer_norms(model: CertifiableNet) -> list[float]:
    """Every layer's guaranteed spectral norm (the certifiers' `layer_norms(model).upper`,
    without its power-iteration estimates)."""
    return [operator_norm_upper_bound(layer) for layer in model.weight_layers()]


def certified_radius_lipschitz(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """The radius below which the Lipschitz margin certifies under the relative-margin
    rule (0 for a wrong prediction), float64: min over i != y of
    (z_y - z_i - MARGIN_RTOL (|z_y| + |z_i|)) / (sqrt(2) L (1 + MARGIN_RTOL)).
    `lipschitz_certified` at eps is radius > eps (both sides of that equivalence are
    rounded in float64, so they can differ only for eps within rounding of the radius)."""
    z = logits.double()
    true = z.gather(1, y[:, None])
    room = true - z - MARGIN_RTOL * (true.abs() + z.abs())
    radius = room / (math.sqrt(2.0) * float(lipschitz) * (1 + MARGIN_RTOL))
    radius = radius.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("inf")).amin(1)
    return radius.clamp_min(0.0)


def trace(model: CertifiableNet, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(pre-activation, post-activation) per weight layer; post is None for the logits."""
    out, h = [], x
    for layer in model.weight_layers():
        pre = layer.module(flatten_if_needed(layer, h))
        post = None if layer.activation is None else layer.activation(pre)
        out.append((pre, post))
        h = post
    return out


def _per_example(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *[1] * (like.dim() - 1))


def pgd(x: torch.Tensor, eps: float, objective, steps: int, generator: torch.Generator,
        start_radius: float = 0.5) -> torch.Tensor:
    """Projected (normalised) gradient ascent of objective(x') -> (N,) in the l2 ball
    B(x, eps), from a random start inside it."""
    delta = torch.randn(x.shape, generator=generator)
    delta = delta / _per_example(delta.flatten(1).norm(dim=1), x) * eps * start_radius
    step = 2.5 * eps / max(steps, 1)
    for _ in range(steps):
        delta.requires_grad_(True)
        grad, = torch.autograd.grad(objective(x + delta).sum(), delta)
        with torch.no_grad():
            delta = delta + step * grad / _per_example(grad.flatten(1).norm(dim=1).clamp_min(1e-12), x)
            delta = delta * _per_example((eps / delta.flatten(1).norm(dim=1)).clamp(max=1.0), x)
    return (x + delta).detach()


def margin_attack(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                  steps: int = 50, restarts: int = 5, seed: int = 0) -> torch.Tensor:
    """The largest max_{i != y} z_i - z_y over random-restart l2 PGD runs (> 0: flipped)."""
    g = torch.Generator().manual_seed(seed)

    def margin(z_in: torch.Tensor) -> torch.Tensor:
        z = model(z_in)
        return z.scatter(1, y[:, None], float("-inf")).amax(1) - z.gather(1, y[:, None]).squeeze(1)

    best = torch.full((x.shape[0],), float("-inf"))
    for restart in range(restarts):
        adv = pgd(x, eps, margin, steps, g, start_radius=0.0 if restart == 0 else 1.0)
        assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
        with torch.no_grad():
            best = torch.maximum(best, margin(adv))
    return best


def certification_case(activation: str, theta_max: float = 1.5):
    """A small-weight tiny conv net, 32 points (four deliberately mislabelled), its
    clean logits and its guaranteed layer norms: (model, x, y, logits, norms)."""
    from pipeline_src.bounds.numerics import layer_norms, sound_numerics

    model = tiny_net("tiny_conv", activation, seed=0, scale=0.5, theta_max=theta_max)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, *TINY["tiny_conv"][0], generator=g)
    with sound_numerics(model):
        logits = model(x)
        norms = layer_norms(model, power_iterations=50)
    y = logits.argmax(1).clone()
    y[:4] = (y[:4] + 1) % logits.shape[1]
    return model, x, y, logits, norms


def ball_samples(x: torch.Tensor, eps: float, per_point: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_point` points of each l2 ball B(x_b, eps) in uniform directions, half on
    the sphere and half at a uniform radius <= eps; returns (points, index b of each)."""
    batch, shape = x.shape[0], x.shape[1:]
    ones = [1] * len(shape)
    base = torch.arange(batch).repeat_interleave(per_point)
    direction = torch.randn(batch * per_point, *shape, generator=generator, dtype=torch.float64)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, *ones)
    radius = torch.rand(batch * per_point, generator=generator, dtype=torch.float64) * eps
    radius[::2] = eps
    return (x[base].double() + radius.view(-1, *ones) * direction).float(), base
