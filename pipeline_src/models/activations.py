"""The activations of the certified networks. Each is 1-Lipschitz per unit,
which the Lipschitz/box bounds rely on."""
from __future__ import annotations

import torch
from torch import nn


class MaxMin(nn.Module):
    """GroupSort with groups of 2 (Anil et al. 2019): units (2i, 2i+1) along the
    channel (or feature) axis become (max, min). Gradient-norm preserving."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 2:
            raise ValueError(f"MaxMin needs an even number of channels, got {x.shape[1]}")
        pairs = x.unflatten(1, (x.shape[1] // 2, 2))
        return torch.stack([pairs.amax(2), pairs.amin(2)], dim=2).flatten(1, 2)


class ClippedReLU(nn.Module):
    """min(max(x, 0), theta) with a learnable theta per element (Huang et al. 2021):
    saturated units have a zero local Lipschitz constant, which LocalBCP exploits.
    Training code keeps theta >= 0 after each step (`clamp_theta_`)."""

    def __init__(self, feature_shape: tuple[int, ...], theta_init: float):
        super().__init__()
        self.theta = nn.Parameter(torch.full(feature_shape, float(theta_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.theta)

    @torch.no_grad()
    def clamp_theta_(self) -> None:
        self.theta.clamp_(min=0.0)


ACTIVATIONS = ("relu", "maxmin", "clipped_relu")


def make_activation(name: str, feature_shape: tuple[int, ...], theta_init: float) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "maxmin":
        return MaxMin()
    if name == "clipped_relu":
        return ClippedReLU(feature_shape, theta_init)
    raise ValueError(f"model.activation: unknown activation '{name}' (expected one of {ACTIVATIONS})")
