"""The certification stage: certify the test set of a trained model at eps with
every certifier that applies, and the certified-radius curve (0 .. 2 eps).

Numerics: clean accuracy is the deployed float32 model's (TF32 off); every
certificate is computed on a float64 copy of the model under the relative-margin
rule of `certifiers` (MARGIN_RTOL).

Writes metrics.json (clean accuracy, certified accuracy per certifier, the
method's own certifier as the headline, the curve, and which spectral bounds
were used with how far they sit above the power-iteration estimates) and
certified.pt (per test example, per certifier) for the attack cross-check.

For clipped-ReLU models metrics.json also has `reference_estimates`: the
certified accuracy at eps that the LocalBCP reference's evaluation would report,
every hidden layer's masked norm (convolutions included) estimated by
per-example masked power iteration (`bounds.local.local_estimated_state`; the
reference's stopping rule, in float32, at most its 2000 iterations on a GPU:
`reference_iterations`), everything else (boxes, masks, the translation bound,
the relative-margin rule) as the "local" certificate. An estimate is no upper bound: that number is not a
certificate, and enters neither certified.pt nor the attack cross-check."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ..bounds.bcp import certified_translation
from ..bounds.local import REFERENCE_POWER_ITERATIONS, REFERENCE_TOLERANCE, local_estimated_state
from ..data.cifar import data_record, load_cache
from ..data.loader import DeviceBatches
from ..data.subsets import evaluated_test_split
from ..runs import method_runs
from ..io import git_commit, state_dict_sha256, save_json, save_torch
from ..methods import METHODS
from ..models.architectures import CertifiableNet
from ..models.loading import load_trained
from ..paths import RunLayout
from ..runtime import device_name, make_generator, resolve_device, stage_seed
from ..bounds.certifiers import MARGIN_RTOL, certified_curve, certifiers_for, margin_certified
from ..bounds.numerics import float64_model, layer_norms, sound_numerics

NUMERICS = (f"certificates in float64 (a float64 copy of the model, float64 inputs, bounds and "
            f"translation), TF32 off, eval mode; a margin is certified only if it exceeds "
            f"{MARGIN_RTOL:g} x (|z_y| + |z_i| + |t_i|) for every wrong class i; guaranteed spectral "
            f"upper bounds; BCP translation bounded by Lagrangian duality; clean accuracy from the "
            f"float32 model")
REFERENCE_NOTE = "reference estimate, not guaranteed: masked conv norms by power iteration"


def reference_iterations(cfg: dict) -> int:
    """The cap on the reference estimate's power iterations (`certify.reference_power_iterations`:
    the reference's 2000 in params.yaml; the smoke profile sets a few, since 2000 per-example
    masked iterations through 6C2F's convolutions take minutes per hundred images on a CPU).
    The count used is written beside the estimate."""
    return int(cfg["reference_power_iterations"])


def reference_estimate_certified(model64: CertifiableNet, x: torch.Tensor, y: torch.Tensor,
                                 logits: torch.Tensor, eps: float, norms, generator: torch.Generator,
                                 iterations: int = REFERENCE_POWER_ITERATIONS) -> torch.Tensor:
    """Per example: correct and 'certified' at eps with every masked norm a power-iteration
    estimate (the LocalBCP reference's evaluation). Not a certificate. Only the correctly
    classified points are iterated (the others count as not certified, as in the reference)."""
    correct = logits.argmax(1) == y
    estimated = torch.zeros_like(correct)
    index = correct.nonzero().squeeze(1)
    if len(index):
        state, exact_logits = local_estimated_state(model64, x[index].double(), eps, norms.upper, generator,
                                                    iterations=iterations)
        estimated[index] = margin_certified(exact_logits, certified_translation(model64, state, y[index]),
                                            y[index])
    return estimated


def certify_model(params: dict, method: str, root: Path) -> dict:
    layout = RunLayout.of(params)
    cfg = params["certify"]
    device = resolve_device(params["run"]["device"])
    data = load_cache(root / layout.data_cache, params)
    model = load_trained(root / layout.train(method, "model.pt"), device)
    test_x, test_y = evaluated_test_split(data, cfg)
    test = DeviceBatches(test_x, test_y, cfg["batch_size"], device)
    eps = cfg["eps"]
    steps = cfg["radius_points"] - 1
    radii = [2.0 * eps * k / steps for k in range(steps + 1)]
    certifiers = certifiers_for(model)
    reference = model.activation_name == "clipped_relu"
    iterations = reference_iterations(cfg)
    generator = make_generator(stage_seed(params["run"]["seed"], "certify", method, "reference"), device)
    with sound_numerics(model):
        norms = layer_norms(model, cfg["power_iterations"], params["run"]["seed"])
        model64 = float64_model(model)
        # Every radius of the curve, and eps itself, evaluated once per certifier.
        evaluated = sorted(set(radii) | {eps})
        correct, flags, estimated = [], {name: [] for name in certifiers}, []
        counts = {name: torch.zeros(len(evaluated)) for name in certifiers}
        for x, y in tqdm(test, desc=f"certify {method}", leave=False, mininterval=2.0):
            logits = model(x)
            exact_logits = model64(x.double())
            correct.append((logits.argmax(1) == y).cpu())
            for name in certifiers:
                curve = certified_curve(name, model64, x, y, logits, evaluated, norms, exact_logits)
                for k, certified in enumerate(curve):
                    counts[name][k] += certified.sum().item()
                flags[name].append(curve[evaluated.index(eps)].cpu())
            if reference:
                estimated.append(reference_estimate_certified(model64, x, y, logits, eps, norms,
                                                              generator, iterations).cpu())
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
        "numerics": NUMERICS,
        "data": data_record(data.provenance),
        "device": device_name(device),
        "git_commit": git_commit(root),
    }
    if reference:
        metrics["reference_estimates"] = {
            "local_masked_power_iteration": 100.0 * torch.cat(estimated).float().mean().item(),
            "note": REFERENCE_NOTE,
            "power_iterations": iterations, "tolerance": REFERENCE_TOLERANCE}
    save_torch({"correct": correct, "certified": flags, "eps": eps},
               root / layout.certify(method, "certified.pt"))
    save_json(metrics, root / layout.certify(method, "metrics.json"))
    print(f"[certify] {method}: clean {metrics['clean_accuracy']:.2f}% | " + " | ".join(
        f"{name} {acc:.2f}%" for name, acc in metrics["certified_accuracy"].items())
        + f" | Lipschitz bound {norms.lipschitz_upper:.4g} (estimate {norms.report()['lipschitz_estimate']:.4g})"
        + (f" | reference estimate (not a certificate) "
           f"{metrics['reference_estimates']['local_masked_power_iteration']:.2f}%" if reference else ""))
    return metrics
