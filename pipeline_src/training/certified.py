"""The certified training loop, one for every method: the step, the epoch and the
run (`certified_step`, `train_certified`), then the helpers they call.

The loss of a step, z the clean logits and z_hat the method's worst-case logits at eps:

    loss   = kappa * CE(z, y) + (1 - kappa) * robust + similarity
    robust = CE(z_hat, y) + sparsity,   or GloRo's TRADES: CE(z, y) + trades

  * robust: the bound's term, only while kappa < 1; sparsity (LocalBCP's, optional)
    and trades (GloRo's lambda KL, with `loss: trades`) come with the bound
    (`StepBounds`), each with its own weight applied;
  * similarity: Duet's term (`regulariser`, lambda applied), at every step, warm-up
    included, times the weight of the block's optional `regulariser_schedule`
    (`regulariser_weight`; absent: constant 1); the history's `regulariser` column is
    the sum of sparsity, trades and similarity, without (1 - kappa).
Schedule (per method, from its params block), with t = epoch + batch/steps:
  * warm-up, t < warmup_epochs: eps = 0, kappa = 1 (no bound is computed);
  * ramp over ramp_epochs: eps = p * eps_train and kappa = 1 - p * (1 - kappa_final),
    p = (t - warmup) / ramp, interpolated per batch; Adam;
  * learning rate: constant through warm-up and ramp, then the reference's
    decay: `step` (x gamma every step_epochs) or `exponential` (to final_lr at
    the last epoch).
Model selection: the epoch with the best *sound* certified accuracy on the
validation split at the test radius (never the test set). A checkpoint after
every epoch makes an interrupted run continue to the same weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bounds.certifiers import certify_batch
from ..bounds.numerics import float64_model, layer_norms, sound_numerics
from ..runs import method_runs
from ..data.cifar import load_cache
from ..data.loader import DeviceBatches
from ..io import save_json, save_torch, state_dict_sha256
from ..methods import METHODS, StepBounds, build_method, method_context, untrained_guide
from ..models import build_model
from ..models.loading import copy_weight_layers, load_trained
from ..paths import RunLayout
from ..spectral.operator_norm import unit_norm_rescaled_
from ..runtime import make_generator, resolve_device, seed_everything, stage_seed, use_fp32_numerics
from .common import (Checkpoint, params_fingerprint, run_provenance, set_learning_rate, vanilla_initial_model,
                     write_history)
from .loop import Epochs, Tally, last_step_progress


# ---------------------------------------------------------------- the step, the epoch, the run
def certified_loss(clean_loss: torch.Tensor, bounds: StepBounds, y: torch.Tensor,
                   kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kappa * CE(z, y) + (1 - kappa) * robust (the module's docstring); returns it and
    CE(z_hat, y), the history's robust loss (for GloRo's TRADES not a term of the loss)."""
    robust_ce = F.cross_entropy(bounds.worst_logits, y)
    robust = robust_ce if bounds.trades is None else clean_loss + bounds.trades
    if bounds.sparsity is not None:
        robust = robust + bounds.sparsity
    return kappa * clean_loss + (1.0 - kappa) * robust, robust_ce


@dataclass
class StepOutcome:
    """What one certified step computed (the epoch's history sums it)."""
    logits: torch.Tensor
    clean_loss: torch.Tensor
    similarity: torch.Tensor | None
    bounds: StepBounds | None       # None while kappa = 1 (no bound is trained for)
    robust_loss: torch.Tensor | None


def certified_step(method, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   index: torch.Tensor, eps: float, kappa: float, regulariser_weight: float = 1.0) -> StepOutcome:
    """One training step of a certified method, for training and the benchmark alike: the
    clean pass, Duet's term (times `regulariser_weight`; at 0 it is not computed, and the
    step is the paired method's), the bound at eps while kappa < 1, the loss, backward,
    the optimizer's step, then the method's `after_step`."""
    logits = method.forward(x)
    clean_loss = F.cross_entropy(logits, y)
    # Duet's term comes first: its power-iteration step gives the bound its sigmas.
    similarity = method.regulariser(x, y, logits) if regulariser_weight > 0 else None
    if similarity is not None and regulariser_weight != 1.0:
        similarity = regulariser_weight * similarity
    loss, bounds, robust_loss = clean_loss, None, None
    if kappa < 1.0:
        bounds = method.bounds(x, y, logits, eps, index)
        loss, robust_loss = certified_loss(clean_loss, bounds, y, kappa)
    if similarity is not None:
        loss = loss + similarity
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_step()
    return StepOutcome(logits, clean_loss, similarity, bounds, robust_loss)


def train_certified(params: dict, run_name: str, root: Path) -> dict:
    """Train one run of `method_runs(params)` (a method, or a point of Duet's grid): the
    epochs its checkpoint lacks, each certified on the validation split, then the outputs
    of the selected epoch."""
    run = CertifiedRun.start(params, run_name, root)
    cfg, model, method, optimizer = run.cfg, run.model, run.method, run.optimizer
    epochs = Epochs(run_name, cfg["epochs"], run.train, model=model, optimizer=optimizer,
                    generator=run.generator, checkpoint=run.checkpoint, device=run.device)
    if epochs.resumed:
        method.load_state_dict(epochs.extra["method"])
    best = BestEpoch(cfg["warmup_epochs"], epochs.extra.get("best"))
    for epoch in epochs:
        set_learning_rate(optimizer, certified_learning_rate(cfg, epoch))
        tally = Tally()
        for progress, (x, y, index) in epochs.steps(epoch):
            tally_step(tally, certified_step(method, optimizer, x, y, index, *eps_kappa(cfg, progress),
                                             regulariser_weight(cfg, progress)), y)
        validation = sound_certified_accuracy(model, run.val, run.eps_test, method.certifier,
                                              certify=validation_certified(cfg, epoch))
        row = epochs.record(epoch, history_columns(cfg, epoch, len(run.train), tally, validation))
        best.consider(row, model)
        print_epoch(run_name, cfg["epochs"], row)
        epochs.checkpoint(epoch, {"method": method.state_dict(), "best": best.state})
    return run.finish(best.final(epochs.history, model), epochs.history, params["profile"], root)


# ---------------------------------------------------------------- what the step and the epoch tally
def tally_step(tally: Tally, out: StepOutcome, y: torch.Tensor) -> None:
    """Add a step to the epoch's sums (the bound's only where one was trained for)."""
    if out.bounds is not None:
        for term in (out.bounds.sparsity, out.bounds.trades):
            if term is not None:
                tally.add("regulariser", term.detach() * len(y))
        worst = out.bounds.worst_logits.detach()
        margin_ok = worst.gather(1, y[:, None]).squeeze(1) > worst.scatter(1, y[:, None], float("-inf")).amax(1)
        tally.add("robust_loss", out.robust_loss.detach() * len(y))
        tally.add("lipschitz", out.bounds.lipschitz * len(y))
        tally.add("certified", (margin_ok & (out.logits.argmax(1) == y)).sum())
        tally.add("bounded", len(y))
    if out.similarity is not None:
        tally.add("regulariser", out.similarity.detach() * len(y))
    tally.add("clean_loss", out.clean_loss.detach() * len(y))
    tally.add("correct", (out.logits.detach().argmax(1) == y).sum())
    tally.add("seen", len(y))


def history_columns(cfg: dict, epoch: int, steps: int, tally: Tally, validation: tuple[float, float]) -> dict:
    """An epoch's history columns (eps and kappa: its last step's)."""
    seen, bounded, nan = tally["seen"], tally["bounded"], float("nan")
    eps, kappa = eps_kappa(cfg, last_step_progress(epoch, steps))
    return {"clean_loss": tally["clean_loss"] / seen, "clean_accuracy": 100.0 * tally["correct"] / seen,
            "robust_loss": tally["robust_loss"] / bounded if bounded else nan,
            "certified_accuracy": 100.0 * tally["certified"] / bounded if bounded else nan,
            "lipschitz": tally["lipschitz"] / bounded if bounded else nan,
            "regulariser": tally["regulariser"] / seen,
            "eps": eps, "kappa": kappa, "lr": certified_learning_rate(cfg, epoch),
            "val_clean_accuracy": validation[0], "val_certified_accuracy": validation[1]}


# ---------------------------------------------------------------- schedules and validation
def eps_kappa(cfg: dict, progress: float) -> tuple[float, float]:
    """(eps, kappa) at a fractional epoch."""
    if progress < cfg["warmup_epochs"]:
        return 0.0, 1.0
    ramp = (progress - cfg["warmup_epochs"]) / max(cfg["ramp_epochs"], 1e-12)
    ramp = min(max(ramp, 0.0), 1.0)
    return ramp * cfg["eps_train"], 1.0 - ramp * (1.0 - cfg["kappa_final"])


# The weight of a method's regulariser (`regulariser`: Duet's similarity term, a
# distillation) over training, a block's optional `regulariser_schedule` (issue 22,
# candidate 1: a guide that helps early and leaves the certificate to BCP later):
#   constant        1 throughout (the default, and what a block without the key does)
#   until_ramp_end  1 through warm-up and ramp, 0 after
#   fade_over_ramp  1 through warm-up, 1 - p over the ramp (p as eps's), 0 after
REGULARISER_SCHEDULES = ("constant", "until_ramp_end", "fade_over_ramp")


def regulariser_weight(cfg: dict, progress: float) -> float:
    """The regulariser's weight at a fractional epoch (REGULARISER_SCHEDULES)."""
    schedule = cfg.get("regulariser_schedule", "constant")
    if schedule not in REGULARISER_SCHEDULES:
        raise ValueError(f"regulariser_schedule: '{schedule}' is not one of {REGULARISER_SCHEDULES}")
    if schedule == "constant":
        return 1.0
    ramp_end = cfg["warmup_epochs"] + cfg["ramp_epochs"]
    if schedule == "until_ramp_end":
        return 1.0 if progress < ramp_end else 0.0
    ramp = (progress - cfg["warmup_epochs"]) / max(cfg["ramp_epochs"], 1e-12)
    return 1.0 - min(max(ramp, 0.0), 1.0)


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


def sound_certified_accuracy(model, batches, eps: float, certifier: str,
                             certify: bool = True) -> tuple[float, float]:
    """(clean accuracy %, certified accuracy %) with the sound certifier; with `certify`
    false, the clean accuracy only (certified: NaN, not measured)."""
    correct = certified = count = 0
    with sound_numerics(model):
        norms = layer_norms(model, power_iterations=50) if certify else None
        model64 = float64_model(model) if certify else None  # one float64 copy for every batch
        for x, y in batches:
            correct += (model(x).argmax(1) == y).sum().item()
            if certify:
                certified += certify_batch(model, x, y, eps, norms, [certifier], model64)[certifier].sum().item()
            count += len(y)
    return 100.0 * correct / count, (100.0 * certified / count if certify else float("nan"))


def validation_certified(cfg: dict, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) certifies the validation split: not during warm-up,
    where no bound is trained and BestEpoch selects no epoch (the LocalBCP family's sound
    certification of the split costs as much as an epoch of the smoke run), unless the
    run has no other epoch to select."""
    return epoch >= cfg["warmup_epochs"] or epoch == cfg["epochs"] - 1


# ---------------------------------------------------------------- selection and the run's set-up and outputs
def percent(value: float) -> str:
    """`12.3%`, or `—` for a quantity not measured that epoch (no bounds during warm-up)."""
    return "—" if math.isnan(value) else f"{value:.1f}%"


def print_epoch(run_name: str, epochs: int, row: dict) -> None:
    print(f"[{run_name}] epoch {row['epoch']}/{epochs} eps {row['eps']:.4f} kappa {row['kappa']:.2f} | "
          f"train clean {percent(row['clean_accuracy'])} cert {percent(row['certified_accuracy'])} | "
          f"val clean {percent(row['val_clean_accuracy'])} cert {percent(row['val_certified_accuracy'])} | "
          f"lr {row['lr']:.3g} | {row['seconds']:.1f}s", flush=True)


class BestEpoch:
    """Model selection: the epoch with the best sound certified accuracy on the validation
    split, among the epochs after warm-up (the bound is trained for only then); its state
    is part of the checkpoint."""

    def __init__(self, warmup_epochs: int, state: dict | None = None):
        self.warmup_epochs = warmup_epochs
        self.state = state or {"val_certified": -1.0, "epoch": 0, "state_dict": None}

    def consider(self, row: dict, model: torch.nn.Module) -> None:
        if row["epoch"] > self.warmup_epochs and row["val_certified_accuracy"] > self.state["val_certified"]:
            self.state = {"val_certified": row["val_certified_accuracy"], "epoch": row["epoch"],
                          "state_dict": copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})}

    def final(self, history: list[dict], model: torch.nn.Module) -> dict:
        """The selected epoch; the last one when no epoch came after warm-up."""
        if self.state["state_dict"] is not None:
            return self.state
        return {"val_certified": history[-1]["val_certified_accuracy"], "epoch": len(history),
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


@dataclass
class CertifiedRun:
    """A run's model, method, optimizer, data and checkpoint, seeded as the run's seed and
    family say; `finish` writes its outputs."""
    name: str
    layout: RunLayout
    method_name: str
    cfg: dict
    seed: int
    group: str
    model_params: dict
    model: torch.nn.Module
    method: object
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    data: object
    train: DeviceBatches
    val: DeviceBatches
    device: torch.device
    eps_test: float
    checkpoint: Checkpoint

    @classmethod
    def start(cls, params: dict, run_name: str, root: Path) -> "CertifiedRun":
        layout = RunLayout.of(params)
        method_name, cfg, seed, group = method_runs(params)[run_name]
        device = resolve_device(params["run"]["device"])
        use_fp32_numerics()
        # A method paired with another (Duet with BCP) draws its seeds as that one does:
        # same initial weights, same batches, for each seed.
        family = METHODS[method_name].seed_family()
        seed_everything(stage_seed(seed, "train", family))
        data = load_cache(root / layout.data_cache, params)
        model_params = {**params["model"], **cfg.get("model", {})}
        model = build_model(model_params)
        if cfg["init_from"] == "vanilla_init":
            copy_weight_layers(vanilla_initial_model(params), model)
        elif cfg["init_from"] == "vanilla_unit_norm":
            # Issue 22, candidate 2: the guide's function, with none of its scale.
            guide = load_trained(root / layout.vanilla_model, torch.device("cpu"))
            unit_norm_rescaled_(guide)
            copy_weight_layers(guide, model)
        model = model.to(device)
        generator = make_generator(stage_seed(seed, "train", family, "data"), device)
        # The similarity term's no-guide control: the vanilla model's initial weights as the guide.
        guide = (untrained_guide(vanilla_initial_model(params), params["svd"], params["run"]["seed"], device)
                 if cfg.get("guide") == "untrained" else None)
        method = build_method(method_name, model, cfg, generator, len(data.train_y),
                              method_context(method_name, cfg, root, layout, device, guide))
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        train = DeviceBatches(data.train_x, data.train_y, cfg["batch_size"], device, shuffle=True,
                              crop_padding=cfg["augment"]["crop_padding"], flip=cfg["augment"]["flip"],
                              generator=generator, with_indices=True)
        val = DeviceBatches(data.val_x, data.val_y, params["certify"]["batch_size"], device)
        eps_test = params["certify"]["eps"]
        checkpoint = Checkpoint(root / layout.train(run_name, "checkpoint.pt"),
                                params_fingerprint(run_name, model_params, cfg, seed, eps_test,
                                                   data.provenance["sha256"], data.provenance["images"]))
        return cls(run_name, layout, method_name, cfg, seed, group, model_params, model, method, optimizer,
                   generator, data, train, val, device, eps_test, checkpoint)

    def finish(self, selected: dict, history: list[dict], profile: str, root: Path) -> dict:
        """The selected epoch's model, the history and the metrics written; the checkpoint removed."""
        layout, cfg, data = self.layout, self.cfg, self.data
        save_torch({"state_dict": selected["state_dict"], "model": self.model_params, "method": self.method_name,
                    "epoch": selected["epoch"], "data_sha256": data.provenance["sha256"]},
                   root / layout.train(self.name, "model.pt"))
        write_history(history, root / layout.train(self.name, "history.csv"))
        metrics = {
            "stage": "train", "run": self.name, "group": self.group, "method": self.method_name, "config": cfg,
            "profile": profile,
            "arch": self.model_params["arch"], "activation": self.model_params["activation"],
            "epochs": cfg["epochs"], "seed": self.seed, "eps_train": cfg["eps_train"], "eps_test": self.eps_test,
            "selected_epoch": selected["epoch"], "val_certified_accuracy": selected["val_certified"],
            "weights_sha256": state_dict_sha256(selected["state_dict"]),
            **run_provenance(history, data.provenance, self.device, root),
        }
        save_json(metrics, root / layout.train(self.name, "metrics.json"))
        self.checkpoint.remove()
        return metrics


