"""The vanilla model must have learned before it guides Duet.

A model near chance (a dead recipe: loss stuck at ln 10 = 2.30) stops the pipeline
with the measured accuracy, the threshold (`vanilla.min_test_accuracy`) and the
params to change, instead of guiding Duet with noise: `check_vanilla_learned` at the
end of the vanilla stage (training/vanilla.py), `check_guide` again where the SVD
export reads the guide (the svd stage hands it to `spectral.svd_export.export_svd`).
They read only metrics files: the svd stage's code inputs gain this module alone."""
from __future__ import annotations

from pathlib import Path

from ..config import ParamsError
from ..io import load_json


class VanillaNotLearnedError(ParamsError):
    """The vanilla model is too close to chance to guide Duet (the recipe in the params
    did not learn, or the metrics do not describe the model that is read)."""


def check_vanilla_learned(metrics: dict, params: dict, where: str | Path = "vanilla/metrics.json") -> None:
    """Raise VanillaNotLearnedError unless the test accuracy in `metrics` reaches
    `vanilla.min_test_accuracy` (%)."""
    threshold = float(params["vanilla"]["min_test_accuracy"])
    accuracy = float(metrics.get("test_accuracy", float("nan")))
    if accuracy >= threshold:   # NaN fails too
        return
    classes = len(metrics.get("data", {}).get("classes", ())) or 10
    profile = params.get("profile", "<profile>")
    stage = metrics.get("stage", "vanilla")
    images = metrics.get("data", {}).get("images", {}).get("test")
    measured = f"{accuracy:.2f}% test accuracy" + (f" on {images} images" if images else "")
    trained = (f" after {metrics['epochs']} epochs (train accuracy {metrics['train_accuracy']:.2f}%)"
               if "epochs" in metrics and "train_accuracy" in metrics else "")
    raise VanillaNotLearnedError(
        f"{where}: the {stage} model reached {measured}{trained}, chance is {100.0 / classes:.2f}%, "
        f"below vanilla.min_test_accuracy = {threshold:g}% of profile '{profile}': it would guide Duet "
        f"near chance. Change the recipe (vanilla.optimizer, vanilla.lr, vanilla.warmup_epochs, "
        f"vanilla.epochs, model.init; docs/vanilla-recipe.md) and rerun `python -m pipeline_src "
        f"{stage} --profile {profile}`, or lower vanilla.min_test_accuracy where the profile trains "
        f"too little to learn more")


def check_guide(metrics_path: Path, weights_sha256: str, params: dict) -> dict:
    """Before the guide is used (the SVD export): its metrics file exists, describes these
    weights, and passes `check_vanilla_learned`. Returns the metrics."""
    vanilla = f"`python -m pipeline_src vanilla --profile {params.get('profile', '<profile>')}`"
    if not Path(metrics_path).is_file():
        raise VanillaNotLearnedError(f"{metrics_path}: no metrics of the vanilla model (its accuracy is "
                                     f"unknown); rerun {vanilla}")
    metrics = load_json(metrics_path)
    if metrics.get("weights_sha256") != weights_sha256:
        raise VanillaNotLearnedError(f"{metrics_path}: describes other weights than the vanilla model "
                                     f"({metrics.get('weights_sha256')} vs {weights_sha256}); rerun {vanilla}")
    check_vanilla_learned(metrics, params, metrics_path)
    return metrics
