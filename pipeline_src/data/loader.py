"""Batches straight from uint8 tensors that live on the training device, with
the augmentation done there too (no DataLoader, no worker processes): the
training path never waits on the host."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of uint8 (N,C,H,W),
    one gather for the whole batch."""
    n, _, h, w = images.shape
    out = images
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
        rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        out = padded[batch, chans, rows, cols]
    if flip:
        mirror = torch.rand(n, generator=generator, device=images.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [0, 1]: the input domain the bounds are stated on."""
    return images.float().div_(255.0)


class DeviceBatches:
    """Epochs of (x float in [0,1], y) batches from uint8 tensors on `device`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device,
                 shuffle: bool = False, crop_padding: int = 0, flip: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False,
                 with_indices: bool = False):
        if shuffle or crop_padding or flip:
            if generator is None:
                raise ValueError("a generator is needed for shuffling or augmentation")
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip, self.generator = crop_padding, flip, generator
        self.with_indices = with_indices

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """(x, y), or (x, y, example indices) with `with_indices`."""
        n = len(self.labels)
        order = (torch.randperm(n, generator=self.generator, device=self.images.device)
                 if self.shuffle else torch.arange(n, device=self.images.device))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[idx]
            if self.crop_padding or self.flip:
                x = random_crop_flip(x, self.crop_padding, self.flip, self.generator)
            if self.with_indices:
                yield to_unit_float(x), self.labels[idx], idx
            else:
                yield to_unit_float(x), self.labels[idx]
