"""Global Lipschitz bounds: per-layer spectral norms, their product L, and the
margin certificate of LMT (Tsuzuku et al. 2018): a prediction is certified at
radius eps when z_y - z_i > sqrt(2) * L * eps for every i != y.

Training uses power iteration with persistent vectors (cheap, differentiable,
an estimate) and `lipschitz_worst_logits` in the model's dtype; certification
uses guaranteed upper bounds (`spectral.operator_norm.operator_norm_upper_bound`,
float64 python floats) and decides in float64 under the relative-margin rule
of `pipeline_src/bounds/certifiers.py` (`lipschitz_certified`), never on the
float32 worst-case logits of this module."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.architectures import WeightLayer
from ..spectral.operator_norm import apply_adjoint, apply_operator


class PersistentPowerIteration:
    """One unit input-shaped vector per layer, carried from step to step, so a
    few iterations per training step track the largest singular vector."""

    def __init__(self, layers: list[WeightLayer], generator: torch.Generator | None = None):
        device = layers[0].module.weight.device
        self.vectors = []
        for layer in layers:
            v = torch.randn((1, *layer.input_shape), generator=generator,
                            device=generator.device if generator is not None else device).to(device)
            self.vectors.append(v / v.norm())

    def norms(self, layers: list[WeightLayer], iterations: int) -> list[torch.Tensor]:
        """sigma_l = ||A_l v_l|| after `iterations` steps; differentiable in the weights."""
        sigmas = []
        for i, layer in enumerate(layers):
            v = self.vectors[i]
            with torch.no_grad():
                for _ in range(iterations):
                    v = apply_adjoint(layer, apply_operator(layer, v))
                    v = v / v.norm().clamp_min(1e-30)
            self.vectors[i] = v
            sigmas.append(apply_operator(layer, v).norm())
        return sigmas

    def state_dict(self) -> dict:
        return {"vectors": [v.detach().cpu() for v in self.vectors]}

    def load_state_dict(self, state: dict) -> None:
        device = self.vectors[0].device
        self.vectors = [v.to(device) for v in state["vectors"]]


def lipschitz_worst_logits(logits: torch.Tensor, y: torch.Tensor, lipschitz: torch.Tensor | float,
                           eps: float) -> torch.Tensor:
    """LMT's worst-case logits: every wrong class raised by sqrt(2) * L * eps."""
    wrong = 1.0 - F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return logits + math.sqrt(2.0) * lipschitz * eps * wrong
