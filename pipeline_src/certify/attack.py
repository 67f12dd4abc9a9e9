"""The PGD stage: l2 attacks at eps from a maintained library (torchattacks'
PGDL2 with random starts, and its l2 APGD), the PGD accuracy, and the
cross-check of every certificate: each test point that any certifier
certified is attacked, and a certified point that an attack breaks stops the
pipeline (it would be a bug in a bound). Attacks run only on the points still
robust (correctly classified, unbroken by the attacks before): the measure is the
same (robust = classified correctly and surviving every attack), and a model at
36 % clean accuracy costs about a third of the attacks."""
from __future__ import annotations

from pathlib import Path

import torch
import torchattacks

from ..data.cifar import data_record, load_cache
from ..data.subsets import evaluated_test_split
from ..errors import StageError
from ..io import git_commit, state_dict_sha256, save_json
from ..paths import RunLayout
from ..runtime import device_name, resolve_device
from ..bounds.numerics import fp32_numerics
from ..models.loading import load_trained


class UnsoundCertificateError(StageError, RuntimeError):
    pass


def _attacks(model, cfg: dict, eps: float, seed: int):
    attacks = []
    for restart in range(cfg["restarts"]):
        pgd = torchattacks.PGDL2(model, eps=eps, alpha=eps * cfg["step_size_factor"], steps=cfg["steps"],
                                 random_start=True)
        attacks.append((f"pgd_l2_restart{restart}", pgd, seed + restart))
    if cfg["apgd"]:
        attacks.append(("apgd_l2", torchattacks.APGD(model, norm="L2", eps=eps, steps=cfg["steps"],
                                                     n_restarts=cfg["restarts"], seed=seed), seed))
    return attacks


def attack_model(params: dict, method: str, root: Path) -> dict:
    layout = RunLayout.of(params)
    cfg, eps, seed = params["pgd"], params["certify"]["eps"], params["run"]["seed"]
    device = resolve_device(params["run"]["device"])
    data = load_cache(root / layout.data_cache, params)
    model = load_trained(root / layout.train(method, "model.pt"), device)
    certificates = torch.load(root / layout.certify(method, "certified.pt"), weights_only=False)
    certified_any = torch.stack(list(certificates["certified"].values())).any(0)

    test_x, test_y = evaluated_test_split(data, params["certify"])
    robust = []
    with fp32_numerics(model):
        for start in range(0, len(test_y), cfg["batch_size"]):
            x = test_x[start:start + cfg["batch_size"]].to(device).float() / 255.0
            y = test_y[start:start + cfg["batch_size"]].to(device)
            with torch.no_grad():
                survived = model(x).argmax(1) == y
            # Each attack runs on the points that are still robust: a misclassified point,
            # or one an earlier attack broke, is not robust whatever the next attack does.
            # Every certified point is correctly classified, so every one is attacked.
            for _, attack, attack_seed in _attacks(model, cfg, eps, seed):
                alive = torch.nonzero(survived).flatten()
                if len(alive) == 0:
                    break
                torch.manual_seed(attack_seed + start)
                adversarial = attack(x[alive], y[alive])
                delta = (adversarial - x[alive]).flatten(1).norm(dim=1)
                assert (delta <= eps * (1 + 1e-4)).all(), "attack left the l2 ball"
                with torch.no_grad():
                    survived[alive] = model(adversarial).argmax(1) == y[alive]
            robust.append(survived.cpu())
    robust = torch.cat(robust)
    broken = torch.nonzero(certified_any & ~robust).flatten().tolist()
    metrics = {
        "stage": "pgd", "method": method, "profile": params["profile"], "eps": eps,
        "attacks": [name for name, _, _ in _attacks(model, cfg, eps, seed)],
        "steps": cfg["steps"], "step_size": eps * cfg["step_size_factor"], "restarts": cfg["restarts"],
        "test_images": len(test_y),
        # Ties this file to the trained model it evaluated (train metrics.json).
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "pgd_accuracy": 100.0 * robust.float().mean().item(),
        "certified_points": int(certified_any.sum()),
        "certified_points_broken": len(broken),
        "numerics": "the float32 model, TF32 off, eval mode",
        "data": data_record(data.provenance),
        "device": device_name(device), "git_commit": git_commit(root),
    }
    if broken:
        raise UnsoundCertificateError(
            f"{method}: {len(broken)} certified test points broken by the attack at eps {eps}: "
            f"indices {broken[:50]}{' ...' if len(broken) > 50 else ''}")
    save_json(metrics, root / layout.attack(method, "metrics.json"))
    print(f"[pgd] {method}: PGD accuracy {metrics['pgd_accuracy']:.2f}% | "
          f"{metrics['certified_points']} certified points, none broken")
    return metrics
