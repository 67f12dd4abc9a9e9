"""`init_from: vanilla_unit_norm` (issue 22, candidate 2): the trained guide with each
layer scaled to operator norm <= 1 and each bias by the running product of the scales,
so that a positively homogeneous network computes the same classifier at 1 / prod(s)
the logit scale."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline_src.spectral.operator_norm import operator_norm_upper_bound, unit_norm_rescaled_
from tiny_nets import single_thread, tiny_net  # noqa: F401  (single_thread: autouse fixture)


@pytest.mark.parametrize("arch", ["tiny_conv", "tiny_dense"])
@pytest.mark.parametrize("activation", ["relu", "maxmin"])
def test_every_layer_has_norm_at_most_one_and_the_classifier_is_kept(arch, activation):
    model = tiny_net(arch, activation, seed=3, scale=2.0)   # layers well above norm 1
    original = copy.deepcopy(model)
    x = torch.rand((16,) + tuple(model.weight_layers()[0].input_shape), generator=torch.Generator().manual_seed(0))
    scales = unit_norm_rescaled_(model)
    assert len(scales) == len(model.weight_layers()) and all(s > 1 for s in scales)
    assert all(operator_norm_upper_bound(layer) <= 1 + 1e-6 for layer in model.weight_layers())
    product = torch.tensor(scales, dtype=torch.float64).prod().item()
    with torch.no_grad():
        before, after = original(x), model(x)
    assert torch.allclose(after * product, before, rtol=1e-4, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))


def test_a_clipped_relu_network_is_rescaled_but_its_function_changes():
    model = tiny_net("tiny_dense", "clipped_relu", seed=4, scale=2.0, theta_max=0.2)
    original = copy.deepcopy(model)
    x = torch.rand((32, 9), generator=torch.Generator().manual_seed(1))
    scales = unit_norm_rescaled_(model)
    assert all(operator_norm_upper_bound(layer) <= 1 + 1e-6 for layer in model.weight_layers())
    product = torch.tensor(scales, dtype=torch.float64).prod().item()
    with torch.no_grad():
        assert not torch.allclose(model(x) * product, original(x), rtol=1e-3)
