"""Certified training methods; importing this package registers them all: it imports
every module of its folder (a method module `@register`s its class), so a new method
needs no line here. `code_deps` knows this package does so (IMPORTS_EVERY_MODULE), so
every stage that imports it runs, and depends on, every method module."""
import importlib
import pkgutil
from pathlib import Path

import torch

from .base import METHODS, CertifiedMethod, StepBounds, build_method
from ..runs import reads_guide_model
from .duet import load_guide, load_guide_model, untrained_guide

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CertifiedMethod", "StepBounds", "build_method", "method_context", "untrained_guide"]


def method_context(name: str, cfg: dict, root: Path, layout, device: torch.device,
                   guide: dict | None = None) -> dict:
    """What a run of method `name` with params block `cfg` may read: a method with Duet's
    similarity term (`similarity_term`: Duet, Duet-local) also gets its guide (the vanilla
    model and its SVD factors, or `guide` when the caller hands another:
    `duet.untrained_guide`); one that `reads_guide` (BCP + distillation) the vanilla model,
    unless `cfg` makes the run its no-guide control (the DAG then gives it no vanilla model)."""
    context = {"root": root, "layout": layout, "device": device}
    facts = METHODS[name].facts
    if facts.similarity_term:
        context["guide"] = guide if guide is not None else load_guide(root, layout, device)
    elif reads_guide_model(name, cfg):
        context["guide"] = {"model": load_guide_model(root, layout, device)}
    return context
