"""The vanilla model's accuracy on the test subset the certified rows use (Table 2's
vanilla row); the checks that it learned are in models/guide_checks.py."""
from __future__ import annotations

import torch

from ..data.subsets import stratified_test_indices


def certify_subset_accuracy(model: torch.nn.Module, data, params: dict, device: torch.device) -> dict:
    """{"images": n, "accuracy": %} of `model` on the test images that the certify stage
    certifies and attacks (`certify.test_images`, `stratified_test_indices`): Table 2's
    vanilla row on the same images as the certified rows."""
    from ..data.loader import DeviceBatches
    from .common import evaluate

    index = stratified_test_indices(data.test_y, params["certify"]["test_images"])
    batches = DeviceBatches(data.test_x[index], data.test_y[index], params["vanilla"]["eval_batch_size"], device)
    return {"images": len(index), "accuracy": evaluate(model, batches)["accuracy"]}
