"""The vanilla pretraining stage: the guide model of Duet, trained with plain
cross-entropy (paper: 90.06% clean accuracy on 6C2F).

Random crop (zero padding) and horizontal flip run on the training device on
uint8 tensors. The model is the last epoch's (no selection on any split); the
validation split is reported per epoch, the test set once at the end.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.cifar import load_cache
from ..data.loader import DeviceBatches
from ..data.subsets import evaluated_test_split
from ..io import save_json, save_torch, state_dict_sha256
from ..models import build_model
from ..paths import RunLayout
from ..runs import control_seed
from ..runtime import make_generator, resolve_device, seed_everything, stage_seed, use_fp32_numerics
from .common import (Checkpoint, evaluate, learning_rate, params_fingerprint, run_provenance, set_learning_rate,
                     write_history)
from .loop import Epochs, Tally, last_step_progress
from .vanilla_checks import check_vanilla_learned


def certify_subset_accuracy(model: torch.nn.Module, data, params: dict, device: torch.device) -> dict:
    """{"images": n, "accuracy": %} of `model` on the test images that the certify stage
    certifies and attacks (`certify.test_images`, `evaluated_test_split`): Table 2's
    vanilla row on the same images as the certified rows."""
    test_x, test_y = evaluated_test_split(data, params["certify"])
    batches = DeviceBatches(test_x, test_y, params["vanilla"]["eval_batch_size"], device)
    return {"images": len(test_y), "accuracy": evaluate(model, batches)["accuracy"]}


def make_optimizer(model: torch.nn.Module, params: dict) -> torch.optim.Optimizer:
    if params["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=params["lr"], momentum=params["momentum"],
                               nesterov=params["nesterov"] and params["momentum"] > 0,
                               weight_decay=params["weight_decay"])
    return torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])


def vanilla_outputs(layout: RunLayout, control: bool = False) -> dict[str, str]:
    """Where a vanilla training writes: the vanilla stage's folder, or the control's."""
    if control:
        return {name: layout.vanilla_control(f"{name}.{ext}") for name, ext in
                (("model", "pt"), ("history", "csv"), ("metrics", "json"), ("checkpoint", "pt"))}
    return {"model": layout.vanilla_model, "history": layout.vanilla_history,
            "metrics": layout.vanilla_metrics, "checkpoint": layout.vanilla_checkpoint}


def train_vanilla_control(params: dict, root: Path) -> dict:
    """Table 1's control: a second vanilla model, the same recipe from seed run.seed +
    similarity.control_seed_offset, into results/<run>/vanilla_control/."""
    layout = RunLayout.of(params)
    return train_vanilla(params, root, seed=control_seed(params), outputs=vanilla_outputs(layout, control=True),
                         stage="vanilla_control")


def train_vanilla(params: dict, root: Path, seed: int | None = None, outputs: dict[str, str] | None = None,
                  stage: str = "vanilla") -> dict:
    """Train a vanilla model; by default the vanilla stage's (run.seed, results/<run>/vanilla/).
    `seed` and `outputs` (vanilla_outputs) train another one with the same recipe."""
    layout = RunLayout.of(params)
    cfg = params["vanilla"]
    seed = params["run"]["seed"] if seed is None else seed
    paths = outputs or vanilla_outputs(layout)
    device = resolve_device(params["run"]["device"])
    use_fp32_numerics()
    seed_everything(stage_seed(seed, "vanilla"))
    data = load_cache(root / layout.data_cache, params)
    model = build_model(params["model"]).to(device)
    optimizer = make_optimizer(model, cfg)
    generator = make_generator(stage_seed(seed, "vanilla", "data"), device)
    train = DeviceBatches(data.train_x, data.train_y, cfg["batch_size"], device, shuffle=True,
                          crop_padding=cfg["augment"]["crop_padding"], flip=cfg["augment"]["flip"],
                          generator=generator)
    val = DeviceBatches(data.val_x, data.val_y, cfg["eval_batch_size"], device)
    test = DeviceBatches(data.test_x, data.test_y, cfg["eval_batch_size"], device)

    checkpoint = Checkpoint(root / paths["checkpoint"],
                            params_fingerprint(params["model"], cfg, seed, data.provenance["sha256"],
                                               data.provenance["images"]))
    epochs = Epochs(stage, cfg["epochs"], train, model=model, optimizer=optimizer, generator=generator,
                    checkpoint=checkpoint, device=device)
    steps = len(train)
    for epoch in epochs:
        tally = Tally()
        for progress, (x, y) in epochs.steps(epoch):
            set_learning_rate(optimizer, learning_rate(cfg, progress))
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.clamp_parameters_()
            tally.add("loss", loss.detach() * len(y))
            tally.add("correct", (logits.detach().argmax(1) == y).sum())
            tally.add("seen", len(y))
        val_metrics = evaluate(model, val) if len(data.val_y) else {"loss": float("nan"), "accuracy": float("nan")}
        row = epochs.record(epoch, {
            "train_loss": tally["loss"] / tally["seen"], "train_accuracy": 100.0 * tally["correct"] / tally["seen"],
            "val_loss": val_metrics["loss"], "val_accuracy": val_metrics["accuracy"],
            "lr": learning_rate(cfg, last_step_progress(epoch, steps))})
        print(f"[{stage}] epoch {row['epoch']}/{cfg['epochs']} train loss {row['train_loss']:.4f} "
              f"acc {row['train_accuracy']:.2f}% | val acc {row['val_accuracy']:.2f}% | lr {row['lr']:.4g} | "
              f"{row['seconds']:.1f}s", flush=True)
        epochs.checkpoint(epoch)
    history = epochs.history

    test_metrics = evaluate(model, test)
    save_torch({"state_dict": model.state_dict(), "model": params["model"],
                "data_sha256": data.provenance["sha256"]}, root / paths["model"])
    write_history(history, root / paths["history"])
    metrics = {
        "stage": stage,
        "profile": params["profile"],
        "arch": params["model"]["arch"],
        "activation": params["model"]["activation"],
        "epochs": cfg["epochs"],
        "seed": seed,
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "test_accuracy": test_metrics["accuracy"],
        "test_loss": test_metrics["loss"],
        "certify_subset": certify_subset_accuracy(model, data, params, device),
        "val_accuracy": history[-1]["val_accuracy"],
        "train_accuracy": history[-1]["train_accuracy"],
        **run_provenance(history, data.provenance, device, root),
    }
    if stage != "vanilla":
        metrics["control_seed_offset"] = seed - params["run"]["seed"]
    save_json(metrics, root / paths["metrics"])
    checkpoint.remove()
    print(f"[{stage}] test accuracy {metrics['test_accuracy']:.2f}% "
          f"({data.provenance['source']}{', lossy JPEG copy' if data.provenance['lossy_jpeg'] else ''})")
    check_vanilla_learned(metrics, params, root / paths["metrics"])
    return metrics
