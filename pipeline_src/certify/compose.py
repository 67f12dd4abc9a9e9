"""The compose stage: certify or predict (issue 22). A trained certified run g (a method of
`compose.methods`, one with a Lipschitz margin: LMT) composed with the vanilla guide h
(`bounds.selection`: g where g's GloRo radius is at least tau, h elsewhere), measured at every
tau of `compose.taus` (units of eps) on the validation and the test split, with the guide and
with its controls in h's place (`compose.guides`: the second vanilla model, an untrained
network): a gain that any accurate model, or none, would give is not the guide's.

tau is chosen on the validation split only: the largest validation clean accuracy among the taus
whose validation certified accuracy is at least the paired reference run's (`compose.reference`,
BCP of the same seed; its `val_certified_accuracy`, the training stage's sound certificate of
its selected epoch) minus `compose.certified_slack`; where no tau reaches it, the tau with the
highest validation certified accuracy (`meets_reference: false`). At that tau the composite is
attacked on the test split (`certify.compose_attack`) and every certified point cross-checked:
one the attacks hand to h or flip stops the stage.

Numerics as the certify stage's: g's selector, predictions and certificates on a float64 copy
of g (TF32 off, eval mode, guaranteed spectral bounds), h in float32 (its predictions are
never certified)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from ..bounds.numerics import LayerNorms, float64_model, fp32_numerics, layer_norms, sound_numerics
from ..bounds.selection import composite_certified, composite_predictions
from ..config import ParamsError
from ..errors import StageError
from ..data.cifar import data_record, load_cache
from ..data.subsets import evaluated_test_split
from ..io import git_commit, load_json, save_json, state_dict_sha256
from ..models.architectures import CertifiableNet
from ..models.loading import load_trained
from ..paths import RunLayout
from ..runs import compose_reference_run, compose_runs
from ..runtime import device_name, make_generator, resolve_device, stage_seed
from ..training.common import vanilla_initial_model
from .attack import UnsoundCertificateError
from .compose_attack import ATTACKS, attack_composite


def composite_curve(model: CertifiableNet, guide: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    eps: float, taus: list[float], norms: LayerNorms, batch_size: int = 500) -> list[dict]:
    """For each tau (in input-space units, as eps): the composite's clean accuracy, its
    certified accuracy at eps and at 2 eps, and the fraction of points g answers (%). `x`
    images in [0, 1] (float) or uint8."""
    n = len(y)
    clean = torch.zeros(len(taus))
    certified = torch.zeros(len(taus), 2)
    answered = torch.zeros(len(taus))
    with torch.no_grad(), sound_numerics(model):
        model64 = float64_model(model)
        weight = model64.weight_layers()[-1].module.weight
        k_sub = norms.sub_lipschitz_upper
        for start in range(0, n, batch_size):
            xb = x[start:start + batch_size]
            xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb
            yb = y[start:start + batch_size]
            exact = model64(xb.double())
            guide_logits = guide(xb)
            for k, tau in enumerate(taus):
                predicted, selected = composite_predictions(exact, guide_logits, weight, k_sub, tau)
                clean[k] += (predicted == yb).sum()
                answered[k] += selected.sum()
                for j, radius in enumerate((eps, 2.0 * eps)):
                    certified[k, j] += composite_certified(exact, yb, weight, k_sub, radius, tau).sum()
    return [{"tau": tau, "clean_accuracy": 100.0 * clean[k].item() / n,
             "certified_accuracy": 100.0 * certified[k, 0].item() / n,
             "certified_accuracy_2eps": 100.0 * certified[k, 1].item() / n,
             "certified_model_answers": 100.0 * answered[k].item() / n} for k, tau in enumerate(taus)]


def choose_tau(validation_curve: list[dict], reference_certified: float, slack: float) -> dict:
    """The validation rule of the module: {tau, meets_reference}."""
    target = reference_certified - slack
    reaching = [point for point in validation_curve if point["certified_accuracy"] >= target]
    if reaching:
        best = max(reaching, key=lambda point: (point["clean_accuracy"], -point["tau"]))
        return {"tau": best["tau"], "meets_reference": True}
    best = max(validation_curve, key=lambda point: (point["certified_accuracy"], -point["tau"]))
    return {"tau": best["tau"], "meets_reference": False}


def composition_guides(params: dict, root: Path, device: torch.device) -> dict[str, torch.nn.Module]:
    """{name: h} for `compose.guides`: `vanilla` the guide, `vanilla_control` the second vanilla
    model (another seed, Table 1's control), `untrained` the vanilla model's initial weights."""
    layout = RunLayout.of(params)
    loaders = {"vanilla": lambda: load_trained(root / layout.vanilla_model, device),
               "vanilla_control": lambda: load_trained(root / layout.vanilla_control("model.pt"), device),
               "untrained": lambda: vanilla_initial_model(params).to(device).eval()}
    return {name: loaders[name]() for name in params["compose"]["guides"]}


def compose_run(params: dict, run: str, root: Path) -> dict:
    if run not in compose_runs(params):
        raise ParamsError(f"compose --method {run}: not a run of compose.methods "
                          f"({', '.join(params['compose']['methods']) or 'none'}) in profile {params['profile']}")
    layout = RunLayout.of(params)
    cfg, pgd = params["compose"], params["pgd"]
    eps, seed = params["certify"]["eps"], params["run"]["seed"]
    device = resolve_device(params["run"]["device"])
    data = load_cache(root / layout.data_cache, params)
    model = load_trained(root / layout.train(run, "model.pt"), device)
    guides = composition_guides(params, root, device)
    reference_run = compose_reference_run(params, run)
    reference = load_json(root / layout.train(reference_run, "metrics.json"))
    taus = [float(t) * eps for t in cfg["taus"]]
    splits = {"val": (data.val_x, data.val_y), "test": evaluated_test_split(data, params["certify"])}
    with sound_numerics(model):
        norms = layer_norms(model, params["certify"]["power_iterations"], seed)
        curves = {name: {split: composite_curve(model, guide, x.to(device), y.to(device), eps, taus, norms)
                         for split, (x, y) in splits.items()} for name, guide in guides.items()}
    target = reference.get("val_certified_accuracy")
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise StageError(f"{reference_run}: its validation certified accuracy is {target}; tau cannot be chosen "
                         "against it")
    chosen = choose_tau(curves["vanilla"]["val"], target, cfg["certified_slack"])
    k = taus.index(chosen["tau"])

    test_x, test_y = splits["test"]
    generator = make_generator(stage_seed(seed, "compose", run), device)
    robust, violated, certified_points = [], [], 0
    model64 = float64_model(model)
    weight64 = model64.weight_layers()[-1].module.weight
    with fp32_numerics(model):
        for start in tqdm(range(0, len(test_y), pgd["batch_size"]), desc=f"compose {run}", leave=False):
            x = test_x[start:start + pgd["batch_size"]].to(device).float() / 255.0
            y = test_y[start:start + pgd["batch_size"]].to(device)
            with torch.no_grad():
                certified = composite_certified(model64(x.double()), y, weight64, norms.sub_lipschitz_upper, eps,
                                                chosen["tau"])
            certified_points += int(certified.sum())
            kept, broken = attack_composite(model, model64, guides["vanilla"], x, y, certified, eps, chosen["tau"],
                                            norms.sub_lipschitz_upper, pgd, generator)
            robust.append(kept.cpu())
            violated.append(broken.cpu())
    robust, violated = torch.cat(robust), torch.cat(violated)
    test_point = curves["vanilla"]["test"][k]
    # The attacked points are the curve's certified points (two passes over the same certificate).
    assert certified_points == round(test_point["certified_accuracy"] * len(test_y) / 100.0), "certificates differ"
    metrics = {
        "stage": "compose", "method": run, "profile": params["profile"], "eps": eps,
        "taus_over_eps": list(cfg["taus"]), "guides": list(guides),
        "reference": {"run": reference_run, "val_certified_accuracy": reference["val_certified_accuracy"],
                      "certified_slack": cfg["certified_slack"]},
        "chosen": {**chosen, "tau_over_eps": cfg["taus"][k], "val": curves["vanilla"]["val"][k],
                   "test": test_point},
        # tau = 0 (always in the grid): the selector keeps g, the certificate is GloRo's: the run alone.
        "certified_model_alone": curves["vanilla"]["test"][taus.index(0.0)],
        "curves": curves,
        "controls_at_chosen_tau": {name: curves[name]["test"][k] for name in guides if name != "vanilla"},
        "attack": {"attacks": list(ATTACKS), "steps": pgd["steps"], "step_size": eps * pgd["step_size_factor"],
                   "restarts": pgd["restarts"], "robust_accuracy": 100.0 * robust.float().mean().item(),
                   "certified_points": certified_points,
                   "certified_points_broken": int(violated.sum())},
        "test_images": len(test_y), "val_images": len(splits["val"][1]),
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "guide_weights_sha256": {name: state_dict_sha256(guide.state_dict()) for name, guide in guides.items()},
        "spectral_norms": norms.report(),
        "numerics": "g in float64 (selector, predictions, certificates), guaranteed spectral bounds, TF32 off; "
                    "h in float32; attacks' gradients on the float32 models",
        "data": data_record(data.provenance),
        "device": device_name(device), "git_commit": git_commit(root),
    }
    if violated.any():
        index = torch.nonzero(violated).flatten().tolist()
        raise UnsoundCertificateError(
            f"{run}: {len(index)} points the composite certified at eps {eps} (tau {chosen['tau']:.4g}) were "
            f"handed to the guide or flipped by an attack: indices {index[:50]}{' ...' if len(index) > 50 else ''}")
    save_json(metrics, root / layout.compose(run, "metrics.json"))
    print(f"[compose] {run}: tau {cfg['taus'][k]:g} eps ({'meets' if chosen['meets_reference'] else 'misses'} "
          f"{reference_run}'s val certified {reference['val_certified_accuracy']:.2f} - {cfg['certified_slack']:g}) | "
          f"test clean {test_point['clean_accuracy']:.2f}% certified {test_point['certified_accuracy']:.2f}% "
          f"attacked {metrics['attack']['robust_accuracy']:.2f}% | g alone "
          f"{metrics['certified_model_alone']['clean_accuracy']:.2f} / "
          f"{metrics['certified_model_alone']['certified_accuracy']:.2f}% | "
          f"{metrics['attack']['certified_points']} certified points, none handed to h or broken")
    return metrics
