"""GloRo (Leino et al. 2021): its margin bound and bottom logit
(pipeline_src/bounds/gloro.py), its training loss through the shared loop
(pipeline_src/methods/gloro.py), its sound certifier ("gloro" in
pipeline_src/bounds/certifiers.py), its params block and its Table 2 row.

The soundness tests follow tests/test_bounds.py: tiny real networks of every
activation, points sampled in the l2 ball and points found by PGD, against the
bound computed with guaranteed spectral norms."""
from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pipeline_src.bounds.gloro import (FLOAT64_MARGIN, bottom_logit, certified_margin_shift, gloro_logits,
                                       margin_shift, pairwise_row_distances, trades_kl)
from pipeline_src.bounds import certifiers
from pipeline_src.bounds.certifiers import certified_at, certify_batch
from pipeline_src.bounds.numerics import LayerNorms, float64_model, sound_numerics
from pipeline_src.config import load_params
from pipeline_src.runs import METHOD_FACTS
from pipeline_src.methods import METHODS, build_method
from pipeline_src.methods.base import CertifiedMethod, register
from pipeline_src.methods.gloro import GloRo
from pipeline_src.training.certified import certified_loss
from tiny_nets import (TINY, ball_samples, certification_case, guaranteed_layer_norms,  # noqa: F401
                       margin_attack, pgd, single_thread, tiny_net)
from conftest import save_cut_cache

ACTIVATIONS = ["relu", "maxmin", "clipped_relu"]
RTOL = 1e-5


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ 1. the bound by hand
W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def test_pairwise_bound_and_bottom_logit_by_hand():
    # Rows of W: ||w_0 - w_i|| = 0, sqrt 2, 1; ||w_2 - w_i|| = 1, 1, 0.
    close(pairwise_row_distances(W, torch.tensor([0, 2])), [[0.0, math.sqrt(2), 1.0], [1.0, 1.0, 0.0]])
    # K_sub = 2, eps = 0.1: eps K_0i = 0.2 * (0, sqrt 2, 1).
    close(margin_shift(W, torch.tensor([0]), 2.0, 0.1), [[0.0, 0.2 * math.sqrt(2), 0.2]])
    logits = torch.tensor([[2.0, 1.0, 0.5],     # predicted 0: bot = max(1 + 0.2 sqrt 2, 0.5 + 0.2)
                           [0.0, 0.2, 1.0]])    # predicted 2: bot = max(0 + 0.2, 0.2 + 0.2)
    close(bottom_logit(logits, W, 2.0, 0.1), [1.0 + 0.2 * math.sqrt(2), 0.4])
    close(gloro_logits(logits, W, 2.0, 0.1), [[2.0, 1.0, 0.5, 1.0 + 0.2 * math.sqrt(2)],
                                              [0.0, 0.2, 1.0, 0.4]])
    # At eps = 0 the bottom logit is the runner-up: robust = correctly ordered.
    close(bottom_logit(logits, W, 2.0, 0.0), [1.0, 0.2])
    # The certificate's shift is the same bound for the label's row, in float64, widened.
    shift = certified_margin_shift(W, torch.tensor([0]), 2.0, 0.1)
    assert shift.dtype == torch.float64
    close(shift, [[0.0, 0.2 * math.sqrt(2) * (1 + FLOAT64_MARGIN), 0.2 * (1 + FLOAT64_MARGIN)]])


def test_trades_kl_is_the_kl_of_the_extended_softmaxes():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    extended = gloro_logits(logits, torch.randn(5, 7, generator=g, dtype=torch.float64), 1.7, 0.3)
    p = torch.cat([logits.softmax(1), torch.zeros(6, 1, dtype=torch.float64)], dim=1)   # 0 for bot
    q = extended.softmax(1)
    kl = (p[:, :-1] * (p[:, :-1].log() - q[:, :-1].log())).sum(1)
    torch.testing.assert_close(trades_kl(logits, extended), kl, rtol=1e-12, atol=1e-12)
    for y in range(5):   # = CE([z, bot], y) - CE(z, y), whatever the label
        label = torch.full((6,), y)
        torch.testing.assert_close(trades_kl(logits, extended),
                                   F.cross_entropy(extended, label, reduction="none")
                                   - F.cross_entropy(logits, label, reduction="none"), rtol=1e-12, atol=1e-12)
    assert (trades_kl(logits, extended) > 0).all()


# ------------------------------------------------------------------ 2. soundness of the margin bound
def _margins(z: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """z_j - z_i for every class i: (N, C)."""
    return z.gather(1, j[:, None]) - z


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("seed,eps,scale", [(0, 0.05, 0.6), (1, 0.3, 1.0), (2, 0.01, 1.2)])
def test_margin_bound_holds_in_the_ball(activation, arch, seed, eps, scale):
    """No point of the l2 ball, sampled or found by PGD on each margin, moves a margin
    z_j - z_i by more than eps ||w_j - w_i|| prod_{l<L} sigma_l (guaranteed norms), for the
    label and for the prediction as j; and PGD gets near the bound (it has teeth)."""
    model = tiny_net(arch, activation, seed, scale)
    g = torch.Generator().manual_seed(seed + 10)
    batch = 4
    x = torch.rand(batch, *TINY[arch][0], generator=g)
    classes = model.weight_layers()[-1].output_shape[0]
    labels = torch.randint(0, classes, (batch,), generator=g)
    sub = math.prod(guaranteed_layer_norms(model)[:-1])
    weight = model.weight_layers()[-1].module.weight.detach()
    with torch.no_grad():
        clean = model(x)
    sampled, base_s = ball_samples(x, eps, 40, g)
    for j in (labels, clean.argmax(1)):
        # PGD from each centre against each margin z_j - z_i (i != j): push it down.
        base_a = torch.arange(batch).repeat_interleave(classes)
        rival = torch.arange(classes).repeat(batch)
        keep = rival != j[base_a]
        base_a, rival = base_a[keep], rival[keep]

        def objective(points, base_a=base_a, rival=rival, j=j):
            z = model(points)
            return z.gather(1, rival[:, None]).squeeze(1) - z.gather(1, j[base_a][:, None]).squeeze(1)

        attacked = pgd(x[base_a], eps, objective, 30, g)
        points = torch.cat([sampled, attacked])
        base = torch.cat([base_s, base_a])
        with torch.no_grad():
            drop = _margins(clean, j)[base] - _margins(model(points), j[base])
        bound = margin_shift(weight, j, sub, eps)[base]
        tol = RTOL * (1.0 + clean.abs().max().item() + bound.max().item())
        excess = (drop - bound).max().item()
        assert excess <= tol, f"GloRo's margin bound exceeded by {excess:.3g} (tol {tol:.3g})"
        # With j the prediction: z_j - z_bot at x bounds every margin z_j - z_i in the ball.
        if j is not labels:
            lower = (clean.gather(1, j[:, None]).squeeze(1) - bottom_logit(clean, weight, sub, eps))[base]
            with torch.no_grad():
                rivals = _margins(model(points), j[base])
            rivals = rivals.masked_fill(F.one_hot(j[base], classes).bool(), float("inf")).amin(1)
            assert (rivals >= lower - tol).all(), "a margin in the ball fell below z_j - z_bot"


def test_pgd_in_the_margin_test_has_teeth():
    """The attack the soundness test relies on finds the worst margin drop where it is known:
    on a ball small enough for the network to be linear in it, eps times the gradient's norm;
    and that drop sits below GloRo's bound."""
    model = tiny_net("tiny_dense", "relu", 3, 0.6)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, *TINY["tiny_dense"][0], generator=g)
    with torch.no_grad():
        clean = model(x)
    j = clean.argmax(1)
    rival = (j + 1) % clean.shape[1]
    weight = model.weight_layers()[-1].module.weight.detach()

    def objective(points):
        z = model(points)
        return z.gather(1, rival[:, None]).squeeze(1) - z.gather(1, j[:, None]).squeeze(1)

    eps = 1e-4
    start = x.clone().requires_grad_(True)
    gradient, = torch.autograd.grad(objective(start).sum(), start)
    attacked = pgd(x, eps, objective, 60, g)
    with torch.no_grad():
        drop = objective(attacked) - objective(x)
    linear = eps * gradient.flatten(1).norm(dim=1)
    assert (drop >= 0.95 * linear).all() and (drop <= 1.05 * linear).all()
    bound = margin_shift(weight, j, math.prod(guaranteed_layer_norms(model)[:-1]), eps)
    assert (drop <= bound.gather(1, rival[:, None]).squeeze(1)).all()


# ------------------------------------------------------------------ 3. the certifier
@pytest.fixture(scope="module", params=ACTIVATIONS)
def certified_setup(request):
    return certification_case(request.param)


def test_gloro_is_reported_for_every_model():
    for activation in ACTIVATIONS:
        assert "gloro" in certifiers.certifiers_for(tiny_net("tiny_conv", activation, 0))


def test_gloro_certifier_by_hand():
    """Three layers with guaranteed norms 2 and 3 before the last (K_sub = 6); last-layer rows
    e_1, e_2, 0, e_1: the margins of z = (3, 1, 0, 2.9) for y = 0 fall by at most
    6 eps (0, sqrt 2, 1, 0). Class 3 has the label's row: its margin never moves."""
    model = tiny_net("tiny_dense", "relu", 0)
    last = model.weight_layers()[-1].module
    with torch.no_grad():
        last.weight.zero_()
        last.weight[0, 0] = last.weight[1, 1] = last.weight[3, 0] = 1.0
    norms = LayerNorms(upper=[2.0, 3.0, 1.5], estimate=[2.0, 3.0, 1.5])
    assert norms.sub_lipschitz_upper == 6.0
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.9]], dtype=torch.float64)
    y = torch.tensor([0])
    limit = 2.0 / (6.0 * math.sqrt(2.0))   # class 1: 2 > 6 sqrt 2 eps
    assert certifiers.gloro_certified(model, logits, y, limit * 0.999, norms).item()
    assert not certifiers.gloro_certified(model, logits, y, limit * 1.001, norms).item()
    # The relative-margin rule: a margin within 1e-6 relative of the shift is refused.
    tight = torch.tensor([[1.0, 1.0 - 1e-7, -5.0, -5.0]], dtype=torch.float64)
    assert not certifiers.gloro_certified(model, tight, y, 1e-12, norms).item()
    # Give class 1 the label's row too: its margin can no longer move, class 2 sets the limit
    # (3 > 6 eps), and class 3 (0.1 of margin, the label's row) never does.
    with torch.no_grad():
        last.weight[1].zero_()
        last.weight[1, 0] = 1.0
    assert certifiers.gloro_certified(model, logits, y, 0.499, norms).item()
    assert not certifiers.gloro_certified(model, logits, y, 0.501, norms).item()
    # The certifier against its definition: the Lipschitz margin would need sqrt 2 L eps.
    lipschitz = certifiers.lipschitz_certified(logits, y, norms.lipschitz_upper, 0.03)
    assert not lipschitz.item() and certifiers.gloro_certified(model, logits, y, 0.03, norms).item()


def test_gloro_is_never_looser_than_the_lipschitz_margin_and_survives_pgd(certified_setup):
    model, x, y, logits, norms = certified_setup
    correct = logits.argmax(1) == y
    for eps in (0.0, 0.01, 0.03):
        with sound_numerics(model):
            out = certify_batch(model, x, y, eps, norms, ["lipschitz", "gloro"])
        assert not (out["gloro"] & ~correct).any(), "gloro certifies a misclassified point"
        assert not (out["lipschitz"] & ~out["gloro"]).any(), "the Lipschitz margin certifies where GloRo does not"
        if eps == 0.0:
            assert torch.equal(out["gloro"], correct)
            continue
        assert out["gloro"].sum() > 0, "vacuous: nothing certified"
        worst = margin_attack(model, x[out["gloro"]], y[out["gloro"]], eps, steps=50, restarts=5)
        assert (worst < 0).all(), f"a GloRo-certified point was flipped by PGD: margins {worst}"


def test_gloro_certificate_agrees_with_the_training_bottom_logit(certified_setup):
    """With guaranteed norms and the label as j, [z, z_bot] puts the label on top exactly where
    the certifier certifies (away from the relative-margin rule's 1e-6 band)."""
    model, x, y, logits, norms = certified_setup
    eps = 0.01
    model64 = float64_model(model)
    with sound_numerics(model):
        exact = model64(x.double())
        certified = certified_at("gloro", model64, x, y, logits, eps, norms, exact)
    weight = model64.weight_layers()[-1].module.weight
    shift = margin_shift(weight, y, norms.sub_lipschitz_upper, eps)
    room = _margins(exact, y) - shift
    room = room.masked_fill(F.one_hot(y, exact.shape[1]).bool(), float("inf")).amin(1)
    clear = room.abs() > 1e-5
    assert clear.sum() > 20
    on_top = room > 0
    # Where the label is the prediction, z_bot is the label-row bound: the same decision.
    predicted = exact.argmax(1) == y
    bot = bottom_logit(exact, weight, norms.sub_lipschitz_upper, eps)
    assert torch.equal((exact.gather(1, y[:, None]).squeeze(1) > bot)[predicted & clear], on_top[predicted & clear])
    assert torch.equal(certified[clear], (on_top & (logits.argmax(1) == y))[clear])


# ------------------------------------------------------------------ 4. the method and its loss
def gloro_cfg(**overrides) -> dict:
    return {**copy.deepcopy(load_params("smoke")["gloro"]), **overrides}


def test_gloro_method_facts():
    assert METHODS["gloro"] is GloRo and GloRo.certifier == "gloro"
    assert GloRo.facts == METHOD_FACTS["gloro"] and GloRo.seed_family() == "gloro"
    assert METHOD_FACTS["gloro"].label == "GloRo" and METHOD_FACTS["gloro"].paired_with is None
    assert not METHOD_FACTS["gloro"].similarity_term
    with pytest.raises(ValueError, match=r"gloro\.loss"):
        build_method("gloro", tiny_net("tiny_dense", "maxmin", 0), gloro_cfg(loss="hinge"),
                     torch.Generator().manual_seed(0), 10)


def test_registering_a_method_that_states_its_facts_itself_is_refused():
    with pytest.raises(TypeError, match="x-method"):
        register(type("Fake", (CertifiedMethod,), {"name": "gloro", "paired_with": "bcp"}))
    with pytest.raises(TypeError, match="no block"):
        register(type("Fake", (CertifiedMethod,), {"name": "no_such_method"}))
    assert METHODS["gloro"] is GloRo


@pytest.mark.parametrize("loss", ["trades", "crossentropy"])
@pytest.mark.parametrize("kappa", [0.0, 0.25, 0.9])
def test_the_loops_loss_is_gloros_loss(loss, kappa):
    """kappa CE(z) + (1 - kappa) robust = CE(z) + (1 - kappa) lam KL, GloRo's TRADES loss with its
    weight scaled by (1 - kappa) (robust = CE(z) + trades; with crossentropy, robust = CE([z, bot]),
    which is CE(z) + KL: lam = 1); the worst-case logits are [z, bot] from this step's
    power-iteration norms; the gradient is finite."""
    model = tiny_net("tiny_conv", "maxmin", 0).train()
    cfg = gloro_cfg(loss=loss, trades_lambda=1.5, power_iterations=3)
    method = build_method("gloro", model, cfg, torch.Generator().manual_seed(1), 16)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, *TINY["tiny_conv"][0], generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    eps = 0.1
    state = copy.deepcopy(method.power)
    logits = method.forward(x)
    bounds = method.bounds(x, y, logits, eps, torch.arange(16))
    sigmas = state.norms(model.weight_layers(), cfg["power_iterations"])
    expected = gloro_logits(logits, model.weight_layers()[-1].module.weight, torch.stack(sigmas[:-1]).prod(), eps)
    torch.testing.assert_close(bounds.worst_logits, expected, rtol=0, atol=0)
    assert bounds.worst_logits.shape == (16, 4)
    torch.testing.assert_close(bounds.lipschitz, torch.stack(sigmas).prod().detach())
    total, robust = certified_loss(F.cross_entropy(logits, y), bounds, y, kappa)
    torch.testing.assert_close(robust, F.cross_entropy(expected, y))
    # GloRo's TRADES loss written out: CE on the clean logits + lam KL(p_ext || q) (Keras' KLDivergence).
    lam = 1.5 if loss == "trades" else 1.0
    p = logits.softmax(1)
    q = expected.softmax(1)
    kl = (p * (p.log() - q[:, :-1].log())).sum(1).mean()
    torch.testing.assert_close(total, F.cross_entropy(logits, y) + (1 - kappa) * lam * kl, rtol=1e-5, atol=1e-6)
    if loss == "crossentropy" and kappa == 0.0:
        torch.testing.assert_close(total, F.cross_entropy(expected, y))
    total.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(grad).all() for grad in grads)
    method.after_step()


def test_gloro_trains_through_the_shared_loop(tmp_path):
    """Two short epochs on 200 sample images: finite history, selection on the GloRo certificate."""
    import csv

    from pipeline_src.data.cifar import build_cache
    from pipeline_src.paths import RunLayout
    from pipeline_src.training.certified import train_certified

    params = load_params("smoke")
    layout = RunLayout.of(params)
    cache = build_cache({**params["data"], "val_size": 100}, tmp_path / "full.pt", tmp_path / "full.json", tmp_path)
    small = {**cache.__dict__, "train_x": cache.train_x[:200], "train_y": cache.train_y[:200]}
    save_cut_cache(small, tmp_path / layout.data_cache, params["data"])
    params["gloro"].update(epochs=2, warmup_epochs=0, ramp_epochs=1, batch_size=50)
    params["certify"] = {**params["certify"], "batch_size": 100}
    metrics = train_certified(params, "gloro", tmp_path)
    assert metrics["method"] == "gloro" and metrics["activation"] == "maxmin"
    with open(tmp_path / layout.train("gloro", "history.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        for column in ("clean_loss", "robust_loss", "lipschitz", "regulariser", "val_certified_accuracy"):
            assert math.isfinite(float(row[column])), (column, row)
    assert float(rows[-1]["regulariser"]) > 0   # the TRADES term lam KL


# ------------------------------------------------------------------ 5. params and the report
def test_gloro_block_follows_the_repositorys_published_recipe():
    """params.yaml's gloro block: the one full command of klasleino/gloro's tools/README.md
    (MNIST 1.58: 300 epochs, batch 512, eps to 1.1 x over the first half, lr held for the first
    half then to 1e-6, sparse_trades_kl.1.5, minmax networks), train_gloro.py's Adam at 1e-3 and
    5 power iterations; eps 36/255."""
    params = load_params("paper")
    block = params["gloro"]
    assert "gloro" not in params["methods"]                    # the paper profile: the Duet paper's runs
    assert (block["epochs"], block["batch_size"], block["lr"]) == (300, 512, 0.001)
    assert block["warmup_epochs"] == 0 and block["ramp_epochs"] == block["epochs"] // 2
    assert block["eps_train"] == pytest.approx(1.1 * params["certify"]["eps"])
    assert block["lr_schedule"]["kind"] == "exponential" and block["lr_schedule"]["final_lr"] == 1e-6
    assert "delay_epochs" not in block["lr_schedule"]          # decay right after the first half
    assert (block["loss"], block["trades_lambda"], block["power_iterations"]) == ("trades", 1.5, 5)
    assert block["model"]["activation"] == "maxmin" and block["kappa_final"] == 0.0
    assert "gloro" in load_params("smoke")["methods"]


def test_table2_gloro_row_carries_gloros_own_number_labelled_as_such(tmp_path):
    from test_report import _params, _row, write_fake_runs

    from pipeline_src.report import paper
    from pipeline_src.report.collect import collect
    from pipeline_src.report.tables import table2

    params = _params(methods=("bcp", "gloro"))
    write_fake_runs(tmp_path, params, {"gloro": {"clean": 55.0, "certified": 41.0}})
    table = table2(collect(params, tmp_path))
    row = _row(table, "GloRo")
    assert row["Certified, paper (%)"] == "60.00" and row["Δ certified (ours − paper)"] == "−19.00"
    assert row["Clean, paper (%)"] == "—" and row["PGD, paper (%)"] == "—"   # not published: left empty
    assert row["Paper's source"] == paper.GLORO and "not the Duet paper" in paper.GLORO
    assert "GloRo" in row["Paper's source"] and row["Duet − BCP, clean (paired)"] == "—"
    assert any("GloRo's paper columns" in note for note in table.notes)
    data = table.data.set_index("run_group")
    assert data.loc["gloro", "certified_paper"] == 60.0 and pd.isna(data.loc["gloro", "clean_paper"])
