"""Vanilla pretraining: schedules, and resuming an interrupted run."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline_src.config import load_params
from pipeline_src.data.cifar import build_cache
from pipeline_src.paths import RunLayout
from pipeline_src.training import common
from pipeline_src.training.common import learning_rate
from pipeline_src.training.vanilla import train_vanilla
from conftest import save_cut_cache


def _schedule(**overrides) -> dict:
    base = {"lr": 0.1, "warmup_epochs": 2, "epochs": 10, "schedule": "cosine",
            "step_size": 3, "step_gamma": 0.5}
    return {**base, **overrides}


def test_warmup_then_cosine_to_zero():
    cfg = _schedule()
    assert learning_rate(cfg, 0.0) == 0.0
    assert learning_rate(cfg, 1.0) == pytest.approx(0.05)
    assert learning_rate(cfg, 2.0) == pytest.approx(0.1)
    assert learning_rate(cfg, 6.0) == pytest.approx(0.05)
    assert learning_rate(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    values = [learning_rate(cfg, e / 10) for e in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_and_constant_schedules():
    step = _schedule(schedule="step", warmup_epochs=0)
    assert [learning_rate(step, e) for e in (0, 2.9, 3, 6.5)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    assert learning_rate(_schedule(schedule="constant", warmup_epochs=0), 7.3) == 0.1


@pytest.fixture
def tiny_run(tmp_path: Path):
    """Smoke params on a 200-image cut of the sample, written under a tmp root."""
    params = load_params("smoke")
    # 200 images of two classes cannot reach the smoke profile's accuracy threshold: none here.
    params["vanilla"] = {**params["vanilla"], "epochs": 3, "batch_size": 50, "eval_batch_size": 100,
                         "min_test_accuracy": 0.0}
    layout = RunLayout.of(params)
    cache = build_cache({**params["data"], "val_size": 100}, tmp_path / "full.pt",
                        tmp_path / "full.json", tmp_path)
    # 200 training and 20 validation images: each epoch's validation certifies them all.
    small = {**cache.__dict__, "train_x": cache.train_x[:200], "train_y": cache.train_y[:200],
             "val_x": cache.val_x[:20], "val_y": cache.val_y[:20]}
    save_cut_cache(small, tmp_path / layout.data_cache, params["data"])
    return params, layout


def _weights(root: Path, layout: RunLayout) -> dict:
    return torch.load(root / layout.vanilla_model, weights_only=False)["state_dict"]


def test_interrupted_run_resumes_to_the_same_weights(tiny_run, tmp_path: Path, monkeypatch):
    params, layout = tiny_run
    straight = tmp_path / "straight"
    (straight / layout.data_cache).parent.mkdir(parents=True)
    (straight / layout.data_cache).write_bytes((tmp_path / layout.data_cache).read_bytes())
    reference = train_vanilla(copy.deepcopy(params), straight)

    # Kill the run right after the checkpoint of epoch 2.
    original_save = common.Checkpoint.save

    def save_then_die(self, **kwargs):
        original_save(self, **kwargs)
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common.Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_vanilla(copy.deepcopy(params), tmp_path)
    assert (tmp_path / layout.vanilla_checkpoint).is_file()
    assert not (tmp_path / layout.vanilla_model).exists()
    monkeypatch.setattr(common.Checkpoint, "save", original_save)

    resumed = train_vanilla(copy.deepcopy(params), tmp_path)
    ref_w, res_w = _weights(straight, layout), _weights(tmp_path, layout)
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        assert torch.equal(ref_w[name], res_w[name]), name
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    history = (tmp_path / layout.vanilla_history).read_text().splitlines()
    assert len(history) == 1 + params["vanilla"]["epochs"]
    assert not (tmp_path / layout.vanilla_checkpoint).exists()


def test_checkpoint_of_other_params_is_not_resumed(tiny_run, tmp_path: Path, monkeypatch, capsys):
    params, layout = tiny_run
    original_save = common.Checkpoint.save

    def save_then_die(self, **kwargs):
        original_save(self, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_vanilla(copy.deepcopy(params), tmp_path)
    monkeypatch.setattr(common.Checkpoint, "save", original_save)
    changed = copy.deepcopy(params)
    changed["vanilla"]["lr"] = 0.002
    capsys.readouterr()
    train_vanilla(copy.deepcopy(changed), tmp_path)
    assert "starting afresh" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    (fresh / layout.data_cache).parent.mkdir(parents=True)
    (fresh / layout.data_cache).write_bytes((tmp_path / layout.data_cache).read_bytes())
    train_vanilla(copy.deepcopy(changed), fresh)
    assert json.loads((tmp_path / layout.vanilla_metrics).read_text())["weights_sha256"] == \
        json.loads((fresh / layout.vanilla_metrics).read_text())["weights_sha256"]


def test_training_lowers_the_loss(tiny_run, tmp_path: Path):
    params, layout = tiny_run
    params["vanilla"].update(epochs=6, lr=0.01, warmup_epochs=0)
    train_vanilla(params, tmp_path)
    rows = (tmp_path / layout.vanilla_history).read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    assert losses[-1] < losses[0]


def test_cuda_requested_without_gpu_is_a_clear_error(tiny_run, tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    params, _ = tiny_run
    params["run"]["device"] = "cuda"
    with pytest.raises(RuntimeError, match="run.device"):
        train_vanilla(params, tmp_path)


# ---------------------------------------------------------------- certified training
from pipeline_src.training import certified as certified_training  # noqa: E402
from pipeline_src.training.certified import (certified_learning_rate, eps_kappa, regulariser_weight,  # noqa: E402
                                             train_certified)


def _method_cfg(**overrides) -> dict:
    base = {"epochs": 20, "warmup_epochs": 2, "ramp_epochs": 8, "eps_train": 0.2, "kappa_final": 0.0,
            "lr": 1e-3, "lr_schedule": {"kind": "step", "step_epochs": 3, "gamma": 0.5, "final_lr": 1e-6}}
    return {**base, **overrides}


def test_eps_and_kappa_ramp_per_batch():
    cfg = _method_cfg()
    assert eps_kappa(cfg, 0.0) == (0.0, 1.0) and eps_kappa(cfg, 1.99) == (0.0, 1.0)
    assert eps_kappa(cfg, 2.0) == (0.0, 1.0)
    eps, kappa = eps_kappa(cfg, 6.0)
    assert eps == pytest.approx(0.1) and kappa == pytest.approx(0.5)
    assert eps_kappa(cfg, 2.5)[0] == pytest.approx(0.2 * 0.5 / 8)   # within an epoch, per batch
    assert eps_kappa(cfg, 10.0) == pytest.approx((0.2, 0.0)) and eps_kappa(cfg, 15.0) == pytest.approx((0.2, 0.0))
    assert eps_kappa(_method_cfg(kappa_final=0.5), 50.0)[1] == pytest.approx(0.5)


def test_regulariser_weight_schedules():
    """Warm-up 2 epochs, ramp 8: constant (the default), on until the ramp ends, or faded
    over the ramp as eps grows."""
    assert [regulariser_weight(_method_cfg(), t) for t in (0.0, 6.0, 15.0)] == [1.0, 1.0, 1.0]
    until = _method_cfg(regulariser_schedule="until_ramp_end")
    assert [regulariser_weight(until, t) for t in (0.0, 9.99, 10.0, 15.0)] == [1.0, 1.0, 0.0, 0.0]
    fade = _method_cfg(regulariser_schedule="fade_over_ramp")
    assert [regulariser_weight(fade, t) for t in (1.5, 2.0, 6.0, 10.0, 15.0)] == pytest.approx([1, 1, 0.5, 0, 0])
    for t in (0.0, 3.3, 7.0, 12.0):   # fading as eps grows: 1 - eps / eps_train
        assert regulariser_weight(fade, t) == pytest.approx(1 - eps_kappa(fade, t)[0] / fade["eps_train"])
    with pytest.raises(ValueError, match="regulariser_schedule: 'sometimes'"):
        regulariser_weight(_method_cfg(regulariser_schedule="sometimes"), 1.0)


def test_certified_lr_schedules():
    step = _method_cfg()
    # The first halving comes step_epochs after the ramp ends (warm-up 2 + ramp 8 = epoch 10).
    assert [certified_learning_rate(step, e) for e in (0, 9, 10, 12, 13, 16, 19)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4])
    # BCP's reference: StepLR(step_size=10, gamma=0.5).step(epoch=max(t - 131, 0)), t from 0.
    bcp = _method_cfg(epochs=200, warmup_epochs=10, ramp_epochs=121,
                      lr_schedule={"kind": "step", "step_epochs": 10, "gamma": 0.5, "final_lr": 1e-6})
    reference = [1e-3 * 0.5 ** (max(t - 131, 0) // 10) for t in range(200)]
    assert [certified_learning_rate(bcp, t) for t in range(200)] == pytest.approx(reference)
    assert certified_learning_rate(bcp, 140) == 1e-3 and certified_learning_rate(bcp, 141) == 5e-4
    exp = _method_cfg(lr_schedule={"kind": "exponential", "step_epochs": 1, "gamma": 0.5, "final_lr": 1e-6})
    assert certified_learning_rate(exp, 9) == 1e-3 and certified_learning_rate(exp, 10) == pytest.approx(1e-3)
    assert certified_learning_rate(exp, 19) == pytest.approx(1e-6)
    values = [certified_learning_rate(exp, e) for e in range(10, 20)]
    assert all(a > b for a, b in zip(values, values[1:]))
    delayed = {**exp, "lr_schedule": {**exp["lr_schedule"], "delay_epochs": 3}}
    assert [certified_learning_rate(delayed, e) for e in (10, 12)] == [1e-3, 1e-3]
    assert certified_learning_rate(delayed, 14) < 1e-3
    assert certified_learning_rate(delayed, 19) == pytest.approx(1e-6)


@pytest.mark.parametrize("method", ["lmt", "bcp", "localbcp"])
def test_certified_run_resumes_to_the_same_weights(tiny_run, tmp_path: Path, monkeypatch, method):
    params, layout = tiny_run
    params[method] = {**params[method], "epochs": 3, "warmup_epochs": 1, "ramp_epochs": 1,
                      "batch_size": 50}
    if method == "localbcp":  # the per-example vector cache is part of the resumed state
        params[method]["vector_cache"] = True
    params["certify"] = {**params["certify"], "batch_size": 100}
    # 100 of the 200 images, two steps an epoch: resuming is per epoch, not per step.
    cache = torch.load(tmp_path / layout.data_cache, weights_only=False)
    save_cut_cache({**cache, "train_x": cache["train_x"][:100], "train_y": cache["train_y"][:100]},
                   tmp_path / layout.data_cache, params["data"])
    straight = tmp_path / "straight"
    (straight / layout.data_cache).parent.mkdir(parents=True)
    (straight / layout.data_cache).write_bytes((tmp_path / layout.data_cache).read_bytes())
    reference = train_certified(copy.deepcopy(params), method, straight)

    original_save = common.Checkpoint.save

    def save_then_die(self, **kwargs):
        original_save(self, **kwargs)
        if kwargs["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(certified_training.Checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_certified(copy.deepcopy(params), method, tmp_path)
    monkeypatch.setattr(certified_training.Checkpoint, "save", original_save)
    resumed = train_certified(copy.deepcopy(params), method, tmp_path)
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["selected_epoch"] == reference["selected_epoch"]
    ref_hist = (straight / layout.train(method, "history.csv")).read_text().splitlines()
    res_hist = (tmp_path / layout.train(method, "history.csv")).read_text().splitlines()
    drop_time = lambda rows: [",".join(r.split(",")[:-2]) for r in rows]  # noqa: E731 (seconds, memory)
    assert drop_time(ref_hist) == drop_time(res_hist)
