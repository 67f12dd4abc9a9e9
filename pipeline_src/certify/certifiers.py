"""Sound certification of a trained model: which test points provably keep
their (correct) prediction for every l2 perturbation of norm <= eps.

Soundness rules, enforced here: the model in eval mode, fp32 with TF32 off,
and every spectral norm a guaranteed upper bound of the layer's operator norm
(`spectral.operator_norm.operator_norm_upper_bound`), never a power-iteration
estimate; the BCP translation bounded from above by duality."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..bounds.bcp import bcp_worst_logits
from ..bounds.local import local_worst_logits
from ..models.architectures import CertifiableNet
from ..spectral.operator_norm import operator_norm_upper_bound, power_iteration


@contextmanager
def sound_numerics(model: CertifiableNet):
    """fp32, TF32 off, eval mode, no gradients; restores the previous settings."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    was_training = model.training
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        model.train(was_training)


@dataclass
class LayerNorms:
    upper: list[float]      # guaranteed
    estimate: list[float]   # power iteration, for the report

    @property
    def lipschitz_upper(self) -> float:
        return math.prod(self.upper)

    def report(self) -> dict:
        return {"method": "upper: exact float64 SVD (dense), polyphase circular-conv DFT bound (conv); "
                          "estimate: power iteration",
                "upper": self.upper, "estimate": self.estimate,
                "upper_over_estimate": [u / e for u, e in zip(self.upper, self.estimate)],
                "lipschitz_upper": self.lipschitz_upper, "lipschitz_estimate": math.prod(self.estimate)}


def layer_norms(model: CertifiableNet, power_iterations: int = 200, seed: int = 0) -> LayerNorms:
    generator = torch.Generator().manual_seed(seed)
    layers = model.weight_layers()
    upper = [operator_norm_upper_bound(layer) for layer in layers]
    estimate = []
    for layer in layers:
        start = torch.randn((1, *layer.input_shape), generator=generator).to(layer.module.weight.device)
        estimate.append(power_iteration(layer, power_iterations, 1e-9, v=start)[0])
    for layer, u, e in zip(layers, upper, estimate):
        if u < e:
            raise AssertionError(f"layer {layer.name}: upper bound {u} below the estimate {e}: unsound")
    return LayerNorms(upper, estimate)


def certifiers_for(model: CertifiableNet) -> list[str]:
    """The certifiers reported for a model: the Lipschitz margin and BCP for all;
    the local bound for clipped-ReLU models (the LocalBCP architecture). It is
    sound for plain ReLU too (`certified_at(..., "local", ...)`), but its
    per-example exact masked norms are the costliest certificate, so it is
    spent where the model was trained for it."""
    names = ["lipschitz", "bcp"]
    if model.activation_name == "clipped_relu":
        names.append("local")
    return names


def lipschitz_certified(logits: torch.Tensor, y: torch.Tensor, lipschitz: float, eps: float) -> torch.Tensor:
    """z_y - max_{i != y} z_i > sqrt(2) L eps (and the prediction is y)."""
    return certified_radius_lipschitz(logits, y, lipschitz) > eps


def certified_radius_lipschitz(logits: torch.Tensor, y: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """The largest radius the Lipschitz margin certifies (0 for a wrong prediction)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return ((true - others) / (math.sqrt(2.0) * lipschitz)).clamp_min(0.0)


def _margin_positive(worst: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = worst.gather(1, y[:, None]).squeeze(1)
    others = worst.scatter(1, y[:, None], float("-inf")).amax(1)
    return true > others


def bcp_certified(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norms: LayerNorms) -> torch.Tensor:
    return _margin_positive(bcp_worst_logits(model, x, y, eps, norms.upper, translation_iterations=None), y)


def local_certified(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                    norms: LayerNorms) -> torch.Tensor:
    worst, _ = local_worst_logits(model, x, y, eps, norms.upper, power=None, index=None,
                                  power_iterations=0, translation_iterations=None)
    return _margin_positive(worst, y)


def certified_at(name: str, model: CertifiableNet, x: torch.Tensor, y: torch.Tensor,
                 logits: torch.Tensor, radius: float, norms: LayerNorms) -> torch.Tensor:
    """Bool per example: correctly classified and certified by `name` at `radius`."""
    correct = logits.argmax(1) == y
    if radius == 0:
        return correct
    if name == "lipschitz":
        certified = lipschitz_certified(logits, y, norms.lipschitz_upper, radius)
    elif name == "bcp":
        certified = bcp_certified(model, x, y, radius, norms)
    elif name == "local":
        certified = local_certified(model, x, y, radius, norms)
    else:
        raise ValueError(f"unknown certifier '{name}'")
    return certified & correct


def certify_batch(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                  norms: LayerNorms, certifiers: list[str]) -> dict[str, torch.Tensor]:
    """{certifier: certified (bool per example)}; correct predictions only."""
    logits = model(x)
    return {name: certified_at(name, model, x, y, logits, eps, norms) for name in certifiers}
