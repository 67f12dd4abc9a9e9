"""Duet (the paper, sections 4.3-4.4, Algorithm 1): BCP plus a term that pulls
the rank-r rotation factors U_r V_r^T of every layer of the certification
model towards those of a pretrained vanilla model:

    loss = kappa CE(z, y) + (1 - kappa) CE(z_hat_BCP, y) + lambda * loss_sim.

The vanilla factors and spectral norms come from the offline SVD export; the
certification model's factors are computed as in `spectral.rotation`. The
open choices of the paper are params (`duet.*`), explained in
docs/duet-method.md:
  sim_form   paper:     sum_l mean_batch || (s_cer/s_van) Rota_van(x_l) - (s_van/s_cer) Rota_cer(x_l) ||_2
             direction: sum_l mean_batch || Rota_van(x_l) - Rota_cer(x_l) ||_2 / sqrt(output size)
             cosine:    sum_l (1 - cos(U_r V_r^T van, U_r V_r^T cer)), no data needed
  probe      x_l: the layer inputs of the certification model (cer) or of the vanilla model (van)
  cert_factors  svd: exact top-r subspace (refreshed every `refresh_every` steps); power:
             subspace iteration carried across steps (one iteration per step)
The certificate is BCP's: the added term changes training, never the bound.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..spectral.rotation import (SubspaceIteration, apply_rotation, layer_matrix, rotation_cosine,
                                 rotation_from_subspace, top_right_subspace)
from .base import register
from .bcp import BCP

SIM_FORMS = ("paper", "direction", "cosine")


def resolve_rank(rank: int | str, matrix_shape: tuple[int, int]) -> int:
    full = min(matrix_shape)
    return full if rank == "full" else min(int(rank), full)


@register
class Duet(BCP):
    """BCP's bounds and certificate, plus the similarity regulariser."""
    name = "duet"
    certifier = "bcp"

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        if cfg["sim_form"] not in SIM_FORMS:
            raise ValueError(f"duet.sim_form: '{cfg['sim_form']}' is not one of {SIM_FORMS}")
        if context is None or "guide" not in context:
            raise ValueError("duet needs the vanilla model and its SVD factors (context['guide'])")
        self.guide = context["guide"]
        layers = model.weight_layers()
        chosen = range(len(layers)) if cfg["layers"] == "all" else cfg["layers"]
        self.layer_ids = [i for i in chosen]
        device = layers[0].module.weight.device
        self.rank = {}
        self.van_rotation, self.van_sigma = {}, {}
        self.subspaces: dict[int, SubspaceIteration | torch.Tensor] = {}
        for i in self.layer_ids:
            factors = self.guide["factors"]["layers"][i]
            r = resolve_rank(cfg["rank"], factors["matrix_shape"])
            self.rank[i] = r
            self.van_rotation[i] = (factors["U"][:, :r] @ factors["V"][:, :r].t()).to(device)
            self.van_sigma[i] = float(factors["operator_norm_estimate"])
            if cfg["cert_factors"] == "power":
                self.subspaces[i] = SubspaceIteration(factors["matrix_shape"][1], r, generator, device)
        self.vanilla = self.guide["model"].to(device).eval() if cfg["probe"] == "van" else None
        self.steps = 0
        self._sigmas = None

    # -- the certification model's factors ---------------------------------------------------
    def _right_subspace(self, i: int, weight_matrix: torch.Tensor) -> torch.Tensor:
        if self.cfg["cert_factors"] == "power":
            return self.subspaces[i].step(weight_matrix.detach())
        if self.steps % self.cfg["refresh_every"] == 0 or i not in self.subspaces:
            self.subspaces[i] = top_right_subspace(weight_matrix.detach(), self.rank[i])
        return self.subspaces[i]

    def cert_rotations(self) -> dict[int, torch.Tensor]:
        layers = self.model.weight_layers()
        out = {}
        for i in self.layer_ids:
            matrix = layer_matrix(layers[i])
            out[i] = rotation_from_subspace(matrix, self._right_subspace(i, matrix),
                                            self.cfg["polar_iterations"])
        return out

    # -- the interface ------------------------------------------------------------------------
    def forward(self, x):
        logits = super().forward(x)
        inputs = self.clean_pass(x).inputs
        if self.vanilla is not None:
            with torch.no_grad():
                _, inputs = self.vanilla.forward_with_layer_inputs(x)
        # The probes only carry the data: the term acts on the rotations, not on earlier layers.
        self._inputs = [h.detach() for h in inputs]
        return logits

    def regulariser(self, x, y, logits):
        if self.cfg["lambda"] == 0:
            return None
        rotations = self.cert_rotations()
        self.steps += 1
        layers = self.model.weight_layers()
        form = self.cfg["sim_form"]
        if form == "paper":
            self._sigmas = self.layer_norms()
        terms = []
        for i in self.layer_ids:
            if form == "cosine":
                terms.append(1.0 - rotation_cosine(self.van_rotation[i], rotations[i]))
                continue
            probe = self._inputs[i]
            rota_van = apply_rotation(layers[i], self.van_rotation[i], probe).flatten(1)
            rota_cer = apply_rotation(layers[i], rotations[i], probe).flatten(1)
            if form == "paper":
                ratio = self._sigmas[i] / self.van_sigma[i]
                diff = ratio * rota_van - rota_cer / ratio
                terms.append(diff.norm(dim=1).mean())
            else:  # direction
                terms.append((rota_van - rota_cer).norm(dim=1).mean() / math.sqrt(rota_van.shape[1]))
        return self.cfg["lambda"] * torch.stack(terms).sum()

    def step_norms(self):
        # The paper form already ran this step's power iteration; BCP reuses its norms.
        sigmas, self._sigmas = (self._sigmas or self.layer_norms()), None
        return sigmas

    def state_dict(self):
        state = super().state_dict()
        state["steps"] = self.steps
        state["subspaces"] = {i: (s.basis if isinstance(s, SubspaceIteration) else s).detach().cpu()
                              for i, s in self.subspaces.items()}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.steps = state["steps"]
        for i, basis in state["subspaces"].items():
            device = self.van_rotation[i].device
            if isinstance(self.subspaces.get(i), SubspaceIteration):
                self.subspaces[i].basis = basis.to(device)
            else:
                self.subspaces[i] = basis.to(device)


def load_guide(root: Path, layout, device: torch.device) -> dict:
    """The frozen vanilla model and its offline SVD factors."""
    from ..certify.stage import load_trained
    from ..spectral.svd_export import load_factors

    return {"model": load_trained(root / layout.vanilla_model, device).requires_grad_(False),
            "factors": load_factors(root / layout.svd_factors)}
