"""The certification stage: certify the test set of a trained model at eps with
every certifier that applies, and the certified-radius curve (0 .. 2 eps).

Writes metrics.json (clean accuracy, certified accuracy per certifier, the
method's own certifier as the headline, the curve, and which spectral bounds
were used with how far they sit above the power-iteration estimates) and
certified.pt (per test example, per certifier) for the attack cross-check."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..data.cifar import load_cache
from ..data.loader import DeviceBatches
from ..config import method_runs
from ..io import git_commit, state_dict_sha256, save_json, save_torch
from ..methods import METHODS
from ..models import build_model
from ..paths import RunLayout
from ..training.common import device_name, resolve_device
from .certifiers import certified_at, certifiers_for, layer_norms, sound_numerics


def evaluated_test_split(data, certify_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images certified and attacked: all, or the first `test_images`."""
    limit = certify_cfg["test_images"] or len(data.test_y)
    return data.test_x[:limit], data.test_y[:limit]


def load_trained(path: Path, device: torch.device) -> torch.nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(state["model"])
    model.load_state_dict(state["state_dict"])
    return model.to(device).eval()


def certify_model(params: dict, method: str, root: Path) -> dict:
    layout = RunLayout.of(params)
    cfg = params["certify"]
    device = resolve_device(params["run"]["device"])
    data = load_cache(root / layout.data_cache)
    model = load_trained(root / layout.train(method, "model.pt"), device)
    test_x, test_y = evaluated_test_split(data, cfg)
    test = DeviceBatches(test_x, test_y, cfg["batch_size"], device)
    eps = cfg["eps"]
    steps = cfg["radius_points"] - 1
    radii = [2.0 * eps * k / steps for k in range(steps + 1)]
    certifiers = certifiers_for(model)
    with sound_numerics(model):
        norms = layer_norms(model, cfg["power_iterations"], params["run"]["seed"])
        # Every radius of the curve, and eps itself, evaluated once per certifier.
        evaluated = sorted(set(radii) | {eps})
        correct, flags = [], {name: [] for name in certifiers}
        counts = {name: torch.zeros(len(evaluated)) for name in certifiers}
        for x, y in tqdm(test, desc=f"certify {method}", leave=False, mininterval=2.0):
            logits = model(x)
            correct.append((logits.argmax(1) == y).cpu())
            for name in certifiers:
                for k, radius in enumerate(evaluated):
                    certified = certified_at(name, model, x, y, logits, radius, norms)
                    counts[name][k] += certified.sum().item()
                    if radius == eps:
                        flags[name].append(certified.cpu())
        curve = {name: torch.stack([c[evaluated.index(r)] for r in radii]) for name, c in counts.items()}
    n = len(test_y)
    flags = {name: torch.cat(v) for name, v in flags.items()}
    correct = torch.cat(correct)
    own = METHODS[method_runs(params)[method].method].certifier
    metrics = {
        "stage": "certify", "method": method, "profile": params["profile"], "eps": eps,
        "test_images": n,
        # Ties this file to the trained model it evaluated (train metrics.json).
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "clean_accuracy": 100.0 * correct.float().mean().item(),
        "certified_accuracy": {name: 100.0 * f.float().mean().item() for name, f in flags.items()},
        "headline_certifier": own,
        "headline_certified_accuracy": 100.0 * flags[own].float().mean().item(),
        "radius_curve": {"radii": radii,
                         **{name: (100.0 * c / n).tolist() for name, c in curve.items()}},
        "spectral_norms": norms.report(),
        "numerics": "fp32, TF32 off, eval mode; guaranteed spectral upper bounds; BCP translation "
                    "bounded by Lagrangian duality",
        "data": {key: data.provenance[key] for key in ("source", "sha256", "lossy_jpeg", "note")},
        "device": device_name(device),
        "git_commit": git_commit(root),
    }
    save_torch({"correct": correct, "certified": flags, "eps": eps},
               root / layout.certify(method, "certified.pt"))
    save_json(metrics, root / layout.certify(method, "metrics.json"))
    print(f"[certify] {method}: clean {metrics['clean_accuracy']:.2f}% | " + " | ".join(
        f"{name} {acc:.2f}%" for name, acc in metrics["certified_accuracy"].items())
        + f" | Lipschitz bound {norms.lipschitz_upper:.4g} (estimate {norms.report()['lipschitz_estimate']:.4g})")
    return metrics
