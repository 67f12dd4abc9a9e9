"""Interval bound propagation: elementwise boxes [lower, upper] through the
layers of a CertifiableNet (Gowal et al. 2019)."""
from __future__ import annotations

import torch
from torch import nn

from ..models.activations import ClippedReLU, MaxMin
from ..models.architectures import WeightLayer


def interval_linear(layer: WeightLayer, lower: torch.Tensor, upper: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of W x + b over x in [lower, upper]: W mid + b -/+ |W| rad."""
    module = layer.module
    mid, rad = (upper + lower) / 2, (upper - lower) / 2
    if isinstance(module, nn.Conv2d):
        centre = nn.functional.conv2d(mid, module.weight, module.bias, module.stride, module.padding)
        spread = nn.functional.conv2d(rad, module.weight.abs(), None, module.stride, module.padding)
    else:
        centre = nn.functional.linear(mid, module.weight, module.bias)
        spread = nn.functional.linear(rad, module.weight.abs())
    return centre - spread, centre + spread


def interval_activation(activation: nn.Module, lower: torch.Tensor, upper: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The box of an activation's outputs over a box of inputs (exact per unit)."""
    if isinstance(activation, (nn.ReLU, ClippedReLU)):
        # Monotone elementwise: the ends map to the ends.
        return activation(lower), activation(upper)
    if isinstance(activation, MaxMin):
        lo = lower.unflatten(1, (lower.shape[1] // 2, 2))
        hi = upper.unflatten(1, (upper.shape[1] // 2, 2))
        new_lo = torch.stack([lo.amax(2), lo.amin(2)], dim=2).flatten(1, 2)
        new_hi = torch.stack([hi.amax(2), hi.amin(2)], dim=2).flatten(1, 2)
        return new_lo, new_hi
    raise TypeError(f"no interval rule for activation {type(activation).__name__}")


def flatten_if_needed(layer: WeightLayer, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1) if layer.flatten_before else tensor
