"""BCP + distillation (methods/bcp_distill.py): the term's mathematics, its teachers, and
that with beta = 0 it is BCP step for step (the pairing that makes its per-seed
difference from BCP a paired measurement)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline_src.config import load_params
from pipeline_src.methods import build_method, method_context
from pipeline_src.methods.bcp_distill import distillation_loss
from pipeline_src.models import build_model
from pipeline_src.paths import RunLayout
from pipeline_src.runs import METHOD_FACTS, CertifiedRun, is_no_guide_control, trains_with_guide
from pipeline_src.training.certified import certified_step
from tiny_nets import single_thread  # noqa: F401  (autouse fixture: one thread)


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params("smoke")


def _model(params: dict, seed: int = 3):
    torch.manual_seed(seed)
    return build_model({**params["model"], **params["bcp_distill"]["model"]})


def _batches(n: int = 3):
    generator = torch.Generator().manual_seed(7)
    return [(torch.rand((6, 3, 32, 32), generator=generator), torch.randint(0, 10, (6,), generator=generator))
            for _ in range(n)]


def _train(params: dict, method_name: str, cfg: dict, teacher=None) -> tuple[torch.nn.Module, list]:
    """Three steps with the bound on (eps > 0, kappa < 1), the same seed, batches and optimizer,
    the bound eager (compiled and eager bounds agree to rounding, not bit for bit)."""
    cfg = {**cfg, "compile": False}
    model = _model(params)
    context = {"guide": {"model": teacher}} if teacher is not None else None
    method = build_method(method_name, model, cfg, torch.Generator().manual_seed(1), 100, context)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step, (x, y) in enumerate(_batches()):
        out = certified_step(method, optimizer, x, y, torch.arange(len(y)), 0.05, 0.5)
        losses.append(out.similarity)
    return model, losses


def test_the_term_is_hintons_kl_and_the_labels_teacher_is_tempered_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(5, 10, generator=generator), torch.randn(5, 10, generator=generator)
    y = torch.randint(0, 10, (5,), generator=generator)
    t = 3.0
    p, q = F.softmax(teacher / t, 1), F.softmax(logits / t, 1)
    expected = t * t * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(distillation_loss(logits, teacher, y, t), expected, atol=1e-6)
    assert distillation_loss(logits, logits, y, t).abs() < 1e-6          # a student equal to its teacher
    assert torch.allclose(distillation_loss(logits, None, y, t), t * t * F.cross_entropy(logits / t, y))
    # T^2 keeps the gradient's scale: d/dz = T (q - p) / B, not (q - p) / (T B)
    z = logits.clone().requires_grad_(True)
    distillation_loss(z, teacher, y, t).backward()
    assert torch.allclose(z.grad, t * (q - p) / 5, atol=1e-6)


def test_beta_zero_is_bcp_step_for_step_and_beta_on_moves_the_weights(params):
    bcp, _ = _train(params, "bcp", copy.deepcopy(params["bcp"]))
    teacher = _model(params, seed=11).requires_grad_(False).eval()
    off, terms = _train(params, "bcp_distill", {**params["bcp_distill"], "distill_weight": 0.0}, teacher)
    assert terms == [None, None, None]
    assert all(torch.equal(a, b) for a, b in zip(bcp.state_dict().values(), off.state_dict().values()))
    on, terms = _train(params, "bcp_distill", copy.deepcopy(params["bcp_distill"]), teacher)
    assert all(term is not None and term > 0 for term in terms)
    assert any(not torch.equal(a, b) for a, b in zip(bcp.state_dict().values(), on.state_dict().values()))


def test_the_untrained_teacher_is_the_runs_initial_weights_frozen(params):
    model = _model(params)
    initial = copy.deepcopy(model.state_dict())
    method = build_method("bcp_distill", model, {**params["bcp_distill"], "distill_teacher": "untrained"},
                          torch.Generator().manual_seed(1), 100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in _batches(2):
        certified_step(method, optimizer, x, y, torch.arange(len(y)), 0.05, 0.5)
    assert all(torch.equal(initial[k], v) for k, v in method.teacher.state_dict().items())
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in method.teacher.parameters())


def test_the_vanilla_teacher_needs_the_guide_and_reads_no_svd_export(params, tmp_path):
    with pytest.raises(ValueError, match="needs the vanilla model"):
        build_method("bcp_distill", _model(params), params["bcp_distill"], torch.Generator(), 100)
    facts = METHOD_FACTS["bcp_distill"]
    assert facts.reads_guide and not facts.similarity_term and facts.paired_with == "bcp"
    layout = RunLayout.of(params)
    vanilla = _model(params, seed=5)
    (tmp_path / layout.vanilla_model).parent.mkdir(parents=True)
    torch.save({"state_dict": vanilla.state_dict(), "model": params["model"], "data_sha256": "x"},
               tmp_path / layout.vanilla_model)
    # no SVD export here
    context = method_context("bcp_distill", params["bcp_distill"], tmp_path, layout, torch.device("cpu"))
    assert set(context["guide"]) == {"model"}
    assert all(torch.equal(a, b) for a, b in zip(context["guide"]["model"].state_dict().values(),
                                                 vanilla.state_dict().values()))


@pytest.mark.parametrize("teacher", ["untrained", "labels"])
def test_the_no_guide_teachers_read_no_vanilla_model(params, tmp_path, teacher):
    """Their runs are the guide's controls: neither the DAG (`trains_with_guide`, which gives
    the train rule the vanilla model as an input) nor the method's context reads the guide,
    so a guide that changes does not retrain them and none need exist."""
    cfg = {**params["bcp_distill"], "distill_teacher": teacher}
    run = CertifiedRun("bcp_distill", cfg, 0, "bcp_distill-" + teacher)
    assert is_no_guide_control(run) and not trains_with_guide(run)
    assert trains_with_guide(run._replace(config=params["bcp_distill"]))
    context = method_context("bcp_distill", cfg, tmp_path, RunLayout.of(params), torch.device("cpu"))
    assert "guide" not in context   # tmp_path holds no vanilla model: nothing was read
    method = build_method("bcp_distill", _model(params), cfg, torch.Generator().manual_seed(1), 100, context)
    assert (method.teacher is None) == (teacher == "labels")
