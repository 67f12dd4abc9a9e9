"""LMT, Lipschitz-margin training (Tsuzuku et al. 2018): every wrong logit is
raised by sqrt(2) * L * eps, L the product of the layers' spectral norms from
power iteration with persistent vectors."""
from __future__ import annotations

import torch

from ..bounds.lipschitz import lipschitz_worst_logits
from .base import GlobalNormMethod, StepBounds, register


@register
class LMT(GlobalNormMethod):
    name = "lmt"
    certifier = "lipschitz"

    def bounds(self, x, y, logits, eps, index):
        lipschitz = torch.stack(self.layer_norms()).prod()
        return StepBounds(lipschitz_worst_logits(logits, y, lipschitz, eps), lipschitz.detach())
