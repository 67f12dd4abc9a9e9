"""Sound certification of a trained model: which test points provably keep
their (correct) prediction for every l2 perturbation of norm <= eps.

What is certified is the network with the trained (float32) weights, in exact
arithmetic. Soundness rules, enforced here:

  * numerics (`bounds.numerics`): every certifier runs on a float64 copy of
    the model (`float64_model`) with float64 inputs, TF32 off, eval mode, no
    gradients (`sound_numerics`); balls, boxes, radii and the BCP translation
    are float64 end to end, and the spectral norms are float64 python floats;
  * every spectral norm is a guaranteed upper bound of the layer's operator
    norm (`spectral.operator_norm.operator_norm_upper_bound`), never a
    power-iteration estimate; the BCP translation is bounded from above by
    duality (`bounds.bcp.certified_translation`);
  * the relative-margin rule: with z the float64 logits at x, y the label and
    t_i >= 0 the certifier's bound on how far the margin z_i - z_y can rise in
    the ball (Lipschitz: t_i = sqrt(2) L eps for every i; GloRo: t_i = eps
    ||w_y - w_i|| prod_{l<L} sigma_l, the last layer's rows in float64; BCP and
    local: the translation bound of class i), x is certified iff for every wrong class i

        z_y - z_i - t_i  >  MARGIN_RTOL * (|z_y| + |z_i| + |t_i|),

    with MARGIN_RTOL = 1e-6. A margin within a relative 1e-6 of zero is not
    certified. The slack is for float64 round-off: a float64 dot product of
    n <= 4096 terms errs by at most n u sum_j |w_j h_j| ~ 5e-13 sum_j |w_j h_j|
    (u = 1.1e-16), so the rule leaves a factor of about 2e6 over that worst
    case while the terms' magnitudes stay of the order of the quantities the
    rule is relative to, layer after layer. This is an error argument, not
    interval arithmetic: beyond the widened spectral norms and translation
    bound, nothing is rounded outwards;
  * a point must also be classified correctly by the deployed float32 model
    (the `logits` the caller passes).

The certifiers by name are `CERTIFIERS` (lipschitz, gloro, bcp, local), as the
methods are `methods.METHODS`; `certified_at` certifies with one of them.
Radius 0 is accuracy, not a certificate: `certified_at(..., 0, ...)` is the
float32 model's correctness alone."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .bcp import ball_box_bounds, certified_translation
from .gloro import certified_margin_shift
from .local import local_certified_state
from .numerics import LayerNorms, float64_model
from ..models.architectures import CertifiableNet

# The relative-margin rule (module docstring): a margin must exceed this fraction of
# |z_y| + |z_i| + |t_i| to be certified.
MARGIN_RTOL = 1e-6


def certifiers_for(model: CertifiableNet) -> list[str]:
    """The certifiers reported for a model: the Lipschitz margin, GloRo's margin
    bound (as cheap, and never looser than the Lipschitz margin) and BCP for all;
    the local bound for clipped-ReLU models (the LocalBCP architecture). It is
    sound for plain ReLU too (`certified_at(..., "local", ...)`), but its
    per-example exact masked norms are the costliest certificate, so it is
    spent where the model was trained for it."""
    names = ["lipschitz", "gloro", "bcp"]
    if model.activation_name == "clipped_relu":
        names.append("local")
    return names


def margin_certified(logits: torch.Tensor, shift: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
    """The relative-margin rule (module docstring), in float64: for every i != y,
    z_y - z_i - t_i > MARGIN_RTOL * (|z_y| + |z_i| + |t_i|). `shift` is t, (B, C) or a
    scalar for every class; its entry at y is ignored."""
    z = logits.double()
    t = shift.double() if torch.is_tensor(shift) else torch.full_like(z, float(shift))
    true = z.gather(1, y[:, None])
    holds = (true - z - t) > MARGIN_RTOL * (true.abs() + z.abs() + t.abs())
    return (holds | F.one_hot(y, z.shape[1]).bool()).all(1)


def lipschitz_certified(logits: torch.Tensor, y: torch.Tensor, lipschitz: float, eps: float) -> torch.Tensor:
    """The Lipschitz margin (LMT) under the relative-margin rule: every wrong class may
    rise by t = sqrt(2) L eps (float64); `logits` should be the float64 logits."""
    return margin_certified(logits, math.sqrt(2.0) * float(lipschitz) * float(eps), y)


def gloro_certified(model: CertifiableNet, logits: torch.Tensor, y: torch.Tensor, eps: float,
                    norms: LayerNorms) -> torch.Tensor:
    """GloRo's margin bound (Leino et al. 2021) under the relative-margin rule: for every
    i != y, z_y - z_i > eps ||w_y - w_i|| prod_{l<L} sigma_l^upper, with the last layer's rows
    in float64 (`bounds.gloro.certified_margin_shift`); `logits` should be the float64 logits."""
    last = model.weight_layers()[-1].module.weight
    return margin_certified(logits, certified_margin_shift(last, y, norms.sub_lipschitz_upper, eps), y)


def bcp_certified(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norms: LayerNorms) -> torch.Tensor:
    """BCP's certificate in float64 under the relative-margin rule."""
    model = float64_model(model)
    state, logits = ball_box_bounds(model, x.double(), float(eps), norms.upper)
    return margin_certified(logits, certified_translation(model, state, y), y)


def local_certified(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                    norms: LayerNorms) -> torch.Tensor:
    """The local-Lipschitz (LocalBCP) certificate in float64 under the relative-margin rule."""
    model = float64_model(model)
    state, logits = local_certified_state(model, x.double(), float(eps), norms.upper)
    return margin_certified(logits, certified_translation(model, state, y), y)


# ------------------------------------------------------------------ the certifiers by name
# A certifier: (model, x, y, eps, norms, exact_logits) -> bool per example, certified at
# eps under the relative-margin rule; `exact_logits`: the float64 model's logits at x, or
# None (computed here by a certifier that needs them).
Certifier = Callable[[CertifiableNet, torch.Tensor, torch.Tensor, float, LayerNorms, torch.Tensor | None],
                     torch.Tensor]


def _exact(model: CertifiableNet, x: torch.Tensor, exact_logits: torch.Tensor | None) -> torch.Tensor:
    return float64_model(model)(x.double()) if exact_logits is None else exact_logits


def _lipschitz_certifier(model, x, y, eps, norms, exact_logits):
    return lipschitz_certified(_exact(model, x, exact_logits), y, norms.lipschitz_upper, eps)


def _gloro_certifier(model, x, y, eps, norms, exact_logits):
    return gloro_certified(model, _exact(model, x, exact_logits), y, eps, norms)


# BCP and local take their float64 logits from their own pass through the ball's centre.
def _bcp_certifier(model, x, y, eps, norms, exact_logits):
    return bcp_certified(model, x, y, eps, norms)


def _local_certifier(model, x, y, eps, norms, exact_logits):
    return local_certified(model, x, y, eps, norms)


CERTIFIERS: dict[str, Certifier] = {
    "lipschitz": _lipschitz_certifier,
    "gloro": _gloro_certifier,
    "bcp": _bcp_certifier,
    "local": _local_certifier,
}


def certified_at(name: str, model: CertifiableNet, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor, radius: float, norms: LayerNorms,
                 exact_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Bool per example: correctly classified (by `logits`, the deployed model's) and
    certified by `CERTIFIERS[name]` at `radius`. `model` may be the float32 model or its
    `float64_model` (pass the latter when calling many times: no copy each call);
    `exact_logits`: the float64 model's logits at x, if the caller has them."""
    correct = logits.argmax(1) == y
    if radius == 0:
        return correct
    if name not in CERTIFIERS:
        raise ValueError(f"unknown certifier '{name}' (known: {', '.join(CERTIFIERS)})")
    return CERTIFIERS[name](model, x, y, radius, norms, exact_logits) & correct


def certified_curve(name: str, model64: CertifiableNet, x: torch.Tensor, y: torch.Tensor,
                    logits: torch.Tensor, radii: list[float], norms: LayerNorms,
                    exact_logits: torch.Tensor) -> list[torch.Tensor]:
    """`certified_at` at every radius of `radii` (ascending), each radius computed only
    on the points certified at the radius before it (the first: on the correctly
    classified points). Every certifier here bounds the logits over a set that grows
    with the radius (the ball, hence every box and translation bound) and the margin
    rule only tightens as t grows, so a point not certified at r is not certified at
    any r' > r: the curve is the one computed point by point, at a fraction of the cost
    (at most the correct points at the first radius, the certified ones after). Were a
    certifier not monotone, this could only report fewer certified points, never more.
    Every bound is per example (no batch statistics), so a subset's flags are the
    flags of those points in the whole batch."""
    if any(b < a for a, b in zip(radii, radii[1:])):
        raise ValueError(f"radii must be ascending: {radii}")
    alive = logits.argmax(1) == y
    curve = []
    for radius in radii:
        if radius > 0 and alive.any():
            index = alive.nonzero().squeeze(1)
            flags = torch.zeros_like(alive)
            flags[index] = certified_at(name, model64, x[index], y[index], logits[index], radius, norms,
                                        exact_logits[index])
            alive = flags
        curve.append(alive.clone())
    return curve


def certify_batch(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norms: LayerNorms, certifiers: list[str],
                  model64: CertifiableNet | None = None) -> dict[str, torch.Tensor]:
    """{certifier: certified (bool per example)}; correct predictions (of `model`) only,
    and only those are certified (a misclassified point is never certified, so the
    bounds of the others are not computed). The certifiers run on one float64 copy of
    the model (module docstring): `model64`, `float64_model(model)` made once by a
    caller that certifies many batches, else one made here."""
    logits = model(x)
    exact = float64_model(model) if model64 is None else model64
    exact_logits = exact(x.double())
    return {name: certified_curve(name, exact, x, y, logits, [float(eps)], norms, exact_logits)[0]
            for name in certifiers}
