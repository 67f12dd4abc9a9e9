"""A vanilla model near chance stops the pipeline (pipeline_src/training/vanilla_checks.py):
at the end of the vanilla stage and where the SVD export reads the guide; and the
vanilla stage's accuracy on the certified test subset (Table 2's vanilla row,
pipeline_src/training/vanilla.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline_src.config import ParamsError, load_params
from pipeline_src.data.cifar import CifarSplits, build_cache
from pipeline_src.data.subsets import stratified_test_indices
from pipeline_src.io import save_json, save_torch, state_dict_sha256
from pipeline_src.models import build_model
from pipeline_src.paths import RunLayout
from pipeline_src.training.vanilla import certify_subset_accuracy
from pipeline_src.training.vanilla_checks import VanillaNotLearnedError, check_guide, check_vanilla_learned


def params_with(threshold: float, profile: str = "smoke", **certify) -> dict:
    params = load_params(profile)
    params["vanilla"]["min_test_accuracy"] = threshold
    params["certify"].update(certify)
    return params


def metrics_of(accuracy: float, **extra) -> dict:
    return {"stage": "vanilla", "epochs": 3, "train_accuracy": 11.0, "test_accuracy": accuracy,
            "data": {"images": {"test": 500}}, **extra}


def test_every_profile_sets_a_threshold_above_chance():
    for profile in ("paper", "smoke", "gpu", "window"):
        assert load_params(profile)["vanilla"]["min_test_accuracy"] > 10.0, profile
    assert load_params("paper")["vanilla"]["min_test_accuracy"] == 50.0
    assert load_params("smoke")["vanilla"]["min_test_accuracy"] == 15.0


def test_a_model_at_the_threshold_passes():
    check_vanilla_learned(metrics_of(50.0), params_with(50.0))
    check_vanilla_learned(metrics_of(87.3), params_with(50.0))


def test_a_model_near_chance_is_refused_with_what_was_measured():
    with pytest.raises(VanillaNotLearnedError) as info:
        check_vanilla_learned(metrics_of(10.2), params_with(50.0, "paper"), "results/paper/vanilla/metrics.json")
    message = str(info.value)
    assert message.startswith("results/paper/vanilla/metrics.json: the vanilla model reached 10.20% test "
                              "accuracy on 500 images after 3 epochs (train accuracy 11.00%), chance is 10.00%")
    assert "below vanilla.min_test_accuracy = 50% of profile 'paper'" in message
    for key in ("vanilla.optimizer", "vanilla.lr", "vanilla.warmup_epochs", "model.init",
                "docs/vanilla-recipe.md", "`python -m pipeline_src vanilla --profile paper`"):
        assert key in message, key
    assert "\n" not in message
    assert isinstance(info.value, ParamsError)   # the commands print it on one line, exit status 2


def test_nan_accuracy_is_refused():
    with pytest.raises(VanillaNotLearnedError, match="nan% test accuracy"):
        check_vanilla_learned(metrics_of(float("nan")), params_with(15.0))


def test_the_control_stage_is_named_in_its_error():
    with pytest.raises(VanillaNotLearnedError, match="the vanilla_control model .* pipeline_src vanilla_control"):
        check_vanilla_learned(metrics_of(9.0, stage="vanilla_control"), params_with(15.0))


# ---------------------------------------------------------------- the guide, read by the SVD export
@pytest.fixture
def guide(tmp_path: Path):
    """A smoke-profile vanilla model and its metrics under a throw-away root."""
    params = load_params("smoke")
    layout = RunLayout.of(params)
    torch.manual_seed(0)
    model = build_model(params["model"])
    save_torch({"state_dict": model.state_dict(), "model": params["model"], "data_sha256": "x"},
               tmp_path / layout.vanilla_model)
    sha = state_dict_sha256(model.state_dict())

    def write_metrics(accuracy: float, weights: str = sha) -> Path:
        path = tmp_path / layout.vanilla_metrics
        save_json(metrics_of(accuracy, weights_sha256=weights), path)
        return path
    return params, layout, tmp_path, sha, write_metrics


def test_guide_without_metrics_or_with_others_metrics_is_refused(guide):
    params, layout, root, sha, write_metrics = guide
    with pytest.raises(VanillaNotLearnedError, match="no metrics of the vanilla model"):
        check_guide(root / layout.vanilla_metrics, sha, params)
    write_metrics(40.0, weights="0" * 64)
    with pytest.raises(VanillaNotLearnedError, match="describes other weights than the vanilla model"):
        check_guide(root / layout.vanilla_metrics, sha, params)
    write_metrics(40.0)
    assert check_guide(root / layout.vanilla_metrics, sha, params)["test_accuracy"] == 40.0


def test_svd_export_refuses_a_dead_guide_and_writes_nothing(guide, capsys):
    from pipeline_src.spectral.svd_export import export_svd

    params, layout, root, _, write_metrics = guide
    path = write_metrics(10.0)
    with pytest.raises(VanillaNotLearnedError, match=rf"{path}: the vanilla model reached 10\.00%"):
        export_svd(params, root, check_guide)
    assert not (root / layout.svd_factors).exists() and not (root / layout.svd_summary).exists()
    write_metrics(40.0, weights="0" * 64)
    with pytest.raises(VanillaNotLearnedError, match="describes other weights"):
        export_svd(params, root, check_guide)
    # A model with no vanilla stage's metrics beside it (the benchmark's stand-in guide):
    # exported, and the export says the accuracy was not checked.
    path.unlink()
    export_svd({**params, "svd": {**params["svd"], "power_iterations": 2}}, root, check_guide)
    assert "the guide's accuracy is not checked" in capsys.readouterr().out
    assert (root / layout.svd_factors).is_file()


# ---------------------------------------------------------------- Table 2's vanilla row
class ConstantClass(torch.nn.Module):
    """Predicts class 3 for every image."""

    def forward(self, x):
        logits = torch.zeros(len(x), 10)
        logits[:, 3] = 1.0
        return logits


def class_sorted_data(per_class: int = 50) -> CifarSplits:
    labels = torch.arange(10).repeat_interleave(per_class)
    images = torch.zeros(len(labels), 3, 32, 32, dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.int64)
    return CifarSplits(images, labels, images[:0], empty, images, labels, tuple(map(str, range(10))), {})


def test_certify_subset_accuracy_is_measured_on_the_certified_images():
    data = class_sorted_data()
    # The first 100 images are classes 0 and 1: a constant class-3 model would score 0 there.
    result = certify_subset_accuracy(ConstantClass(), data, params_with(15.0, test_images=100), torch.device("cpu"))
    assert result == {"images": 100, "accuracy": 10.0}
    assert len(stratified_test_indices(data.test_y, 100)) == 100
    everything = certify_subset_accuracy(ConstantClass(), data, params_with(15.0, test_images=None),
                                         torch.device("cpu"))
    assert everything == {"images": 500, "accuracy": 10.0}


def test_certify_subset_is_the_certify_and_pgd_stages_subset():
    from pipeline_src.certify import attack, stage
    from pipeline_src.data.subsets import evaluated_test_split
    from pipeline_src.training import vanilla

    assert stage.evaluated_test_split is attack.evaluated_test_split is vanilla.evaluated_test_split \
        is evaluated_test_split


def test_vanilla_stage_reports_the_subset_and_stops_below_the_threshold(tmp_path):
    """One epoch on the committed sample: the stage writes its model and metrics (with the
    certified subset's accuracy), then refuses the model, whose accuracy is below 100%."""
    from pipeline_src.training.vanilla import train_vanilla

    params = params_with(100.0)
    params["vanilla"]["epochs"] = 1
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    with pytest.raises(VanillaNotLearnedError, match=r"below vanilla\.min_test_accuracy = 100% of profile 'smoke'"):
        train_vanilla(params, tmp_path)
    metrics = json.loads((tmp_path / layout.vanilla_metrics).read_text())
    assert metrics["certify_subset"]["images"] == params["certify"]["test_images"] == 50
    assert 0.0 <= metrics["certify_subset"]["accuracy"] <= 100.0
    assert metrics["test_accuracy"] < 100.0
