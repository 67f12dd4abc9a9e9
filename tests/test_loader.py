"""On-device batching and augmentation (pipeline_src/data/loader.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline_src.data.loader import DeviceBatches, random_crop_flip, to_unit_float

CPU = torch.device("cpu")


def random_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # values from 1: a zero pixel in the output can only come from the padding
    return torch.randint(1, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def window_offsets(image: torch.Tensor, out: torch.Tensor, padding: int, mirrored: bool) -> list:
    padded = F.pad(image, (padding,) * 4)
    found = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            window = padded[:, dy:dy + 32, dx:dx + 32]
            if mirrored:
                window = window.flip(-1)
            if torch.equal(window, out):
                found.append((dy, dx))
    return found


def test_identity_without_padding_and_flip():
    images = random_images(8)
    out = random_crop_flip(images, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and out.dtype == torch.uint8


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_is_a_window_of_the_padded_image(padding):
    images = random_images(24)
    out = random_crop_flip(images, padding, False, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    offsets = set()
    for image, crop in zip(images, out):
        found = window_offsets(image, crop, padding, mirrored=False)
        assert len(found) == 1, found
        offsets.add(found[0])
    assert len(offsets) > 1, "every image got the same crop"


def test_crop_and_flip():
    padding = 4
    images = random_images(32)
    out = random_crop_flip(images, padding, True, torch.Generator().manual_seed(2))
    assert out.dtype == torch.uint8
    mirrored_count = 0
    for image, crop in zip(images, out):
        plain = window_offsets(image, crop, padding, mirrored=False)
        mirrored = window_offsets(image, crop, padding, mirrored=True)
        assert len(plain) + len(mirrored) == 1, (plain, mirrored)
        mirrored_count += bool(mirrored)
    assert 0 < mirrored_count < len(images)


def test_flip_only_mirrors_some_images():
    images = random_images(32)
    out = random_crop_flip(images, 0, True, torch.Generator().manual_seed(3))
    flipped = [torch.equal(o, i.flip(-1)) for i, o in zip(images, out)]
    kept = [torch.equal(o, i) for i, o in zip(images, out)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 0 < sum(flipped) < len(images)


def test_seeded():
    images = random_images(16)
    a = random_crop_flip(images, 4, True, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, 4, True, torch.Generator().manual_seed(5))
    c = random_crop_flip(images, 4, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(images, random_images(16)), "the input was modified"


def test_to_unit_float():
    x = torch.tensor([0, 1, 128, 255], dtype=torch.uint8)
    out = to_unit_float(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0, 1, 128, 255]) / 255.0)
    assert x.tolist() == [0, 1, 128, 255]


# ---------------------------------------------------------------- DeviceBatches
def coded_dataset(n: int = 103):
    """Image i has channel 0 = i and channel 1 = 20 * label everywhere; label = i % 10."""
    idx = torch.arange(n)
    labels = idx % 10
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = idx.to(torch.uint8)[:, None, None]
    images[:, 1] = (20 * labels).to(torch.uint8)[:, None, None]
    images[:, 2] = 255
    return images, labels


def decode(x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Indices of a batch, checking that every label sits with its image."""
    centre = (x[:, :, 16, 16] * 255).round().long()
    assert torch.equal(centre[:, 1], 20 * y), "labels not aligned with images"
    assert torch.equal(centre[:, 0] % 10, y)
    return centre[:, 0].tolist()


@pytest.mark.parametrize("drop_last, expected_len, last_size", [(False, 11, 3), (True, 10, 10)])
def test_batch_count_and_order(drop_last, expected_len, last_size):
    images, labels = coded_dataset(103)
    batches = DeviceBatches(images, labels, 10, CPU, drop_last=drop_last)
    assert len(batches) == expected_len
    seen = []
    out = list(batches)
    assert len(out) == expected_len
    for x, y in out:
        assert x.dtype == torch.float32 and y.dtype == labels.dtype
        assert x.min() >= 0 and x.max() <= 1
        assert torch.equal(x, to_unit_float(images[decode(x, y)]))
        seen += decode(x, y)
    assert [len(y) for _, y in out][-1] == last_size
    assert seen == list(range(expected_len * 10 if drop_last else 103))


def test_exact_multiple():
    images, labels = coded_dataset(40)
    assert len(DeviceBatches(images, labels, 10, CPU)) == 4
    assert len(DeviceBatches(images, labels, 10, CPU, drop_last=True)) == 4
    assert len(DeviceBatches(images, labels, 64, CPU)) == 1
    assert len(DeviceBatches(images, labels, 64, CPU, drop_last=True)) == 0


def test_shuffle_sees_every_example_once():
    images, labels = coded_dataset(103)
    batches = DeviceBatches(images, labels, 16, CPU, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
    epochs = []
    for _ in range(2):
        seen = []
        for x, y in batches:
            assert x.min() >= 0 and x.max() <= 1 and x.dtype == torch.float32
            seen += decode(x, y)
        assert sorted(seen) == list(range(103))
        epochs.append(seen)
    assert epochs[0] != list(range(103)), "not shuffled"
    assert epochs[0] != epochs[1], "every epoch in the same order"
    again = DeviceBatches(images, labels, 16, CPU, shuffle=True,
                          generator=torch.Generator().manual_seed(0))
    assert [i for x, y in again for i in decode(x, y)] == epochs[0], "not reproducible"


def test_shuffle_drop_last():
    images, labels = coded_dataset(103)
    batches = DeviceBatches(images, labels, 16, CPU, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(1))
    seen = [i for x, y in batches for i in decode(x, y)]
    assert len(seen) == 96 and len(set(seen)) == 96


def test_augmented_batches_keep_labels_aligned():
    images, labels = coded_dataset(103)
    batches = DeviceBatches(images, labels, 32, CPU, shuffle=True, crop_padding=2, flip=True,
                            generator=torch.Generator().manual_seed(2))
    seen = []
    padded_somewhere = False
    for x, y in batches:
        seen += decode(x, y)  # the centre pixel survives a crop of padding 2
        padded_somewhere |= bool((x[:, 2] == 0).any())  # padding shows as zeros in channel 2
    assert sorted(seen) == list(range(103))
    assert padded_somewhere, "crop padding had no effect"


@pytest.mark.parametrize("kwargs", [{"shuffle": True}, {"crop_padding": 4}, {"flip": True}])
def test_randomness_needs_a_generator(kwargs):
    images, labels = coded_dataset(10)
    with pytest.raises(ValueError, match="generator"):
        DeviceBatches(images, labels, 4, CPU, **kwargs)
