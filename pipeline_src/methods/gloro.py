"""GloRo (Leino et al. 2021, "Globally-robust neural networks", ICML; the authors'
code is github.com/klasleino/gloro): the network's logits z are extended by a
bottom class

    z_bot = max_{i != j} z_i + eps * K_ji,   K_ji = ||w_j - w_i||_2 * prod_{l < L} sigma_l,

j the predicted class, w the rows of the last layer, sigma_l the spectral norms
of the earlier layers (`bounds.gloro`); a point is robust where z_j > z_bot.
Training minimises a loss on the C + 1 logits [z, z_bot] with the label never
the bottom class:

  loss: crossentropy  CE([z, z_bot], y);
  loss: trades        GloRo's TRADES loss, CE(z, y) + lambda * KL(softmax(z) with 0
                      for bot || softmax([z, z_bot])).

The shared loop's loss is kappa CE(z, y) + (1 - kappa) robust (`training.certified`):
with `crossentropy`, robust = CE([z, z_bot], y), GloRo's loss once kappa reaches 0;
with `trades`, robust = CE(z, y) + lambda KL (`StepBounds.trades`), so the loss is
CE(z, y) + (1 - kappa) lambda KL, GloRo's TRADES loss with its parameter ramped from
0 to `trades_lambda` along with eps (GloRo's `TradesScheduler('linear')` idea), then
held. The KL term equals CE([z, z_bot], y) - CE(z, y) exactly (the two softmaxes
share every class but bot, so log p_i / q_i is the same for every i). sigma_l come
from power iteration with persistent vectors (`power_iterations` per step; GloRo's
default 5).
The certificate is GloRo's margin bound with guaranteed spectral norms in float64
(`bounds.certifiers`, "gloro")."""
from __future__ import annotations

import torch

from ..bounds.gloro import gloro_logits, trades_kl
from .base import GlobalNormMethod, StepBounds, register

LOSSES = ("crossentropy", "trades")


@register
class GloRo(GlobalNormMethod):
    name = "gloro"
    certifier = "gloro"

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        if cfg["loss"] not in LOSSES:
            raise ValueError(f"gloro.loss: '{cfg['loss']}' is not one of {LOSSES}")

    def bounds(self, x, y, logits, eps, index):
        sigmas = self.step_norms()
        sub_lipschitz = torch.stack(sigmas[:-1]).prod()
        last = self.model.weight_layers()[-1].module
        worst = gloro_logits(logits, last.weight, sub_lipschitz, eps)
        trades = None
        if self.cfg["loss"] == "trades":
            trades = self.cfg["trades_lambda"] * trades_kl(logits, worst).mean()
        # The history's Lipschitz column: the product of every layer's norm, as for LMT and BCP.
        return StepBounds(worst, (sub_lipschitz * sigmas[-1]).detach(), trades=trades)
