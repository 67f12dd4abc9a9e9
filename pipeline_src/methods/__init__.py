"""Certified training methods; importing this package registers them all."""
from pathlib import Path

import torch

from . import bcp, duet, duet_local, gloro, lmt, localbcp  # noqa: F401  (registration)
from .base import METHODS, CertifiedMethod, StepBounds, build_method

__all__ = ["METHODS", "CertifiedMethod", "StepBounds", "build_method", "method_context"]


def method_context(name: str, root: Path, layout, device: torch.device) -> dict:
    """What a method may read of the run: a method with Duet's similarity term
    (`reads_guide`: Duet, Duet-local) also gets its guide (the vanilla model and
    its SVD factors)."""
    context = {"root": root, "layout": layout, "device": device}
    if METHODS[name].reads_guide:
        context["guide"] = duet.load_guide(root, layout, device)
    return context
