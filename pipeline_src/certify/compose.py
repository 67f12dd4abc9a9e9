"""Certify or predict, measured: a trained certified run g composed with the vanilla guide h
(`bounds.selection`) at every tau of a grid, on one split. The numbers a compose stage
reports for its tau curve, and from which tau is chosen on the validation split.

Numerics as the certify stage's: g's selector, predictions and certificates on a float64 copy
of g (TF32 off, eval mode, guaranteed spectral bounds), h in float32 (its predictions are
never certified). Not yet a stage of the DAG (issue 22)."""
from __future__ import annotations

import torch

from ..bounds.numerics import LayerNorms, float64_model, sound_numerics
from ..bounds.selection import composite_certified, composite_predictions
from ..models.architectures import CertifiableNet


def composite_curve(model: CertifiableNet, guide: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps: float, taus: list[float], norms: LayerNorms, batch_size: int = 500) -> list[dict]:
    """For each tau (in input-space units, as eps): the composite's clean accuracy, its
    certified accuracy at eps and at 2 eps, and the fraction of points g answers (%). `x`
    images in [0, 1] (float) or uint8."""
    n = len(y)
    clean = torch.zeros(len(taus))
    certified = torch.zeros(len(taus), 2)
    answered = torch.zeros(len(taus))
    with torch.no_grad(), sound_numerics(model):
        model64 = float64_model(model)
        weight = model64.weight_layers()[-1].module.weight
        k_sub = norms.sub_lipschitz_upper
        for start in range(0, n, batch_size):
            xb = x[start:start + batch_size]
            xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb
            yb = y[start:start + batch_size]
            exact = model64(xb.double())
            guide_logits = guide(xb)
            for k, tau in enumerate(taus):
                predicted, selected = composite_predictions(exact, guide_logits, weight, k_sub, tau)
                clean[k] += (predicted == yb).sum()
                answered[k] += selected.sum()
                for j, radius in enumerate((eps, 2.0 * eps)):
                    certified[k, j] += composite_certified(exact, yb, weight, k_sub, radius, tau).sum()
    return [{"tau": tau, "clean_accuracy": 100.0 * clean[k].item() / n,
             "certified_accuracy": 100.0 * certified[k, 0].item() / n,
             "certified_accuracy_2eps": 100.0 * certified[k, 1].item() / n,
             "certified_model_answers": 100.0 * answered[k].item() / n} for k, tau in enumerate(taus)]
