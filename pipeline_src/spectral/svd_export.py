"""The offline SVD export stage (Duet, section 4.3): the factors of every
weight layer of the vanilla model, computed once so that training never takes
an SVD of the vanilla weights.

Per layer: the matrix view W (out x in for a dense layer, C_out x C_in*k*k for
a conv), its full SVD W = U diag(S) V^T, the top-r factors for each rank in
`svd.ranks`, and the spectral norm of the layer as an operator on its input
(stride and padding included) as a power-iteration estimate and a guaranteed
upper bound. Their product over the layers is the network's global Lipschitz
bound (estimate and guaranteed).

The guide is checked first by the check the caller hands in (the svd stage:
`training.vanilla_checks.check_guide`, a stage check above this layer).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from ..io import save_json, save_torch, state_dict_sha256
from ..models import build_model
from ..paths import RunLayout
from .operator_norm import matrix_view, operator_norm_upper_bound, power_iteration


def load_vanilla(path: Path, model_params: dict) -> torch.nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("arch", "activation"):
        if state["model"][key] != model_params[key]:
            raise ValueError(f"{path}: a model with {key} {state['model'][key]}, "
                             f"but model.{key} is {model_params[key]}")
    model = build_model(state["model"])
    model.load_state_dict(state["state_dict"])
    return model.eval()


def export_svd(params: dict, root: Path, check_guide: Callable[[Path, str, dict], dict]) -> dict:
    """Write the vanilla model's SVD factors and their summary. `check_guide(metrics_path,
    weights_sha256, params)` raises unless the guide's metrics describe these weights and
    show it learned (`training.vanilla_checks.check_guide`)."""
    layout = RunLayout.of(params)
    cfg = params["svd"]
    model_path = root / layout.vanilla_model
    model = load_vanilla(model_path, params["model"])
    # A guide near chance (or metrics of other weights) stops here, before Duet reads it. A
    # model without a metrics file beside it is no vanilla stage's (the benchmark's stand-in
    # guide, a test's): its factors are exported unchecked, and the export says so.
    metrics_path = root / layout.vanilla_metrics
    if metrics_path.is_file():
        check_guide(metrics_path, state_dict_sha256(model.state_dict()), params)
    else:
        print(f"[svd] {metrics_path} not found: the guide's accuracy is not checked")
    layers, summary_layers = svd_factors(model, cfg, params["run"]["seed"])
    lipschitz_estimate = math.prod(layer["operator_norm_estimate"] for layer in layers)
    lipschitz_upper = math.prod(layer["operator_norm_upper_bound"] for layer in layers)
    metadata = {"arch": params["model"]["arch"], "activation": params["model"]["activation"],
                "ranks": sorted(cfg["ranks"]), "vanilla_weights_sha256": state_dict_sha256(model.state_dict()),
                "operator_norm_method": {
                    "estimate": f"power iteration on the operator (up to {cfg['power_iterations']} steps)",
                    "upper_bound": "exact float64 SVD (dense) / polyphase circular-conv DFT bound (conv)"},
                "lipschitz_estimate": lipschitz_estimate, "lipschitz_upper_bound": lipschitz_upper}
    save_torch({"metadata": metadata, "layers": layers}, root / layout.svd_factors)
    summary = {**metadata, "profile": params["profile"], "layers": summary_layers}
    save_json(summary, root / layout.svd_summary)
    print(f"[svd] {len(layers)} layers, Lipschitz bound {lipschitz_upper:.4g} "
          f"(power-iteration estimate {lipschitz_estimate:.4g})")
    return summary


def svd_factors(model: torch.nn.Module, cfg: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """(factors, summary) of every weight layer of `model`, `cfg` the params' svd block:
    the export's layers (U, S, V in full and at each rank, operator-norm estimate and
    guaranteed bound) and their summary rows."""
    generator = torch.Generator().manual_seed(seed)
    ranks = sorted(cfg["ranks"])
    layers, summary_layers = [], []
    for layer in model.weight_layers():
        weight = matrix_view(layer.module).detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        if ranks[-1] > len(s):
            print(f"[svd] layer {layer.name}: rank {ranks[-1]} exceeds its {len(s)} singular values; "
                  f"those ranks keep all {len(s)}")
        estimate, _ = power_iteration(layer, cfg["power_iterations"], cfg["power_tolerance"],
                                      generator=generator)
        upper = operator_norm_upper_bound(layer)
        energy = (s**2).cumsum(0) / (s**2).sum()
        top = {r: {"U": u[:, :r].float().contiguous(), "S": s[:r].float().contiguous(),
                   "V": vh[:r].t().float().contiguous()} for r in ranks}
        layers.append({
            "index": layer.index, "kind": layer.kind, "name": layer.name,
            "input_shape": layer.input_shape, "output_shape": layer.output_shape,
            "matrix_shape": tuple(weight.shape),
            "U": u.float(), "S": s.float(), "V": vh.t().float().contiguous(),
            "top": top,
            "operator_norm_estimate": estimate, "operator_norm_upper_bound": upper,
        })
        summary_layers.append({
            "index": layer.index, "name": layer.name, "kind": layer.kind,
            "matrix_shape": list(weight.shape),
            "sigma_max": s[0].item(), "sigma_min": s[-1].item(),
            "energy_top_r": {str(r): energy[min(r, len(s)) - 1].item() for r in ranks},
            "operator_norm_estimate": estimate,
            "operator_norm_upper_bound": upper,
            "upper_bound_over_estimate": upper / estimate,
        })
    return layers, summary_layers


def load_factors(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)
