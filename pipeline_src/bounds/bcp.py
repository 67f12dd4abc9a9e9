"""BCP, box constraint propagation (Lee et al. 2020): each layer's outputs are
bounded by a ball B(mu, r) around the clean activation mu and a box [l, u],
each tightening the other.

  linear/conv:  box  <- (W mid + b -/+ |W| rad)  intersect  (W mu + b -/+ r ||W_j||)
                mu   <- W mu + b,   r <- r * sigma_max(W)
  activation f (1-Lipschitz): box <- f(box) intersect f([mu - r, mu + r]),
                mu <- f(mu), r unchanged
  last layer:   z_i - z_y <= (z_i - z_y)(mu) + max { (w_i - w_y) . d :
                                                     ||d|| <= r, l - mu <= d <= u - mu }

The inner maximum (the "translation") is solved in training by the
reference's clip-and-rescale iterations (a feasible point, differentiable);
for certification it is bounded from above by Lagrangian duality, which is
sound whatever the iterations did (`certified_translation`).

Numerics of the certification path: the certifiers
(`pipeline_src/bounds/certifiers.py`) run this module on a float64 copy of the
model with float64 inputs, so every ball, box and translation is float64; the
translation bound is float64 whatever the model, its feasible interval is
widened to contain 0 (sound: a larger set has a larger maximum), and where it
is added to lower-precision logits (`translated_logits` on a float32 model) it
is rounded upwards, never to nearest. The training path is float32 (or the
model's dtype) and approximate by design.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.architectures import CertifiableNet, CleanPass, WeightLayer
from .ibp import flatten_if_needed, interval_activation, interval_linear


@dataclass
class BallBox:
    """Per example: the clean activation, the l2 radius around it, and a box."""
    centre: torch.Tensor   # (B, *shape)
    radius: torch.Tensor   # (B,)
    lower: torch.Tensor    # (B, *shape)
    upper: torch.Tensor


def _per_unit(radius: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return radius.view(-1, *([1] * (like.dim() - 1)))


def row_norms(layer: WeightLayer) -> torch.Tensor:
    """||W_j||_2 per output unit, broadcastable to the output: the flattened filter
    for a conv (at padded borders a unit sees fewer taps, so this is an upper bound)."""
    weight = layer.module.weight
    norms = weight.flatten(1).norm(dim=1)
    return norms.view(1, -1, 1, 1) if isinstance(layer.module, nn.Conv2d) else norms.view(1, -1)


def ball_box_linear(layer: WeightLayer, state: BallBox, sigma: torch.Tensor | float,
                    new_centre: torch.Tensor | None = None) -> BallBox:
    """`new_centre`: the layer's output at the centre, if a clean pass already has it."""
    lower, upper = (flatten_if_needed(layer, t) for t in (state.lower, state.upper))
    box_lo, box_hi = interval_linear(layer, lower, upper)
    if new_centre is None:
        new_centre = layer.module(flatten_if_needed(layer, state.centre))
    spread = _per_unit(state.radius, new_centre) * row_norms(layer)
    return BallBox(new_centre, state.radius * sigma,
                   torch.maximum(box_lo, new_centre - spread), torch.minimum(box_hi, new_centre + spread))


def ball_box_activation(activation: nn.Module, state: BallBox,
                        new_centre: torch.Tensor | None = None) -> BallBox:
    """`new_centre`: the activation at the centre, if a clean pass already has it."""
    box_lo, box_hi = interval_activation(activation, state.lower, state.upper)
    r = _per_unit(state.radius, state.centre)
    ball_lo, ball_hi = interval_activation(activation, state.centre - r, state.centre + r)
    return BallBox(activation(state.centre) if new_centre is None else new_centre.view_as(state.centre),
                   state.radius, torch.maximum(box_lo, ball_lo), torch.minimum(box_hi, ball_hi))


def ball_box_bounds(model: CertifiableNet, x: torch.Tensor, eps: float | torch.Tensor,
                    layer_norms: list[torch.Tensor | float],
                    pre_activation: list | None = None,
                    clean: CleanPass | None = None) -> tuple[BallBox, torch.Tensor]:
    """The ball and box at the input of the logit layer, and the clean logits.

    `layer_norms[l]` bounds sigma_max of layer l: power-iteration estimates in
    training, guaranteed upper bounds for a certificate. If `pre_activation`
    is a list, the box before each hidden activation is appended to it.
    `clean`: the clean pass of this very `x` through this model (the training
    step's forward), whose activations are the ball's centres: passing it saves
    one of the four network passes a BCP step makes (the centre, the box centre
    and radius, and the clean logits), with the same values and gradients."""
    layers = model.weight_layers()
    # eps may be a 0-dim tensor: a compiled step then serves every eps of the ramp.
    radius = (eps.to(x.dtype).expand(x.shape[0]) if torch.is_tensor(eps)
              else torch.full((x.shape[0],), float(eps), device=x.device, dtype=x.dtype))
    state = BallBox(x, radius, x - eps, x + eps)
    for layer, sigma in zip(layers[:-1], layer_norms[:-1]):
        state = ball_box_linear(layer, state, sigma, None if clean is None else clean.pre[layer.index])
        if pre_activation is not None:
            pre_activation.append((state.lower, state.upper))
        state = ball_box_activation(layer.activation, state,
                                    None if clean is None else clean.inputs[layer.index + 1])
    last = layers[-1]
    state = BallBox(flatten_if_needed(last, state.centre), state.radius,
                    flatten_if_needed(last, state.lower), flatten_if_needed(last, state.upper))
    return state, last.module(state.centre) if clean is None else clean.logits


def _pairwise_directions(last: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """c_i = w_i - w_y for every class i: (B, C, h)."""
    weight = last.weight
    return weight.unsqueeze(0) - weight[y].unsqueeze(1)


def translation_problem(model: CertifiableNet, state: BallBox,
                        y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The translation's data at the input of the logit layer, for training and the
    certificate alike: the directions c (B, C, h) (`_pairwise_directions`) and the box
    around the centre, low and high (B, 1, h)."""
    c = _pairwise_directions(model.weight_layers()[-1].module, y)
    return c, (state.lower - state.centre).unsqueeze(1), (state.upper - state.centre).unsqueeze(1)


def translation_clip_rescale(c: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                             radius: torch.Tensor, iterations: int) -> torch.Tensor:
    """max c.d over ||d|| <= r, low <= d <= high (low <= 0 <= high), approximately:
    start at d = r c/||c||; repeatedly clip to the box and rescale the unclipped
    coordinates to keep ||d|| = r. Returns c.d of the final, box-feasible d.
    Shapes: c (B, C, h), low/high (B, 1, h), radius (B,)."""
    tiny = torch.finfo(c.dtype).tiny ** 0.5
    r = radius.view(-1, 1, 1)
    d = r * c / c.norm(dim=-1, keepdim=True).clamp_min(tiny)
    for _ in range(iterations):
        outside = (d < low) | (d > high)
        clipped = torch.where(outside, d.clamp(low, high), torch.zeros_like(d))
        free = torch.where(outside, torch.zeros_like(d), d)
        room = (r.square() - clipped.square().sum(-1, keepdim=True)).clamp_min(0.0).sqrt()
        free = free * room / free.norm(dim=-1, keepdim=True).clamp_min(tiny)
        d = torch.maximum(torch.minimum(clipped + free, high), low)
    return (c * d).sum(-1)


def translation_upper_bound(c: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                            radius: torch.Tensor, bisection_steps: int = 60) -> torch.Tensor:
    """A guaranteed upper bound of max c.d over ||d|| <= r, low <= d <= high, in float64.

    The maximiser is d(lam) = clip(lam c, low, high) with ||d(lam)|| = r; lam is
    found by bisection. Whatever lam is, with nu = 1/lam the Lagrangian dual
        g(nu) = nu r^2 / 2 + sum_j max_{low_j <= d_j <= high_j} (c_j d_j - nu d_j^2 / 2)
    bounds the maximum from above (weak duality), so the result is sound even if
    the bisection is short. It is also capped by the ball-only value r ||c||
    and the box-only value sum_j max(c_j low_j, c_j high_j), both upper bounds.
    The box is first widened to contain 0: low = min(low, 0), high = max(high, 0)."""
    c, low, high = c.double(), low.double(), high.double()
    r = radius.double().view(-1, 1, 1)
    low, high = torch.minimum(low, high), torch.maximum(low, high)
    # The interval must contain 0 (the centre); rounding can leave the centre a hair
    # outside its box. Widening only enlarges the feasible set: still an upper bound.
    low, high = low.clamp_max(0.0), high.clamp_min(0.0)
    box_only = torch.maximum(c * low, c * high).sum(-1, keepdim=True)
    ball_only = r * c.norm(dim=-1, keepdim=True)
    # Bisection on lam: ||clip(lam c)|| grows with lam.
    c_abs_min = c.abs().masked_fill(c == 0, float("inf")).amin(-1, keepdim=True)
    span = torch.maximum(low.abs(), high.abs()).amax(-1, keepdim=True)
    lam_lo = torch.zeros_like(ball_only)
    lam_hi = (span / c_abs_min.clamp_min(1e-300)).clamp_max(1e300) + r / c.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    for _ in range(bisection_steps):
        lam = (lam_lo + lam_hi) / 2
        inside = (lam * c).clamp(low, high).norm(dim=-1, keepdim=True) <= r
        lam_lo, lam_hi = torch.where(inside, lam, lam_lo), torch.where(inside, lam_hi, lam)
    nu = 1.0 / lam_hi.clamp_min(1e-300)
    d = (c / nu).clamp(low, high)
    dual = nu * r.square() / 2 + (c * d - nu * d.square() / 2).sum(-1, keepdim=True)
    bound = torch.minimum(torch.minimum(dual, ball_only), box_only).squeeze(-1)
    # Float64 rounding of sums of h terms: widen by a relative margin far above it.
    return bound + 1e-9 * (bound.abs() + ball_only.squeeze(-1))


def bcp_worst_logits(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float | torch.Tensor,
                     layer_norms: list, translation_iterations: int | None,
                     clean: CleanPass | None = None) -> torch.Tensor:
    """The worst-case logits z_hat: z_hat_i = z_i + t_iy for i != y, z_hat_y = z_y.

    translation_iterations=None computes the sound upper bound (certification);
    an int runs that many clip-and-rescale iterations (training)."""
    state, logits = ball_box_bounds(model, x, eps, layer_norms, clean=clean)
    return translated_logits(model, state, logits, y, translation_iterations)


def certified_translation(model: CertifiableNet, state: BallBox, y: torch.Tensor) -> torch.Tensor:
    """t (B, C), float64: t_i a guaranteed upper bound of the translation max (w_i - w_y) . d
    over the ball and box at the input of the logit layer, for every class i (t_y = 0)."""
    shift = translation_upper_bound(*translation_problem(model, state, y), state.radius)
    wrong = 1.0 - F.one_hot(y, shift.shape[1]).to(shift.dtype)
    return shift * wrong


def round_up(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` cast to `dtype`, rounded towards +inf (a cast rounds to nearest)."""
    cast = value.to(dtype)
    if cast.dtype == value.dtype:
        return cast
    below = cast.to(value.dtype) < value
    return torch.where(below, torch.nextafter(cast, torch.full_like(cast, float("inf"))), cast)


def translated_logits(model: CertifiableNet, state: BallBox, logits: torch.Tensor, y: torch.Tensor,
                      translation_iterations: int | None) -> torch.Tensor:
    """z_hat from the ball and box at the input of the logit layer (see bcp_worst_logits).

    With translation_iterations=None the translation is the float64 upper bound of
    `certified_translation`, rounded upwards to the logits' dtype (the sum z_i + t_i
    is then rounded to nearest in that dtype: the certifiers decide on z and t in
    float64, never on these float32 sums)."""
    wrong = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    if translation_iterations is None:
        shift = round_up(certified_translation(model, state, y), logits.dtype)
        return logits + shift * wrong
    c, low, high = translation_problem(model, state, y)
    # Rounding can put the centre a hair outside its box; the translation needs 0 inside.
    shift = translation_clip_rescale(c, low.clamp_max(0), high.clamp_min(0), state.radius,
                                     translation_iterations)
    return logits + shift * wrong
