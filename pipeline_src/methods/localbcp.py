"""LocalBCP (Huang et al. 2021): BCP with the ball radius at the logit layer
replaced by the per-example local Lipschitz radius of `bounds.local`, on a
network with clipped ReLUs whose thresholds theta are learned (kept >= 0
after every step by `after_step`), and optionally the reference's sparsity loss
(`sparsity_weight` > 0) added to the robust loss."""
from __future__ import annotations

import torch

from ..bounds.local import PerExamplePowerIteration, local_worst_logits, sparsity_penalty
from .base import GlobalNormMethod, StepBounds, register


@register
class LocalBCP(GlobalNormMethod):
    name = "localbcp"
    certifier = "local"

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        self.local_power = PerExamplePowerIteration(model.weight_layers(), num_examples,
                                                    cfg["vector_cache"], generator,
                                                    getattr(torch, cfg["vector_cache_dtype"]))

    def bounds(self, x, y, logits, eps, index):
        boxes: list = []
        worst, local_lipschitz = local_worst_logits(
            self.model, x, y, eps, self.step_norms(), self.local_power, index,
            self.cfg["local_power_iterations"], self.cfg["translation_iterations"], boxes=boxes,
            clean=self.clean_pass(x))
        sparsity = None
        if self.cfg["sparsity_weight"] > 0:
            sparsity = self.cfg["sparsity_weight"] * sparsity_penalty(
                self.model, boxes, self.cfg["sparsity_saturation_weight"])
        # The history's Lipschitz column is the batch mean of the per-example local products.
        return StepBounds(worst, local_lipschitz.mean().detach(), sparsity=sparsity)

    def state_dict(self):
        return {**super().state_dict(), "local_power": self.local_power.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.local_power.load_state_dict(state["local_power"])
