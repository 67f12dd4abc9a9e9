"""BCP, box constraint propagation (Lee et al. 2020): the worst-case logits
from the ball-and-box bounds of `bounds.bcp`, the ball radius grown by power
iteration (persistent vectors) on each layer's operator, the translation by
`translation_iterations` clip-and-rescale steps (1 in the reference)."""
from __future__ import annotations

import torch

from ..bounds.bcp import bcp_worst_logits
from ..bounds.lipschitz import PersistentPowerIteration
from .base import CertifiedMethod, StepBounds, register


@register
class BCP(CertifiedMethod):
    name = "bcp"
    certifier = "bcp"

    def __init__(self, model, cfg, generator, num_examples):
        super().__init__(model, cfg, generator, num_examples)
        self.power = PersistentPowerIteration(model.weight_layers(), generator)

    def bounds(self, x, y, logits, eps, index):
        sigmas = self.power.norms(self.model.weight_layers(), self.cfg["power_iterations"])
        worst = bcp_worst_logits(self.model, x, y, eps, sigmas, self.cfg["translation_iterations"])
        return StepBounds(worst, torch.stack(sigmas).prod().detach())

    def state_dict(self):
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state):
        self.power.load_state_dict(state["power"])
