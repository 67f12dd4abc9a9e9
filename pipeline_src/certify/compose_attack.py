"""Attacks on a certify-or-predict composite f (`bounds.selection`): g where g's GloRo radius
rho(x) >= tau, the guide h elsewhere. f is piecewise (the selector switches models), so no
single model's loss attacks it; three l2 PGD attacks at eps, each from a random start, cover the
ways a point can fall:

  radius   lowers g's radius at the label, rho_y(x') = min_i (z_y - z_i) / K_yi: below tau the
           point goes to h, below 0 g itself answers another class;
  guide    raises h's cross-entropy (a point f hands to h anyway);
  joint    both at once: h's cross-entropy minus (rho_y(x') - tau)_+ / eps, the selector pushed
           to h while h is attacked.

A point is robust if f answers its label at x and at the end of every attack (each of
`pgd.restarts` restarts). The gradients are the float32 models', with the selector's own
guaranteed K_sub (the joint attack's clamp at tau must sit where the selector switches); f itself
is evaluated as deployed, g in float64. These are the composite's own attacks: its robust
accuracy is not comparable point for point with the pgd stage's (torchattacks' PGD and APGD on
one network).

The cross-check: the composite's certificate promises, for every point it certifies, that the
selector keeps the point with g and g answers the label everywhere in the ball. At x and at
every attack's end point a certified point handed to h, or answered wrongly, is a bug in the
certificate and stops the stage (a stronger test than a flipped label: the radius attack
needs only to push rho below tau, not below 0)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..bounds.gloro import pairwise_row_distances
from ..bounds.selection import composite_predictions
from ..models.architectures import CertifiableNet

ATTACKS = ("radius", "guide", "joint")


def label_radius(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, sub_lipschitz: float) -> torch.Tensor:
    """rho_y = min_{i != y} (z_y - z_i) / (||w_y - w_i|| K_sub), (B,): g's GloRo radius at the
    label (negative where g answers another class), differentiable in the input."""
    distances = pairwise_row_distances(weight, y) * sub_lipschitz
    margins = logits.gather(1, y[:, None]) - logits
    own = F.one_hot(y, logits.shape[1]).bool()
    return (margins / distances.masked_fill(own, 1.0)).masked_fill(own, float("inf")).amin(1)


def l2_pgd(objective, x: torch.Tensor, eps: float, steps: int, step_size: float,
           generator: torch.Generator) -> torch.Tensor:
    """x' in B(x, eps) and [0, 1] that raises `objective` (per example, (B,)): normalised-gradient
    ascent from a uniformly random radius in a random direction, projected after every step
    (clamping to [0, 1] only moves a point towards x, so it stays in the ball)."""
    direction = torch.randn(x.shape, generator=generator, device=x.device)
    radius = eps * torch.rand((len(x),), generator=generator, device=x.device)
    delta = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * radius.view(-1, 1, 1, 1)
    adversarial = (x + delta).clamp(0.0, 1.0)
    for _ in range(steps):
        adversarial = adversarial.detach().requires_grad_(True)
        grad, = torch.autograd.grad(objective(adversarial).sum(), adversarial)
        step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = adversarial.detach() + step_size * step - x
        scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        adversarial = (x + delta * scale.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return adversarial.detach()


def attack_objectives(model: CertifiableNet, guide: torch.nn.Module, y: torch.Tensor, sub_lipschitz: float,
                      tau: float, eps: float) -> dict:
    """{attack: the per-example objective it raises}, as described in the module."""
    weight = model.weight_layers()[-1].module.weight

    def radius(x):
        return -label_radius(model(x), y, weight, sub_lipschitz)

    def guide_loss(x):
        return F.cross_entropy(guide(x), y, reduction="none")

    def joint(x):
        return guide_loss(x) - (label_radius(model(x), y, weight, sub_lipschitz) - tau).clamp_min(0) / eps

    return {"radius": radius, "guide": guide_loss, "joint": joint}


def composite_outcome(model64: CertifiableNet, guide: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                      sub_lipschitz_upper: float, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f answers y at x, g is selected and answers y at x), per example, f as deployed (g in
    float64, the selector on the guaranteed K_sub)."""
    with torch.no_grad():
        logits = model64(x.double())
        weight = model64.weight_layers()[-1].module.weight
        predicted, selected = composite_predictions(logits, guide(x), weight, sub_lipschitz_upper, tau)
        correct = predicted == y
        return correct, correct & selected & (logits.argmax(1) == y)


def attack_composite(model: CertifiableNet, model64: CertifiableNet, guide: torch.nn.Module, x: torch.Tensor,
                     y: torch.Tensor, certified: torch.Tensor, eps: float, tau: float, sub_lipschitz_upper: float,
                     cfg: dict, generator: torch.Generator, attacks: tuple[str, ...] = ATTACKS
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(robust, certified points the attacks handed to h or flipped), per example of one batch
    (`x` in [0, 1]). Attacks run on the points still robust; every certified point is
    attacked (it is robust at x, or the check at x has flagged it already)."""
    robust, kept = composite_outcome(model64, guide, x, y, sub_lipschitz_upper, tau)
    violated = certified & ~kept
    for _ in range(cfg["restarts"]):
        for name in attacks:
            alive = torch.nonzero(robust | certified).flatten()
            if len(alive) == 0:
                return robust, violated
            objective = attack_objectives(model, guide, y[alive], sub_lipschitz_upper, tau, eps)[name]
            adversarial = l2_pgd(objective, x[alive], eps, cfg["steps"], eps * cfg["step_size_factor"], generator)
            assert ((adversarial - x[alive]).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all(), "left the ball"
            correct, kept = composite_outcome(model64, guide, adversarial, y[alive], sub_lipschitz_upper, tau)
            robust[alive] &= correct
            violated[alive] |= certified[alive] & ~kept
    return robust, violated
