"""LocalBCP (Huang et al. 2021): BCP with the ball radius at the logit layer
replaced by the per-example local Lipschitz radius of `bounds.local`, on a
network with clipped ReLUs whose thresholds theta are learned (kept >= 0
after every step by `after_step`)."""
from __future__ import annotations

import torch

from ..bounds.lipschitz import PersistentPowerIteration
from ..bounds.local import PerExamplePowerIteration, local_worst_logits
from .base import CertifiedMethod, StepBounds, register


@register
class LocalBCP(CertifiedMethod):
    name = "localbcp"
    certifier = "local"

    def __init__(self, model, cfg, generator, num_examples):
        super().__init__(model, cfg, generator, num_examples)
        layers = model.weight_layers()
        self.power = PersistentPowerIteration(layers, generator)
        self.local_power = PerExamplePowerIteration(layers, num_examples, cfg["vector_cache"], generator)

    def bounds(self, x, y, logits, eps, index):
        layers = self.model.weight_layers()
        sigmas = self.power.norms(layers, self.cfg["power_iterations"])
        worst, local_lipschitz = local_worst_logits(
            self.model, x, y, eps, sigmas, self.local_power, index,
            self.cfg["local_power_iterations"], self.cfg["translation_iterations"])
        return StepBounds(worst, local_lipschitz.mean().detach())

    def state_dict(self):
        return {"power": self.power.state_dict(), "local_power": self.local_power.state_dict()}

    def load_state_dict(self, state):
        self.power.load_state_dict(state["power"])
        self.local_power.load_state_dict(state["local_power"])
