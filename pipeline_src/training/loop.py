"""The epoch skeleton that vanilla and certified training share: per epoch, the
batches under a progress bar, one step per batch, the step's sums on the device
(no host sync per step), the epoch's history row (with its seconds and peak
memory), and a checkpoint to resume from. What a step does and what a row holds
is the stage's."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from ..runtime import peak_memory_mb, reset_peak_memory
from .common import Checkpoint


class Tally:
    """Running sums of one epoch: tensors stay on their device, numbers are python's."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, name: str, value) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros_like(value) if torch.is_tensor(value) else 0
        self.sums[name] += value

    def __getitem__(self, name: str) -> float:
        """The sum as a python number (0 when nothing was added)."""
        value = self.sums.get(name, 0)
        return value.item() if torch.is_tensor(value) else value


def train_epochs(stage: str, epochs: int, start_epoch: int, batches: Iterable, *,
                 step: Callable[[float, tuple, Tally], None],
                 start_epoch_hook: Callable[[int], None] | None = None,
                 summarise: Callable[[int, Tally], dict],
                 end_epoch: Callable[[dict], dict | None],
                 model: torch.nn.Module, optimizer, generator: torch.Generator, checkpoint: Checkpoint,
                 history: list[dict], device: torch.device) -> list[dict]:
    """Epochs `start_epoch` .. `epochs - 1`, appending one row each to `history`.

    `step(progress, batch, tally)`: one training step at the fractional epoch
    `progress`, adding what the row needs to `tally`; `start_epoch_hook(epoch)`:
    before the epoch's first step (e.g. its learning rate); `summarise(epoch, tally)`:
    the row's columns, after the epoch's seconds are taken (evaluation is not
    timed); `end_epoch(row)`: prints the epoch's line and returns the checkpoint's
    `extra` (what else the stage resumes with), or None."""
    steps = len(batches)
    for epoch in range(start_epoch, epochs):
        model.train()
        if start_epoch_hook is not None:
            start_epoch_hook(epoch)
        reset_peak_memory(device)
        started = time.perf_counter()
        tally = Tally()
        bar = tqdm(batches, total=steps, desc=f"{stage} {epoch + 1}/{epochs}", leave=False,
                   mininterval=2.0, dynamic_ncols=True)
        for index, batch in enumerate(bar):
            step(epoch + index / steps, batch, tally)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, **summarise(epoch, tally), "seconds": seconds,
               "peak_memory_mb": peak_memory_mb(device)}
        history.append(row)
        extra = end_epoch(row)
        checkpoint.save(epoch=epoch + 1, model=model, optimizer=optimizer, generator=generator,
                        history=history, extra=extra)
    return history


def last_step_progress(epoch: int, steps: int) -> float:
    """The fractional epoch of an epoch's last step (what its row reports eps, kappa or lr at)."""
    return epoch + (steps - 1) / steps
