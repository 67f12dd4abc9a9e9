"""LMT, Lipschitz-margin training (Tsuzuku et al. 2018): every wrong logit is
raised by sqrt(2) * L * eps, L the product of the layers' spectral norms from
power iteration with persistent vectors."""
from __future__ import annotations

import torch

from ..bounds.lipschitz import PersistentPowerIteration, lipschitz_worst_logits
from .base import CertifiedMethod, StepBounds, register


@register
class LMT(CertifiedMethod):
    name = "lmt"
    certifier = "lipschitz"

    def __init__(self, model, cfg, generator, num_examples):
        super().__init__(model, cfg, generator, num_examples)
        self.power = PersistentPowerIteration(model.weight_layers(), generator)

    def bounds(self, x, y, logits, eps, index):
        sigmas = self.power.norms(self.model.weight_layers(), self.cfg["power_iterations"])
        lipschitz = torch.stack(sigmas).prod()
        return StepBounds(lipschitz_worst_logits(logits, y, lipschitz, eps), lipschitz.detach())

    def state_dict(self):
        return {"power": self.power.state_dict()}

    def load_state_dict(self, state):
        self.power.load_state_dict(state["power"])

