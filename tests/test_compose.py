"""The compose stage (certify or predict, certify/compose.py): tau chosen by the validation
rule, the attacks on the composite reach the worst point of a linear model, and the cross-check
catches a certificate that forgets tau while passing the sound one."""
from __future__ import annotations

from unittest import mock

import pytest
import torch

from tiny_nets import TINY, certification_case, single_thread, tiny_net  # noqa: F401  (fixture)
from pipeline_src.bounds.gloro import certified_margin_shift
from pipeline_src.bounds.certifiers import margin_certified
from pipeline_src.bounds.numerics import float64_model, layer_norms, sound_numerics
from pipeline_src.bounds.selection import composite_certified
from pipeline_src.certify.compose import choose_tau
from pipeline_src.certify.compose_attack import attack_composite, l2_pgd, label_radius
from pipeline_src.models.architectures import Dense

PGD = {"steps": 60, "step_size_factor": 0.1, "restarts": 1}


def _point(tau: float, clean: float, certified: float) -> dict:
    return {"tau": tau, "clean_accuracy": clean, "certified_accuracy": certified}


def test_tau_is_the_best_clean_accuracy_that_keeps_the_reference_certified_accuracy():
    curve = [_point(0.0, 40.0, 27.0), _point(0.1, 44.0, 25.0), _point(0.2, 46.0, 24.6),
             _point(0.3, 46.0, 24.5), _point(0.5, 48.0, 23.0)]
    # 25.1 - 0.5 = 24.6: 0.3 falls just short; 0.2 is the best clean accuracy above the line.
    assert choose_tau(curve, 25.1, 0.5) == {"tau": 0.2, "meets_reference": True}
    # A tie in clean accuracy goes to the smaller tau (more certified).
    assert choose_tau(curve, 25.0, 0.5) == {"tau": 0.2, "meets_reference": True}
    # No tau reaches it: the most certified one, flagged.
    assert choose_tau(curve, 30.0, 0.5) == {"tau": 0.0, "meets_reference": False}


@pytest.fixture(scope="module")
def linear_case():
    """g linear (one dense layer, K_sub = 1): rho is the exact l2 distance to each decision
    boundary, so an attack can lower it by exactly eps (points far inside [0, 1])."""
    with mock.patch.dict(TINY, {"tiny_linear": ((1, 3, 3), [Dense(4)])}):
        model = tiny_net("tiny_linear", "relu", seed=3, scale=2.0)
    x = 0.4 + 0.2 * torch.rand(64, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    with sound_numerics(model):
        norms = layer_norms(model, 50)
        model64 = float64_model(model)
        y = model64(x.double()).argmax(1)
    assert norms.sub_lipschitz_upper == 1
    return model, model64, x, y, norms


def test_the_radius_attack_lowers_a_linear_models_radius_by_eps(linear_case):
    model, _, x, y, _ = linear_case
    weight, eps = model.weight_layers()[-1].module.weight, 0.05
    with torch.no_grad():
        before = label_radius(model(x), y, weight, 1.0)
    adversarial = l2_pgd(lambda z: -label_radius(model(z), y, weight, 1.0), x, eps, 100, eps / 10,
                         torch.Generator().manual_seed(1))
    assert ((adversarial - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        after = label_radius(model(adversarial), y, weight, 1.0)
    # rho is a minimum of distances to hyperplanes: no point in the ball is more than eps closer.
    assert (after >= before - eps - 1e-5).all()
    assert torch.allclose(after, before - eps, atol=2e-3), (after - (before - eps)).abs().max()


def _guide(seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(9, 4)).eval()


@pytest.mark.parametrize("sound", [True, False])
def test_the_cross_check_catches_a_certificate_that_forgets_tau(linear_case, sound):
    model, model64, x, y, norms = linear_case
    weight64 = model64.weight_layers()[-1].module.weight
    with torch.no_grad():
        logits = model64(x.double())
        eps = 0.05
        tau = float(label_radius(logits, y, weight64, 1.0).median()) - eps   # half the points past eps + tau
        if sound:
            certified = composite_certified(logits, y, weight64, 1.0, eps, tau)
        else:   # GloRo at eps alone: the points with eps < rho < eps + tau are wrongly promised
            certified = margin_certified(logits, certified_margin_shift(weight64, y, 1.0, eps), y)
            radius = label_radius(logits, y, weight64, 1.0)
            assert ((radius > eps + 0.01) & (radius < eps + tau - 0.01)).sum() >= 5, "vacuous case"
    robust, violated = attack_composite(model, model64, _guide(), x, y, certified, eps, tau, 1.0, PGD,
                                        torch.Generator().manual_seed(2))
    assert certified.any()
    if sound:
        assert not violated.any() and robust[certified].all()
    else:
        # Every point the forgetful certificate wrongly promises with room to spare is caught,
        # among them some the selector keeps at x itself: only the attack can catch those.
        radius = label_radius(logits, y, weight64, 1.0)
        wrong = certified & (radius < eps + tau - 0.01)
        assert violated[wrong].all()
        assert (wrong & (radius > tau + 0.01)).sum() >= 3, "vacuous: no wrong promise needs the attack"


@pytest.mark.parametrize("attack", ["guide", "joint"])
def test_the_attacks_on_the_guide_break_its_points_where_it_answers(attack):
    """With tau above every radius h answers everywhere, so the composite is h (a network other
    than g, the labels its own answers): each attack that targets h breaks some of its points,
    the radius attack alone (which only moves g) none."""
    model, x, _, _, norms = certification_case("relu")
    with sound_numerics(model):
        model64 = float64_model(model)
    guide = tiny_net("tiny_conv", "relu", seed=7)
    with torch.no_grad():
        y = guide(x).argmax(1)
    certified = torch.zeros(len(y), dtype=torch.bool)

    def robust_after(attacks):
        robust, violated = attack_composite(model, model64, guide, x, y, certified, 1.0, 10.0,
                                            norms.sub_lipschitz_upper, PGD, torch.Generator().manual_seed(0), attacks)
        assert not violated.any()
        return int(robust.sum())

    assert robust_after((attack,)) < len(y) == robust_after(("radius",))
