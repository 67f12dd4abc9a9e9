"""The numerics of sound certification: what every certifier runs on and every
stage that certifies (or scores a model's spectral norms) sets up.

  * `sound_numerics`: TF32 off for matmul and cuDNN, eval mode, no gradients
    (`fp32_numerics`: the same, gradients left as they were, for the attack);
  * `float64_model`: a float64 copy of the trained float32 model (the same
    network: float32 weights are exact in float64), on which the certifiers run
    with float64 inputs;
  * `layer_norms`: every layer's guaranteed upper bound of its operator norm
    (`spectral.operator_norm.operator_norm_upper_bound`, float64 python floats),
    checked against a power-iteration estimate, kept beside it for the report."""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..models.architectures import CertifiableNet
from ..spectral.operator_norm import operator_norm_upper_bound, power_iteration


@contextmanager
def fp32_numerics(model: torch.nn.Module):
    """TF32 off for matmul and cuDNN, eval mode; restores the previous settings.
    Gradients stay as they were (the attack stage needs them)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    was_training = model.training
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model.eval()
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        model.train(was_training)


@contextmanager
def sound_numerics(model: CertifiableNet):
    """TF32 off, eval mode, no gradients; restores the previous settings. (The
    certifiers themselves move to float64: `float64_model`.)"""
    with fp32_numerics(model), torch.no_grad():
        yield


def float64_model(model: CertifiableNet) -> CertifiableNet:
    """The model itself if it is float64 already, else a float64 copy in eval mode
    (the float32 weights are exactly representable, so it is the same network)."""
    if all(p.dtype == torch.float64 for p in model.parameters()):
        return model
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
        p.requires_grad_(False)
    return twin.double().eval()


@dataclass
class LayerNorms:
    upper: list[float]      # guaranteed
    estimate: list[float]   # power iteration, for the report

    @property
    def lipschitz_upper(self) -> float:
        return math.prod(self.upper)

    @property
    def sub_lipschitz_upper(self) -> float:
        """The product of the guaranteed bounds of every layer but the last (GloRo's K_sub)."""
        return math.prod(self.upper[:-1])

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
