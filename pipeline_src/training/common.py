"""What every training stage shares: the vanilla initial model, learning-rate
schedules, evaluation, per-epoch history, and resumable checkpoints (device,
seeds and numerics: `pipeline_src.runtime`)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..data.cifar import data_record
from ..io import atomic_path, git_commit, save_torch
from ..models import build_model
from ..runtime import device_name, machine_record, seed_everything, stage_seed


def vanilla_initial_model(params: dict):
    """The vanilla model exactly as the vanilla stage initialises it (its seed and its
    model block), before any training; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        random_state = random.getstate()
        seed_everything(stage_seed(params["run"]["seed"], "vanilla"))
        model = build_model(params["model"])
        random.setstate(random_state)
    return model


def learning_rate(params: dict, epoch_progress: float) -> float:
    """lr at a (fractional) epoch: linear warm-up, then cosine / step / constant."""
    base, warmup, epochs = params["lr"], params["warmup_epochs"], params["epochs"]
    if epoch_progress < warmup:
        return base * epoch_progress / warmup
    if params["schedule"] == "cosine":
        span = max(epochs - warmup, 1e-12)
        return base * 0.5 * (1 + math.cos(math.pi * min((epoch_progress - warmup) / span, 1.0)))
    if params["schedule"] == "step":
        return base * params["step_gamma"] ** int(epoch_progress // params["step_size"])
    return base


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable) -> dict[str, float]:
    """Clean cross-entropy and accuracy (%) over all batches."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": 100.0 * correct / count}


def params_fingerprint(*blocks: Any) -> str:
    """A hash of the params that shape a run; a checkpoint from other params is not resumed."""
    return hashlib.sha256(json.dumps(blocks, sort_keys=True).encode()).hexdigest()[:16]


def write_history(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
            writer.writeheader()
            writer.writerows(rows)


class Checkpoint:
    """One file with everything needed to continue a run exactly where it stopped.

    Written atomically after every epoch; removed once the stage has written its
    outputs, so that a forced rerun trains anew."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = Path(path), fingerprint

    @property
    def shown(self) -> str:
        """The path as the logs print it: relative to the working directory (the project
        root, where the stages run) when it lies below it, so no log names a machine's folder."""
        try:
            return self.path.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return str(self.path)

    def save(self, *, epoch: int, model, optimizer, generator: torch.Generator, history: list[dict],
             extra: dict | None = None) -> None:
        save_torch({"fingerprint": self.fingerprint, "epoch": epoch, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "history": history, "extra": extra or {}},
                   self.path)

    def load(self, model, optimizer, generator: torch.Generator) -> tuple[int, list[dict], dict] | None:
        """Restore state; returns (epochs done, history, extra), or None to start afresh."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            print(f"[resume] {self.shown}: made with other params, starting afresh")
            return None
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        print(f"[resume] {self.shown}: continuing after epoch {state['epoch']}")
        return state["epoch"], state["history"], state["extra"]

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def run_provenance(history: list[dict], provenance: dict, device: torch.device, root: Path) -> dict:
    """The part of a training metrics file that says where the numbers come from:
    the data (lossy or not), the timing on the named device, the code version.
    Wall-clock numbers differ between identical runs: they stay under `timing`."""
    seconds = [row["seconds"] for row in history]
    return {
        "data": data_record(provenance),
        "timing": {"device": device_name(device),
                   "seconds_per_epoch_mean": sum(seconds) / len(seconds),
                   "seconds_total": sum(seconds),
                   "peak_memory_mb": max(row["peak_memory_mb"] for row in history)},
        "git_commit": git_commit(root),
        "machine": machine_record(device),
    }
