"""BCP, box constraint propagation (Lee et al. 2020): the worst-case logits
from the ball-and-box bounds of `bounds.bcp`, the ball radius grown by power
iteration (persistent vectors) on each layer's operator, the translation by
`translation_iterations` clip-and-rescale steps (1 in the reference).

With `compile: true` the bound computation (every layer's ball and box, and the
translation) runs through `torch.compile`, forward and backward: a BCP step is
hundreds of small kernels, bound by their launches; the eager path is the
reference, and a test checks that both give the same loss and gradients."""
from __future__ import annotations

import torch

from ..bounds.bcp import bcp_worst_logits
from .base import GlobalNormMethod, StepBounds, register


def worst_logits_function(cfg: dict):
    """bcp_worst_logits, compiled if the method's block says `compile: true`; the
    compiled one takes eps as a 0-dim tensor so the ramp's eps never recompiles."""
    if not cfg.get("compile", False):
        return bcp_worst_logits
    compiled = torch.compile(bcp_worst_logits)
    eps_on_device: dict = {}   # one scalar per device, refilled each step (no blocking copy)

    def worst_logits(model, x, y, eps, sigmas, iterations, clean=None):
        scalar = eps_on_device.setdefault(x.device, torch.zeros((), device=x.device, dtype=x.dtype))
        return compiled(model, x, y, scalar.fill_(float(eps)), sigmas, iterations, clean)
    return worst_logits


@register
class BCP(GlobalNormMethod):
    name = "bcp"
    certifier = "bcp"

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        self.worst_logits = worst_logits_function(cfg)

    def bounds(self, x, y, logits, eps, index):
        sigmas = self.step_norms()
        worst = self.worst_logits(self.model, x, y, eps, sigmas, self.cfg["translation_iterations"],
                                  clean=self.clean_pass(x))
        return StepBounds(worst, torch.stack(sigmas).prod().detach())
