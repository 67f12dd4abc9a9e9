"""The epoch skeleton that vanilla and certified training share (`Epochs`): resume
from the checkpoint, per epoch the batches under a progress bar with their
fractional epoch, the epoch's seconds and peak memory in its history row, and a
checkpoint to resume from; the step's sums stay on the device (`Tally`, no host
sync per step). What a step does and what a row holds is the stage's."""
from __future__ import annotations

import time
from typing import Iterable, Iterator

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


class Epochs:
    """A stage's epochs after those its checkpoint holds, read as

        epochs = Epochs(...)                        # resumed: epochs.history, epochs.extra
        for epoch in epochs:                        # 0-based, the model in training mode
            for progress, batch in epochs.steps(epoch):
                ...                                 # one step at the fractional epoch `progress`
            row = epochs.record(epoch, columns)     # the history row (+ seconds, peak memory)
            epochs.checkpoint(epoch, extra)         # what else the stage resumes with

    The seconds are the steps' only (evaluation between `steps` and `record` is not
    timed); the peak memory is the whole epoch's, evaluation included."""

    def __init__(self, stage: str, total: int, batches: Iterable, *, model: torch.nn.Module, optimizer,
                 generator: torch.Generator, checkpoint: Checkpoint, device: torch.device):
        self.stage, self.total, self.batches, self.device = stage, total, batches, device
        self.model, self.optimizer, self.generator, self._checkpoint = model, optimizer, generator, checkpoint
        resumed = checkpoint.load(model, optimizer, generator)
        self.resumed = resumed is not None
        self.start, self.history, self.extra = resumed if resumed else (0, [], {})
        self.seconds = float("nan")

    def __iter__(self) -> Iterator[int]:
        for epoch in range(self.start, self.total):
            self.model.train()
            yield epoch

    def steps(self, epoch: int) -> Iterator[tuple[float, tuple]]:
        """(fractional epoch, batch) for each batch of the epoch, timed from the first."""
        steps = len(self.batches)
        reset_peak_memory(self.device)
        started = time.perf_counter()
        bar = tqdm(self.batches, total=steps, desc=f"{self.stage} {epoch + 1}/{self.total}", leave=False,
                   mininterval=2.0, dynamic_ncols=True)
        for index, batch in enumerate(bar):
            yield epoch + index / steps, batch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - started

    def record(self, epoch: int, columns: dict) -> dict:
        """The epoch's history row (1-based epoch, the stage's columns, seconds, peak memory), appended."""
        row = {"epoch": epoch + 1, **columns, "seconds": self.seconds, "peak_memory_mb": peak_memory_mb(self.device)}
        self.history.append(row)
        return row

    def checkpoint(self, epoch: int, extra: dict | None = None) -> None:
        self._checkpoint.save(epoch=epoch + 1, model=self.model, optimizer=self.optimizer, generator=self.generator,
                              history=self.history, extra=extra)


def last_step_progress(epoch: int, steps: int) -> float:
    """The fractional epoch of an epoch's last step (what its row reports eps, kappa or lr at)."""
    return epoch + (steps - 1) / steps
