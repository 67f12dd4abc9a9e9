"""Loading a trained model written by a training stage (`state_dict` and the
model block it was built from)."""
from __future__ import annotations

from pathlib import Path

import torch

from .architectures import CertifiableNet, build_model


def load_trained(path: Path, device: torch.device) -> CertifiableNet:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(state["model"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def copy_weight_layers(source: CertifiableNet, target: CertifiableNet) -> None:
    """Copy the weights and biases of every weight layer (same architecture; the
    activations, and their parameters such as clipped-ReLU thresholds, may differ)."""
    if source.arch != target.arch:
        raise ValueError(f"cannot copy a {source.arch} model's weights into a {target.arch} model")
    with torch.no_grad():
        for mine, theirs in zip(target.weight_layers(), source.weight_layers()):
            mine.module.weight.copy_(theirs.module.weight)
            mine.module.bias.copy_(theirs.module.bias)
