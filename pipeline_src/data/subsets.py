"""Seeded, stratified subsets of a split: the test images that every method is
certified and attacked on (`certify.test_images`), the vanilla row of Table 2
measured on the same images, and the training subsets of the recipe probe.

The JPEG copy's splits are sorted by class: the first N images of a split are one
or two classes, never a subset to measure on."""
from __future__ import annotations

import torch

# The seed of the test subset (`certify.test_images`): one subset for every method and row.
TEST_SUBSET_SEED = 0


def stratified_indices(labels: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """All indices of `labels`, or `limit` of them drawn across the classes (seeded,
    stratified: each class in proportion to its size, the rounding remainder to the
    classes with the largest fractions), in the split's order."""
    n = len(labels)
    if not limit or limit >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels)
    counts = torch.bincount(labels, minlength=int(classes.max()) + 1)[classes]
    share = (counts.double() * limit / n).floor().long()
    for k in torch.argsort(counts.double() * limit / n - share, descending=True)[:limit - int(share.sum())]:
        share[k] += 1
    chosen = []
    for c, take in zip(classes.tolist(), share.tolist()):
        members = torch.nonzero(labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values


def stratified_test_indices(labels: torch.Tensor, limit: int | None) -> torch.Tensor:
    """The indices of the test images certified and attacked (`certify.test_images`):
    all of them, or `limit` drawn across the classes with TEST_SUBSET_SEED, the same
    for every method and every row of the tables."""
    return stratified_indices(labels, limit, TEST_SUBSET_SEED)


def evaluated_test_split(data, certify_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images certified and attacked (`stratified_test_indices`)."""
    index = stratified_test_indices(data.test_y, certify_cfg["test_images"])
    return data.test_x[index], data.test_y[index]
