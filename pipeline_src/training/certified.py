"""The shared certified training loop (one entry point for every method).

Schedule (per method, from its params block), with t = epoch + batch/steps:
  * warm-up, t < warmup_epochs: plain cross-entropy (eps = 0, kappa = 1);
  * ramp over ramp_epochs: eps = p * eps_train and kappa = 1 - p * (1 - kappa_final),
    p = (t - warmup) / ramp, interpolated per batch;
  * loss = kappa * CE(z, y) + (1 - kappa) * (CE(z_hat, y) + the method's robust-loss
    penalty, e.g. LocalBCP's sparsity term) (+ the method's regulariser, applied at
    every step, warm-up included, e.g. Duet's similarity term); the history's
    `regulariser` column is the sum of both, each with its own weight (lambda,
    sparsity_weight) but not (1 - kappa),
    z_hat the method's worst-case logits; Adam;
  * learning rate: constant through warm-up and ramp, then the reference's
    decay: `step` (x gamma every step_epochs) or `exponential` (to final_lr at
    the last epoch).
Model selection: the epoch with the best *sound* certified accuracy on the
validation split at the test radius (never the test set). A checkpoint after
every epoch makes an interrupted run continue to the same weights.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import method_runs
from ..bounds.certifiers import certify_batch, layer_norms, sound_numerics
from ..data.cifar import load_cache
from ..data.loader import DeviceBatches
from ..io import save_json, save_torch, state_dict_sha256
from ..methods import METHODS, build_method, certified_loss, method_context
from ..models import build_model
from ..models.loading import copy_weight_layers
from ..paths import RunLayout
from ..runtime import (make_generator, peak_memory_mb, reset_peak_memory, resolve_device, seed_everything,
                       stage_seed, use_fp32_numerics)
from .common import (Checkpoint, params_fingerprint, run_provenance, set_learning_rate, vanilla_initial_model,
                     write_history)


def eps_kappa(cfg: dict, progress: float) -> tuple[float, float]:
    """(eps, kappa) at a fractional epoch."""
    if progress < cfg["warmup_epochs"]:
        return 0.0, 1.0
    ramp = (progress - cfg["warmup_epochs"]) / max(cfg["ramp_epochs"], 1e-12)
    ramp = min(max(ramp, 0.0), 1.0)
    return ramp * cfg["eps_train"], 1.0 - ramp * (1.0 - cfg["kappa_final"])


def certified_learning_rate(cfg: dict, epoch: int) -> float:
    """Constant until the ramp ends (and `delay_epochs` more), then the method's
    decay (per epoch, `epoch` counted from 0).

    `step` is the BCP reference's `StepLR.step(epoch=max(t - ramp - warmup, 0))`:
    the lr is first multiplied by gamma `step_epochs` epochs after the ramp ends
    (epoch 141 of BCP's 200: warm-up 10, ramp 121, step 10)."""
    schedule = cfg["lr_schedule"]
    decay_start = cfg["warmup_epochs"] + cfg["ramp_epochs"] + schedule.get("delay_epochs", 0)
    if schedule["kind"] == "constant" or epoch < decay_start:
        return cfg["lr"]
    if schedule["kind"] == "step":
        return cfg["lr"] * schedule["gamma"] ** ((epoch - decay_start) // schedule["step_epochs"])
    # exponential: lr -> final_lr over the remaining epochs
    span = max(cfg["epochs"] - 1 - decay_start, 1)
    return cfg["lr"] * (schedule["final_lr"] / cfg["lr"]) ** ((epoch - decay_start) / span)


def sound_certified_accuracy(model, batches, eps: float, certifier: str) -> tuple[float, float]:
    """(clean accuracy %, certified accuracy %) with the sound certifier."""
    correct = certified = count = 0
    with sound_numerics(model):
        norms = layer_norms(model, power_iterations=50)
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum().item()
            certified += certify_batch(model, x, y, eps, norms, [certifier])[certifier].sum().item()
            count += len(y)
    return 100.0 * correct / count, 100.0 * certified / count


def train_certified(params: dict, run_name: str, root: Path) -> dict:
    """Train one run of `method_runs(params)` (a method, or a point of Duet's grid)."""
    layout = RunLayout.of(params)
    method_name, cfg, seed, group = method_runs(params)[run_name]
    eps_test = params["certify"]["eps"]
    device = resolve_device(params["run"]["device"])
    use_fp32_numerics()
    # A method paired with another (Duet with BCP) draws its seeds as that one does:
    # same initial weights, same batches, for each seed.
    family = METHODS[method_name].seed_family()
    seed_everything(stage_seed(seed, "train", family))
    data = load_cache(root / layout.data_cache)
    model_params = {**params["model"], **cfg.get("model", {})}
    model = build_model(model_params)
    if cfg["init_from"] == "vanilla_init":
        copy_weight_layers(vanilla_initial_model(params), model)
    model = model.to(device)
    generator = make_generator(stage_seed(seed, "train", family, "data"), device)
    method = build_method(method_name, model, cfg, generator, len(data.train_y),
                          method_context(method_name, root, layout, device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    train = DeviceBatches(data.train_x, data.train_y, cfg["batch_size"], device, shuffle=True,
                          crop_padding=cfg["augment"]["crop_padding"], flip=cfg["augment"]["flip"],
                          generator=generator, with_indices=True)
    val = DeviceBatches(data.val_x, data.val_y, params["certify"]["batch_size"], device)

    checkpoint = Checkpoint(root / layout.train(run_name, "checkpoint.pt"),
                            params_fingerprint(run_name, model_params, cfg, seed, eps_test,
                                               data.provenance["sha256"], data.provenance["images"]))
    resumed = checkpoint.load(model, optimizer, generator)
    start_epoch, history, extra = resumed if resumed else (0, [], {})
    if resumed:
        method.load_state_dict(extra["method"])
    best = extra.get("best", {"val_certified": -1.0, "epoch": 0, "state_dict": None})

    steps = len(train)
    for epoch in range(start_epoch, cfg["epochs"]):
        model.train()
        lr = certified_learning_rate(cfg, epoch)
        set_learning_rate(optimizer, lr)
        reset_peak_memory(device)
        started = time.perf_counter()
        sums = {k: torch.zeros((), device=device)
                for k in ("clean_loss", "robust_loss", "lipschitz", "regulariser")}
        counts = {k: torch.zeros((), device=device, dtype=torch.long) for k in ("correct", "certified")}
        seen = bounded = 0
        bar = tqdm(train, total=steps, desc=f"{run_name} {epoch + 1}/{cfg['epochs']}", leave=False,
                   mininterval=2.0, dynamic_ncols=True)
        for step, (x, y, index) in enumerate(bar):
            eps, kappa = eps_kappa(cfg, epoch + step / steps)
            logits = method.forward(x)
            clean_loss = F.cross_entropy(logits, y)
            loss = clean_loss
            regulariser = method.regulariser(x, y, logits)
            if kappa < 1.0:
                bounds = method.bounds(x, y, logits, eps, index)
                loss, robust_loss = certified_loss(clean_loss, bounds, y, kappa)
                if bounds.penalty is not None:
                    sums["regulariser"] += bounds.penalty.detach() * len(y)
                worst = bounds.worst_logits.detach()
                margin_ok = worst.gather(1, y[:, None]).squeeze(1) > \
                    worst.scatter(1, y[:, None], float("-inf")).amax(1)
                sums["robust_loss"] += robust_loss.detach() * len(y)
                sums["lipschitz"] += bounds.lipschitz * len(y)
                counts["certified"] += (margin_ok & (logits.argmax(1) == y)).sum()
                bounded += len(y)
            if regulariser is not None:
                loss = loss + regulariser
                sums["regulariser"] += regulariser.detach() * len(y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            method.after_step()
            sums["clean_loss"] += clean_loss.detach() * len(y)
            counts["correct"] += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        val_clean, val_certified = sound_certified_accuracy(model, val, eps_test, method.certifier)
        nan = float("nan")
        row = {"epoch": epoch + 1,
               "clean_loss": sums["clean_loss"].item() / seen,
               "clean_accuracy": 100.0 * counts["correct"].item() / seen,
               "robust_loss": sums["robust_loss"].item() / bounded if bounded else nan,
               "certified_accuracy": 100.0 * counts["certified"].item() / bounded if bounded else nan,
               "lipschitz": sums["lipschitz"].item() / bounded if bounded else nan,
               "regulariser": sums["regulariser"].item() / seen,
               "eps": eps, "kappa": kappa, "lr": lr,
               "val_clean_accuracy": val_clean, "val_certified_accuracy": val_certified,
               "seconds": seconds, "peak_memory_mb": peak_memory_mb(device)}
        history.append(row)
        # Selection only once the bound is trained for (after warm-up), best on validation.
        if epoch + 1 > cfg["warmup_epochs"] and val_certified > best["val_certified"]:
            best = {"val_certified": val_certified, "epoch": epoch + 1,
                    "state_dict": copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})}
        print(f"[{run_name}] epoch {row['epoch']}/{cfg['epochs']} eps {eps:.4f} kappa {kappa:.2f} | "
              f"train clean {row['clean_accuracy']:.1f}% cert {row['certified_accuracy']:.1f}% | "
              f"val clean {val_clean:.1f}% cert {val_certified:.1f}% | lr {lr:.3g} | {seconds:.1f}s",
              flush=True)
        checkpoint.save(epoch=epoch + 1, model=model, optimizer=optimizer, generator=generator,
                        history=history, extra={"method": method.state_dict(), "best": best})

    if best["state_dict"] is None:  # no epoch after warm-up: keep the last
        best = {"val_certified": history[-1]["val_certified_accuracy"], "epoch": len(history),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    save_torch({"state_dict": best["state_dict"], "model": model_params, "method": method_name,
                "epoch": best["epoch"], "data_sha256": data.provenance["sha256"]},
               root / layout.train(run_name, "model.pt"))
    write_history(history, root / layout.train(run_name, "history.csv"))
    metrics = {
        "stage": "train", "run": run_name, "group": group, "method": method_name, "config": cfg,
        "profile": params["profile"],
        "arch": model_params["arch"], "activation": model_params["activation"],
        "epochs": cfg["epochs"], "seed": seed, "eps_train": cfg["eps_train"], "eps_test": eps_test,
        "selected_epoch": best["epoch"], "val_certified_accuracy": best["val_certified"],
        "weights_sha256": state_dict_sha256(best["state_dict"]),
        **run_provenance(history, data.provenance, device, root),
    }
    save_json(metrics, root / layout.train(run_name, "metrics.json"))
    checkpoint.remove()
    return metrics
