"""BCP, box constraint propagation (Lee et al. 2020): the worst-case logits
from the ball-and-box bounds of `bounds.bcp`, the ball radius grown by power
iteration (persistent vectors) on each layer's operator, the translation by
`translation_iterations` clip-and-rescale steps (1 in the reference)."""
from __future__ import annotations

import torch

from ..bounds.bcp import bcp_worst_logits
from .base import GlobalNormMethod, StepBounds, register


@register
class BCP(GlobalNormMethod):
    name = "bcp"
    certifier = "bcp"

    def bounds(self, x, y, logits, eps, index):
        sigmas = self.layer_norms()
        worst = bcp_worst_logits(self.model, x, y, eps, sigmas, self.cfg["translation_iterations"],
                                 clean=self.clean_pass(x))
        return StepBounds(worst, torch.stack(sigmas).prod().detach())
