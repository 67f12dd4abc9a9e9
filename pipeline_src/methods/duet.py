"""Duet (the paper, sections 4.3-4.4, Algorithm 1): BCP plus a term that pulls
the rank-r rotation of every layer of the certification model towards the
vanilla model's U_r V_r^T:

    loss = kappa CE(z, y) + (1 - kappa) CE(z_hat_BCP, y) + lambda * loss_sim,
    loss_sim = sum_l mean_batch || (s_cer/s_van) Rota_van(x_l) - (s_van/s_cer) Rota_cer(x_l) ||_2

(eq. 11, Algorithm 1 line 12). The vanilla factors and spectral norms come
from the offline SVD export; s_cer,l is the spectral norm that BCP's power
iteration computes for the layer at this step (the same tensor BCP's bound
uses). The open choices are params (`duet.*`, docs/duet-method.md):
  cert_rotation  normalized_weight (default, the paper's): Rota_cer(x) = W x / s_cer,
                 Algorithm 1 line 9, W x taken from the step's clean pass;
                 polar: Rota_cer(x) = U_r V_r^T x of the exact SVD of W, with the
                 SVD's own gradient (`spectral.rotation.top_rank_rotation`)
  van_sigma      s_van of eq. 11: weight_matrix (default, the paper's: sigma_1 of the SVD of
                 Algorithm 1 line 6, of the reshaped kernel) | operator (the conv
                 operator's norm) | frobenius (||sigma||_2 of all singular values)
  sim_form       paper (eq. 11) | direction (no sigma factors, / sqrt(output size))
                 | cosine (1 - Frobenius cosine of the two rotations, no data)
  probe          x_l: own (default: each model's own layer input, Algorithm 1 runs
                 both models on the batch, lines 3-4) | cer | van (both the
                 certification model's, or both the vanilla model's)
  detach_probe   false (default): the term's gradient also reaches earlier layers
                 through x_l, as Algorithm 1 differentiates the total loss
The certificate is BCP's: the added term changes training, never the bound.

The term is `SimilarityTerm`, mixed into BCP here and into LocalBCP by
`methods/duet_local.py` (Duet-local): one code for both.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models.loading import load_trained
from ..spectral.operator_norm import apply_operator
from ..spectral.svd_export import load_factors, svd_factors
from ..spectral.rotation import (FactorisedRotation, apply_rotation, factorised_inner, layer_matrix,
                                 resolve_rank, top_rank_rotation)
from .base import register
from .bcp import BCP

SIM_FORMS = ("paper", "direction", "cosine")
CERT_ROTATIONS = ("normalized_weight", "polar")
PROBES = ("own", "cer", "van")
VAN_SIGMAS = ("weight_matrix", "operator", "frobenius")


def vanilla_sigma(factors: dict, reading: str) -> float:
    """sigma_van of a layer (eq. 11's ratio) from its exported SVD factors.
    weight_matrix: sigma_1 of the SVD that gives U and V (Algorithm 1, line 6: the
    weight reshaped to C_out x C_in k k), the paper's; operator: the layer's operator
    norm (a convolution's, from the export's power iteration, the norm BCP's sigma_cer
    measures); frobenius: ||sigma||_2 of every singular value (eq. 11 writes
    ||sigma_van||)."""
    if reading == "weight_matrix":
        return float(factors["S"][0])
    if reading == "operator":
        return float(factors["operator_norm_estimate"])
    return float(factors["S"].double().norm())


class SimilarityTerm:
    """Duet's similarity regulariser, mixed in before a method that tracks its layers'
    spectral norms by persistent power iteration (`GlobalNormMethod`): `Duet(SimilarityTerm,
    BCP)`, `DuetLocal(SimilarityTerm, LocalBCP)`. It adds lambda * loss_sim at every step
    and hands the step's sigmas, which the term computed first (Algorithm 1 line 7), to the
    method's own bound through `step_norms` (one SpecNormCal serves both, lines 7-8). With
    lambda = 0 it computes nothing and the method is exactly the one it is mixed into.
    Its keys (`lambda`, `sim_form`, `cert_rotation`, `van_sigma`, `probe`, `detach_probe`,
    `rank`, `layers`) are read from the method's own params block; the method's schema block
    states `similarity_term: true`, so the stage hands it the guide (`method_context`)."""

    def __init__(self, model, cfg, generator, num_examples, context=None):
        super().__init__(model, cfg, generator, num_examples, context)
        for key, allowed in (("sim_form", SIM_FORMS), ("cert_rotation", CERT_ROTATIONS), ("probe", PROBES),
                             ("van_sigma", VAN_SIGMAS)):
            if cfg[key] not in allowed:
                raise ValueError(f"{self.name}.{key}: '{cfg[key]}' is not one of {allowed}")
        if context is None or "guide" not in context:
            raise ValueError(f"{self.name} needs the vanilla model and its SVD factors (context['guide'])")
        guide = context["guide"]
        layers = model.weight_layers()
        self.layer_ids = list(range(len(layers))) if cfg["layers"] == "all" else list(cfg["layers"])
        self.rank, self.van_sigma, self.van_map, self.van_factors = {}, {}, {}, {}
        for i in self.layer_ids:
            factors = guide["factors"]["layers"][i]
            r = resolve_rank(cfg["rank"], factors["matrix_shape"])
            u_r, v_r = factors["U"][:, :r], factors["V"][:, :r]
            self.rank[i] = r
            self.van_sigma[i] = vanilla_sigma(factors, cfg["van_sigma"])
            self.van_map[i] = FactorisedRotation(layers[i], u_r, v_r)
            self.van_factors[i] = (self.van_map[i].u_r, self.van_map[i].v_r)
        self.vanilla = guide["model"].to(layers[0].module.weight.device).eval() if cfg["probe"] != "cer" else None
        self._inputs = None
        self._sigmas = None

    def forward(self, x):
        logits = super().forward(x)
        self._inputs = None
        if self.vanilla is not None and self.cfg["lambda"] != 0:
            with torch.no_grad():
                self._inputs = self.vanilla.forward_trace(x).inputs
        return logits

    def _probes(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_l for Rota_van, x_l for Rota_cer) of layer i."""
        own = self.clean_pass(x).inputs[i]
        if self.cfg["detach_probe"]:
            own = own.detach()
        probe = self.cfg["probe"]
        if probe == "own":
            return self._inputs[i], own
        if probe == "cer":
            return own, own
        return self._inputs[i], self._inputs[i]

    def _rota_cer(self, x: torch.Tensor, i: int, probe: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        layer = self.model.weight_layers()[i]
        if self.cfg["cert_rotation"] == "polar":
            return apply_rotation(layer, top_rank_rotation(layer_matrix(layer), self.rank[i]), probe)
        if self.cfg["probe"] != "van" and not self.cfg["detach_probe"]:
            # W x_l is the clean pass's pre-activation less the bias: no extra pass.
            pre, bias = self.clean_pass(x).pre[i], layer.module.bias
            linear = pre - (bias.view(1, -1, 1, 1) if pre.dim() == 4 else bias)
        else:
            linear = apply_operator(layer, probe)
        return linear / sigma

    def _cosine(self, i: int, sigma: torch.Tensor) -> torch.Tensor:
        """1 - cos(U_r V_r^T van, rotation of the certification model), factorised."""
        layer = self.model.weight_layers()[i]
        u_r, v_r = self.van_factors[i]
        matrix = layer_matrix(layer)
        if self.cfg["cert_rotation"] == "polar":
            matrix = top_rank_rotation(matrix, self.rank[i])
        else:
            matrix = matrix / sigma
        cosine = factorised_inner(u_r, v_r, matrix) / (math.sqrt(self.rank[i]) * matrix.norm().clamp_min(1e-30))
        return 1.0 - cosine

    def regulariser(self, x, y, logits):
        if self.cfg["lambda"] == 0:
            return None
        # This step's power iteration: the sigmas of line 7, reused by BCP's bound (step_norms).
        self._sigmas = self.layer_norms()
        form = self.cfg["sim_form"]
        terms = []
        for i in self.layer_ids:
            sigma = self._sigmas[i]
            if form == "cosine":
                terms.append(self._cosine(i, sigma))
                continue
            van_probe, cer_probe = self._probes(x, i)
            rota_van = self.van_map[i](van_probe).flatten(1)
            rota_cer = self._rota_cer(x, i, cer_probe, sigma).flatten(1)
            if form == "paper":
                ratio = sigma / self.van_sigma[i]
                terms.append((ratio * rota_van - rota_cer / ratio).norm(dim=1).mean())
            else:  # direction
                terms.append((rota_van - rota_cer).norm(dim=1).mean() / math.sqrt(rota_van.shape[1]))
        return self.cfg["lambda"] * torch.stack(terms).sum()

    def step_norms(self):
        """The sigmas the term computed this step (the method's bound uses the very same
        tensors); without the term (lambda = 0), the method's own power-iteration step."""
        sigmas, self._sigmas = (self._sigmas or self.layer_norms()), None
        return sigmas

    def after_step(self) -> None:
        super().after_step()
        self._inputs = None
        self._sigmas = None   # a warm-up step computes sigmas that no bound uses


@register
class Duet(SimilarityTerm, BCP):
    """BCP's bounds and certificate, plus the similarity regulariser."""
    name = "duet"
    certifier = "bcp"


def load_guide_model(root: Path, layout, device: torch.device) -> torch.nn.Module:
    """The frozen vanilla model."""
    return load_trained(root / layout.vanilla_model, device).requires_grad_(False)


def load_guide(root: Path, layout, device: torch.device) -> dict:
    """The frozen vanilla model and its offline SVD factors."""
    return {"model": load_guide_model(root, layout, device), "factors": load_factors(root / layout.svd_factors)}


def untrained_guide(model: torch.nn.Module, svd: dict, seed: int, device: torch.device) -> dict:
    """The no-guide control of the similarity term (`guide: untrained`, issue 22): an
    untrained network of the guide's architecture (the caller hands the vanilla model's
    initial weights) in the guide's place, frozen, with its SVD factors computed here as
    the svd stage computes the guide's (`svd` the params' svd block)."""
    layers, _ = svd_factors(model, svd, seed)
    return {"model": model.to(device).requires_grad_(False).eval(), "factors": {"layers": layers}}
