"""Certify or predict (bounds/selection.py): the composite answers with the certified model
where the selector finds it robust at tau and with the guide elsewhere; a point it certifies
keeps its label on the whole ball, checked on sampled points and against an attack that
pushes the selector's radius down; at tau = 0 it is GloRo's certificate."""
from __future__ import annotations

import pytest
import torch

from tiny_nets import ball_samples, certification_case, pgd, single_thread  # noqa: F401  (fixture)
from pipeline_src.bounds.certifiers import gloro_certified, margin_certified
from pipeline_src.bounds.gloro import certified_margin_shift
from pipeline_src.bounds.numerics import float64_model, sound_numerics
from pipeline_src.bounds.selection import composite_certified, composite_predictions, selects_certified

EPS = 0.02   # the radii rho of this case run from 0.006 to 0.13


@pytest.fixture(scope="module")
def case():
    model, x, y, logits, norms = certification_case("relu")
    with sound_numerics(model):
        model64 = float64_model(model)
        exact = model64(x.double())
    weight = model64.weight_layers()[-1].module.weight
    return model, model64, x, y, exact, weight, norms


def _radius(model64, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, k_sub: float) -> torch.Tensor:
    """rho at the label y: min_{i != y} (z_y - z_i) / (||w_y - w_i|| K_sub), differentiable."""
    z = model64(x.double())
    distance = (weight[None, :, :] - weight[y][:, None, :]).norm(dim=-1) * k_sub
    ratio = (z.gather(1, y[:, None]) - z) / distance.clamp_min(1e-300)
    return ratio.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), float("inf")).amin(1)


def test_tau_zero_is_the_certified_model_and_gloro(case):
    model, model64, x, y, exact, weight, norms = case
    guide = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with sound_numerics(model):
        predicted, selected = composite_predictions(exact, guide, weight, norms.sub_lipschitz_upper, 0.0)
        certified = composite_certified(exact, y, weight, norms.sub_lipschitz_upper, EPS, 0.0)
        assert torch.equal(certified, gloro_certified(model, exact, y, EPS, norms))
    assert selected.all() and torch.equal(predicted, exact.argmax(1))
    assert certified.any(), "vacuous: GloRo certifies nothing at this radius"


@pytest.mark.parametrize("tau", [0.02, 0.04])
def test_the_guide_answers_where_the_model_is_not_robust_at_tau(case, tau):
    model, model64, x, y, exact, weight, norms = case
    guide = torch.randn(exact.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    predicted, selected = composite_predictions(exact, guide, weight, norms.sub_lipschitz_upper, tau)
    radius = _radius(model64, x, exact.argmax(1), weight, norms.sub_lipschitz_upper).detach()
    assert 0 < selected.sum() < len(y), "the selector should split this batch"
    clear = (radius - tau).abs() > 1e-4   # the relative rule's band (about 1e-6 here) decides at the edge
    assert torch.equal(selected[clear], (radius >= tau)[clear])
    assert torch.equal(predicted[selected], exact.argmax(1)[selected])
    assert torch.equal(predicted[~selected], guide.argmax(1)[~selected])
    # Certified points are a subset of GloRo's at eps + tau, and of the points g answers.
    with sound_numerics(model):
        certified = composite_certified(exact, y, weight, norms.sub_lipschitz_upper, EPS, tau)
        assert not (certified & ~gloro_certified(model, exact, y, EPS + tau, norms)).any()
    assert certified.any() and not (certified & ~selected).any()


@pytest.mark.parametrize("tau", [0.02, 0.04])
def test_a_certified_point_keeps_its_label_on_the_whole_ball(case, tau):
    model, model64, x, y, exact, weight, norms = case
    k_sub = norms.sub_lipschitz_upper
    with sound_numerics(model):
        certified = composite_certified(exact, y, weight, k_sub, EPS, tau)
    assert certified.any()
    xs, ys = x[certified], y[certified]
    def composite(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), sound_numerics(model):
            z = model64(points.double())
            wrong = torch.nn.functional.one_hot((labels + 1) % z.shape[1], z.shape[1]).double()
            return composite_predictions(z, wrong, weight, k_sub, tau)[0]

    samples, index = ball_samples(xs, EPS, per_point=64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(composite(samples, ys[index]), ys[index])
    # An attack on the selector: l2 PGD lowering rho at the label inside the ball.
    attacked = pgd(xs, EPS, lambda p: -_radius(model64, p, ys, weight, k_sub), steps=50,
                   generator=torch.Generator().manual_seed(0), start_radius=1.0)
    assert ((attacked - xs).flatten(1).norm(dim=1) <= EPS * (1 + 1e-5)).all()
    assert torch.equal(composite(attacked, ys), ys)
    # The attack has teeth: on a ball a hundred times larger it hands some of these points to the
    # guide (the Lipschitz bound is far above the margins' real slopes, hence the factor).
    far = pgd(xs, 100 * EPS, lambda p: -_radius(model64, p, ys, weight, k_sub), steps=50,
              generator=torch.Generator().manual_seed(0), start_radius=1.0)
    assert (composite(far, ys) != ys).any()


def test_selects_certified_is_the_relative_rule_at_the_prediction():
    # Two classes, K_sub = 1, w_0 - w_1 of norm 5: rho = (z_p - z_other) / 5.
    weight = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.4], [0.2, 0.0]], dtype=torch.float64)
    # rho = 0.2, 0.08, 0.04 against tau = 0.05.
    assert selects_certified(logits, weight, 1.0, 0.05).tolist() == [True, True, False]
    assert selects_certified(logits, weight, 1.0, 0.1).tolist() == [True, False, False]
    assert selects_certified(logits, weight, 1.0, 0.0).all()


def test_on_a_linear_model_the_worst_point_of_the_ball_is_reached_and_still_certified(monkeypatch):
    """A one-layer (linear) g makes GloRo's bound exact: moving x by eps along -(w_y - w_i) lowers
    the margin z_y - z_i by exactly eps ||w_y - w_i||. Every certified point keeps g's answer at
    all those worst points; the same moves break a certificate that forgot tau (points robust at
    eps but not at eps + tau are handed to the guide there), so the check has teeth."""
    import tiny_nets
    from pipeline_src.models.architectures import Dense
    monkeypatch.setitem(tiny_nets.TINY, "tiny_linear", ((1, 3, 3), [Dense(4)]))
    model = tiny_nets.tiny_net("tiny_linear", "relu", seed=0, scale=1.0)
    x = torch.rand(400, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    eps, tau = 0.05, 0.05
    with torch.no_grad(), sound_numerics(model):
        model64 = float64_model(model)
        exact = model64(x.double())
        weight = model64.weight_layers()[-1].module.weight
        y = exact.argmax(1)
        sound = composite_certified(exact, y, weight, 1.0, eps, tau)
        forgetful = composite_certified(exact, y, weight, 1.0, eps, 0.0)   # GloRo at eps alone

        def survives(points: torch.Tensor) -> torch.Tensor:
            """Whether g answers y at every worst point of the ball (one per wrong class)."""
            ok = torch.ones(len(points), dtype=torch.bool)
            for i in range(exact.shape[1]):
                direction = weight[y] - weight[i]
                norm = direction.norm(dim=1, keepdim=True)
                moved = points.flatten(1).double() - eps * direction / norm.clamp_min(1e-300)
                z = model64(moved.view_as(points))
                # the guide always answers wrong: the composite keeps y only where g answers
                predicted, _ = composite_predictions(z, torch.nn.functional.one_hot((y + 1) % 4, 4).double(),
                                                     weight, 1.0, tau)
                ok &= (predicted == y) | (i == y)
            return ok
        assert sound.sum() >= 20, "vacuous: too few certified points"
        assert survives(x)[sound].all()
        assert not survives(x)[forgetful].all(), "the worst points should break the forgetful certificate"


class _FixedGuide(torch.nn.Module):
    """A guide answering from a table of logits, one row per point (in the order given)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.seen = logits, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.seen:self.seen + len(x)]
        self.seen += len(x)
        return out


def test_composite_curve_measures_the_tau_grid(case):
    """The compose measurement: at tau = 0 the certified model and GloRo; along the grid the
    certified accuracy and the share g answers only fall, and clean accuracy rises with a
    guide that is always right (falls with one always wrong); batches change nothing."""
    from pipeline_src.certify.compose import composite_curve

    model, model64, x, y, exact, weight, norms = case
    taus = [0.0, 0.01, 0.02, 0.04, 0.08]
    right = torch.nn.functional.one_hot(y, exact.shape[1]).float()
    wrong = torch.nn.functional.one_hot((y + 1) % exact.shape[1], exact.shape[1]).float()
    curve = composite_curve(model, _FixedGuide(right), x, y, EPS, taus, norms)
    again = composite_curve(model, _FixedGuide(right), x, y, EPS, taus, norms, batch_size=7)
    assert curve == again
    with sound_numerics(model):
        gloro = gloro_certified(model, exact, y, EPS, norms).float().mean().item() * 100
        gloro_2eps = gloro_certified(model, exact, y, 2 * EPS, norms).float().mean().item() * 100
    first = curve[0]
    assert first["clean_accuracy"] == pytest.approx(100 * (exact.argmax(1) == y).float().mean().item())
    assert (first["certified_accuracy"], first["certified_accuracy_2eps"]) == (pytest.approx(gloro),
                                                                               pytest.approx(gloro_2eps))
    assert first["certified_model_answers"] == 100.0
    for before, after in zip(curve, curve[1:]):
        for key in ("certified_accuracy", "certified_accuracy_2eps", "certified_model_answers"):
            assert after[key] <= before[key]
        assert after["clean_accuracy"] >= before["clean_accuracy"]
    assert curve[-1]["clean_accuracy"] > first["clean_accuracy"] and curve[-1]["certified_model_answers"] < 100
    worse = composite_curve(model, _FixedGuide(wrong), x, y, EPS, taus, norms)
    assert all(a["clean_accuracy"] >= b["clean_accuracy"] for a, b in zip(worse, worse[1:]))
    assert [c["certified_accuracy"] for c in worse] == [c["certified_accuracy"] for c in curve]


def test_the_slack_for_the_selectors_rule_is_needed_and_enough():
    """One input, two classes, large logits (z = W x + b, b = -1000): the selector's relative rule
    at x' = x - eps asks for more than the rule at x did. Points certified without the slack term
    exist whose x - eps is handed to the guide; with it, every certified point keeps g at x - eps."""
    weight = torch.tensor([[1.0], [0.99]], dtype=torch.float64)
    bias = torch.tensor([-1000.0, -1000.0], dtype=torch.float64)
    eps, tau = 0.1, 0.05
    x = torch.linspace(0.3495, 0.3505, 2001, dtype=torch.float64)[:, None]
    y = torch.zeros(len(x), dtype=torch.long)

    def logits(points):
        return points @ weight.T + bias

    moved = logits(x - eps)     # the worst point of each ball: rho falls by exactly eps
    kept = selects_certified(moved, weight, 1.0, tau) & (moved.argmax(1) == 0)
    certified = composite_certified(logits(x), y, weight, 1.0, eps, tau)
    without_slack = margin_certified(logits(x), certified_margin_shift(weight, y, 1.0, eps + tau), y)
    assert certified.any() and (~certified).any(), "the grid should straddle the threshold"
    assert kept[certified].all()
    assert (without_slack & ~kept).any(), "the slack should be needed here"


def test_a_negative_or_infinite_tau_is_refused():
    weight = torch.eye(2, dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.long)
    for tau in (-0.05, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="tau must be a finite radius >= 0"):
            selects_certified(logits, weight, 1.0, tau)
        with pytest.raises(ValueError, match="tau must be a finite radius >= 0"):
            composite_certified(logits, y, weight, 1.0, 0.1, tau)
