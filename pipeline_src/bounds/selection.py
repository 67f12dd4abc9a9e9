"""Certify or predict: a certified model g and an accurate model h (the vanilla guide)
composed into one classifier, with g's own GloRo radius as the selector (the composition of
ACE, Mueller et al., ICLR 2021, "Certify or Predict: Boosting Certified Robustness with
Compositional Architectures", here with a selector that needs no network of its own):

    f(x) = argmax z(x)   where rho(x) >= tau,   else argmax h(x),
    rho(x) = min_{i != p} (z_p(x) - z_i(x)) / K_pi,   p = argmax z(x),

z the float64 logits of g, K_pi = ||w_p - w_i|| K_sub GloRo's per-class-pair Lipschitz bound
(`bounds.gloro`: K_sub the product of the guaranteed spectral bounds of g's layers before the
last). The selector decides under the relative-margin rule (`certifiers.margin_certified`) with
the shifts tau K_pi: g answers where it is robust at radius tau, h everywhere else.

The certificate. f keeps the label y on the l2 ball B(x, eps) if, at x, for every i != y,

    z_y - z_i - t_i > MARGIN_RTOL (|z_y| + |z_i| + |t_i|),
    t_i = (eps + tau) K_yi + 2 MARGIN_RTOL eps (||w_y|| + ||w_i||) K_sub      (tau > 0).

Proof. For x' in the ball each margin z_y - z_i falls by at most eps K_yi, so at x' it still
exceeds tau K_yi by the right-hand side above (every margin stays positive: y is g's unique
prediction at x'). The selector's rule at x' compares with MARGIN_RTOL (|z_y(x')| + |z_i(x')| +
tau K_yi), and each logit moves by at most ||w_j|| K_sub eps (z_j = w_j . phi + b_j, phi
K_sub-Lipschitz; the bias cancels): one copy of the second term of t_i covers that in exact
arithmetic, the second copy (with the (1 + 1e-9) widening of the GloRo shift) is the room for
float64 round-off, thinner than the other certifiers' since the rule's slack at x is spent on
the selector at x'. So f = g = y on the whole ball. With tau = 0 the selector always chooses
g: the certificate is GloRo's at eps. tau < 0 is refused (the proof needs tau >= 0). The
composite is deployed with g in float64, as the certificate reads it.

This is an inference-time composition, not a training method: h is evaluated wherever g is
not robust at tau, and h's predictions are never certified. tau trades the two: larger tau hands
more points to h (clean accuracy up) and certifies only where g is robust at eps + tau."""
from __future__ import annotations

import math

import torch

from .certifiers import MARGIN_RTOL, margin_certified
from .gloro import certified_margin_shift


def _checked(tau: float) -> float:
    """tau as a float; a negative or non-finite tau is refused (with tau < 0 the selector would
    choose g where it is not even robust at 0, and the certificate's proof fails)."""
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite radius >= 0, not {tau}")
    return tau


def selects_certified(logits: torch.Tensor, weight: torch.Tensor, sub_lipschitz_upper: float,
                      tau: float) -> torch.Tensor:
    """Per example: whether the selector hands x to g (rho(x) >= tau under the relative-margin
    rule); `logits` g's float64 logits at x, `weight` g's last layer."""
    predicted = logits.argmax(1)
    if _checked(tau) == 0:
        return torch.ones_like(predicted, dtype=torch.bool)
    return margin_certified(logits, certified_margin_shift(weight, predicted, sub_lipschitz_upper, tau),
                            predicted)


def composite_predictions(logits: torch.Tensor, guide_logits: torch.Tensor, weight: torch.Tensor,
                          sub_lipschitz_upper: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f's predictions, where g answered): g's prediction where the selector chooses it, the
    guide's elsewhere."""
    selected = selects_certified(logits, weight, sub_lipschitz_upper, tau)
    return torch.where(selected, logits.argmax(1), guide_logits.argmax(1)), selected


def composite_shift(weight: torch.Tensor, y: torch.Tensor, sub_lipschitz_upper: float, eps: float,
                    tau: float) -> torch.Tensor:
    """t_i of the module's certificate, (B, C), float64."""
    shift = certified_margin_shift(weight, y, sub_lipschitz_upper, eps + _checked(tau))
    if tau == 0:
        return shift
    rows = weight.double().norm(dim=1)
    magnitude = (rows[y][:, None] + rows[None, :]) * float(sub_lipschitz_upper) * float(eps)
    return shift + 2.0 * MARGIN_RTOL * magnitude


def composite_certified(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                        sub_lipschitz_upper: float, eps: float, tau: float) -> torch.Tensor:
    """Per example: f provably answers y on B(x, eps) (the module's certificate); `logits` g's
    float64 logits at x."""
    return margin_certified(logits, composite_shift(weight, y, sub_lipschitz_upper, eps, tau), y)
