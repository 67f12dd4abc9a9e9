"""The test subset certified and attacked when `certify.test_images` is set: drawn
across the classes (the test set may be sorted by class), seeded, the same for
every method."""
from __future__ import annotations

import torch

from pipeline_src.data.subsets import evaluated_test_split, stratified_test_indices


class _Data:
    def __init__(self, labels):
        self.test_y = labels
        self.test_x = torch.arange(len(labels))[:, None]


def test_a_class_sorted_test_set_gives_every_class_its_share():
    labels = torch.arange(10).repeat_interleave(50)          # sorted by class, as the JPEG copy's
    index = stratified_test_indices(labels, 100)
    assert len(index) == 100 and len(set(index.tolist())) == 100
    assert torch.bincount(labels[index], minlength=10).tolist() == [10] * 10
    assert torch.equal(index, torch.sort(index).values)     # in the test set's order
    assert torch.equal(index, stratified_test_indices(labels, 100))   # seeded: one subset for all
    assert not torch.equal(index, torch.arange(100))          # not the first 100 (two classes)


def test_uneven_classes_and_remainders():
    labels = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    index = stratified_test_indices(labels, 15)
    counts = torch.bincount(labels[index], minlength=3).tolist()
    assert sum(counts) == 15 and counts[0] in (10, 11) and counts[1] in (3, 4) and counts[2] in (1, 2)


def test_no_limit_or_a_large_one_is_the_whole_set():
    labels = torch.arange(5).repeat(3)
    assert torch.equal(stratified_test_indices(labels, None), torch.arange(15))
    assert torch.equal(stratified_test_indices(labels, 100), torch.arange(15))
    x, y = evaluated_test_split(_Data(labels), {"test_images": 5})
    assert sorted(y.tolist()) == [0, 1, 2, 3, 4] and torch.equal(labels[x.flatten()], y)
