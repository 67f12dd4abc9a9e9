"""The certified networks (pipeline_src/models): the BCP layer sequences, their
parameter counts and the activations MaxMin and ClippedReLU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline_src.models import (ARCHITECTURES, INPUT_SHAPE, NUM_CLASSES, CertifiableNet, ClippedReLU,
                                 MaxMin, build_model, make_activation)

ACTIVATIONS = {"relu": nn.ReLU, "maxmin": MaxMin, "clipped_relu": ClippedReLU}

# (kind, in, out, kernel, stride, padding, input_shape, output_shape), as in BCP (Lee et al. 2020)
SPEC = {
    "4C3F": [
        ("conv", 3, 32, 3, 1, 1, (3, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 4, 2, 1, (32, 32, 32), (32, 16, 16)),
        ("conv", 32, 64, 3, 1, 1, (32, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 4, 2, 1, (64, 16, 16), (64, 8, 8)),
        ("linear", 4096, 512, None, None, None, (4096,), (512,)),
        ("linear", 512, 512, None, None, None, (512,), (512,)),
        ("linear", 512, 10, None, None, None, (512,), (10,)),
    ],
    "6C2F": [
        ("conv", 3, 32, 3, 1, 1, (3, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 3, 1, 1, (32, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 4, 2, 1, (32, 32, 32), (32, 16, 16)),
        ("conv", 32, 64, 3, 1, 1, (32, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 3, 1, 1, (64, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 4, 2, 1, (64, 16, 16), (64, 8, 8)),
        ("linear", 4096, 512, None, None, None, (4096,), (512,)),
        ("linear", 512, 10, None, None, None, (512,), (10,)),
    ],
    "8C2F": [
        ("conv", 3, 32, 3, 1, 1, (3, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 3, 1, 1, (32, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 3, 1, 1, (32, 32, 32), (32, 32, 32)),
        ("conv", 32, 32, 4, 2, 1, (32, 32, 32), (32, 16, 16)),
        ("conv", 32, 64, 3, 1, 1, (32, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 3, 1, 1, (64, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 3, 1, 1, (64, 16, 16), (64, 16, 16)),
        ("conv", 64, 64, 4, 2, 1, (64, 16, 16), (64, 8, 8)),
        ("linear", 4096, 512, None, None, None, (4096,), (512,)),
        ("linear", 512, 10, None, None, None, (512,), (10,)),
    ],
}

# Parameter counts worked out by hand (weights + biases):
# 6C2F: 3*32*9+32 = 896, 32*32*9+32 = 9248, 32*32*16+32 = 16416, 32*64*9+64 = 18496,
#       64*64*9+64 = 36928, 64*64*16+64 = 65600, 4096*512+512 = 2097664, 512*10+10 = 5130
# 4C3F: 896, 32*32*16+32 = 16416, 32*64*9+64 = 18496, 64*64*16+64 = 65600,
#       2097664, 512*512+512 = 262656, 5130
# 8C2F: 896, 9248, 9248, 16416, 18496, 36928, 36928, 65600, 2097664, 5130
PARAMS = {"6C2F": 2_250_378, "4C3F": 2_466_858, "8C2F": 2_296_554}
# ClippedReLU adds one theta per unit of every hidden activation:
# 6C2F: 2*32*32*32 + 32*16*16 + 2*64*16*16 + 64*8*8 + 512 = 111104
# 4C3F: 32*32*32 + 32*16*16 + 64*16*16 + 64*8*8 + 512 + 512 = 62464
# 8C2F: 3*32*32*32 + 32*16*16 + 3*64*16*16 + 64*8*8 + 512 = 160256
THETAS = {"6C2F": 111_104, "4C3F": 62_464, "8C2F": 160_256}


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {(arch, act): CertifiableNet(arch, act) for arch in SPEC for act in ACTIVATIONS}


def test_architectures_are_the_two_bcp_nets_and_a_deeper_one():
    assert sorted(ARCHITECTURES) == ["4C3F", "6C2F", "8C2F"]
    assert INPUT_SHAPE == (3, 32, 32) and NUM_CLASSES == 10


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("arch", list(SPEC))
def test_forward_gives_logits(nets, arch, activation):
    net = nets[arch, activation]
    x = torch.rand(3, *INPUT_SHAPE)
    out = net(x)
    assert tuple(out.shape) == (3, NUM_CLASSES)
    assert torch.isfinite(out).all()
    # examples are independent of each other (no batch statistics anywhere)
    assert torch.allclose(net(x[1:2]), out[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("arch", list(SPEC))
def test_weight_layers_follow_the_spec(nets, arch, activation):
    net = nets[arch, activation]
    layers = net.weight_layers()
    assert len(layers) == len(SPEC[arch])
    first_dense = next(i for i, s in enumerate(SPEC[arch]) if s[0] == "linear")
    for i, (layer, spec) in enumerate(zip(layers, SPEC[arch])):
        kind, c_in, c_out, k, s, p, in_shape, out_shape = spec
        assert layer.index == i and layer.kind == kind and layer.name == f"{i}:{kind}"
        if kind == "conv":
            m = layer.module
            assert isinstance(m, nn.Conv2d)
            assert (m.in_channels, m.out_channels) == (c_in, c_out)
            assert m.kernel_size == (k, k) and m.stride == (s, s) and m.padding == (p, p)
            assert m.bias is not None
        else:
            assert isinstance(layer.module, nn.Linear)
            assert (layer.module.in_features, layer.module.out_features) == (c_in, c_out)
        assert layer.input_shape == in_shape and layer.output_shape == out_shape
        assert layer.flatten_before is (i == first_dense)
        if i == len(layers) - 1:
            assert layer.activation is None
        else:
            assert type(layer.activation) is ACTIVATIONS[activation]
            if activation == "clipped_relu":
                assert tuple(layer.activation.theta.shape) == out_shape
    # the modules are those of the network, in forward order
    weight_modules = [m for m in net.body if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [layer.module for layer in layers] == weight_modules


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("arch", list(SPEC))
def test_recorded_shapes_match_a_forward_pass(nets, arch, activation):
    net = nets[arch, activation]
    layers = net.weight_layers()
    seen: dict[int, tuple] = {}
    act_inputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:
        def hook(module, inputs, output, i=layer.index):
            seen[i] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]), output)
        handles.append(layer.module.register_forward_hook(hook))
        if layer.activation is not None:
            def act_hook(module, inputs, i=layer.index):
                act_inputs[i] = inputs[0]
            handles.append(layer.activation.register_forward_pre_hook(act_hook))
    try:
        net(torch.rand(2, *INPUT_SHAPE))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == list(range(len(layers)))
    for layer in layers:
        in_shape, out_shape, output = seen[layer.index]
        assert in_shape == layer.input_shape, layer.name
        assert out_shape == layer.output_shape, layer.name
        if layer.activation is not None:
            # the listed activation is the one applied to this layer's output
            assert act_inputs[layer.index] is output, layer.name


@pytest.mark.parametrize("arch", list(SPEC))
def test_parameter_counts(nets, arch):
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(nets[arch, "relu"]) == PARAMS[arch]
    assert count(nets[arch, "maxmin"]) == PARAMS[arch]
    assert count(nets[arch, "clipped_relu"]) == PARAMS[arch] + THETAS[arch]


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("arch", list(SPEC))
def test_no_batch_norm_and_one_flatten(nets, arch, activation):
    net = nets[arch, activation]
    modules = list(net.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert not any("Norm" in type(m).__name__ for m in modules)
    assert not any(isinstance(m, nn.Dropout) for m in modules)
    assert sum(isinstance(m, nn.Flatten) for m in net.body) == 1
    # weight, activation, ..., weight: the logits come straight out of the last layer
    assert isinstance(net.body[-1], nn.Linear)


def test_kaiming_init_zero_bias():
    torch.manual_seed(0)
    net = CertifiableNet("6C2F", init="kaiming")
    for layer in net.weight_layers():
        assert torch.count_nonzero(layer.module.bias) == 0
        fan_in = layer.module.weight[0].numel()
        std = layer.module.weight.std().item()
        assert std == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.2), layer.name


def test_torch_default_init_and_unknown_init():
    net = CertifiableNet("4C3F", init="torch_default")
    assert torch.count_nonzero(net.weight_layers()[0].module.bias) > 0
    with pytest.raises(ValueError, match="'xavier'"):
        CertifiableNet("4C3F", init="xavier")


def test_build_model_from_params():
    net = build_model({"arch": "4C3F", "activation": "clipped_relu", "clipped_relu_theta": 0.75,
                       "init": "kaiming"})
    assert net.arch == "4C3F" and net.activation_name == "clipped_relu"
    for layer in net.weight_layers()[:-1]:
        assert torch.all(layer.activation.theta == 0.75)


def test_unknown_arch_raises():
    with pytest.raises(ValueError, match="'9C9F'") as info:
        CertifiableNet("9C9F")
    assert "model.arch" in str(info.value)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="'tanh'") as info:
        CertifiableNet("6C2F", "tanh")
    assert "model.activation" in str(info.value)
    with pytest.raises(ValueError, match="'sigmoid'"):
        make_activation("sigmoid", (4,), 1.0)


# ---------------------------------------------------------------- MaxMin
def test_maxmin_known_values():
    x = torch.tensor([[3.0, 1.0, -2.0, 5.0, 0.5, 0.5]])
    assert MaxMin()(x).tolist() == [[3.0, 1.0, 5.0, -2.0, 0.5, 0.5]]


def test_maxmin_on_feature_maps_pairs_channels():
    x = torch.randn(2, 6, 3, 4)
    out = MaxMin()(x)
    assert out.shape == x.shape
    for c in range(0, 6, 2):
        assert torch.equal(out[:, c], torch.maximum(x[:, c], x[:, c + 1]))
        assert torch.equal(out[:, c + 1], torch.minimum(x[:, c], x[:, c + 1]))


def test_maxmin_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 5, 5, requires_grad=True)
    out = MaxMin()(x)
    # a permutation of each example's entries: the norm of each example is kept
    torch.testing.assert_close(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1))
    torch.testing.assert_close(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    # and so is the norm of a back-propagated gradient
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(x.grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))
    # 1-Lipschitz
    y = x.detach() + 0.1 * torch.randn_like(x)
    assert (MaxMin()(y) - out.detach()).norm() <= (y - x.detach()).norm() + 1e-6


@pytest.mark.parametrize("shape", [(2, 5), (1, 3, 4, 4)])
def test_maxmin_odd_channels_raises(shape):
    with pytest.raises(ValueError, match=str(shape[1])):
        MaxMin()(torch.randn(*shape))


# ---------------------------------------------------------------- ClippedReLU
def test_clipped_relu_clips_per_element():
    act = ClippedReLU((2, 3), theta_init=1.0)
    theta = torch.tensor([[0.0, 0.5, 1.0], [2.0, 3.0, 0.25]])
    with torch.no_grad():
        act.theta.copy_(theta)
    torch.manual_seed(0)
    x = 4 * torch.randn(16, 2, 3)
    out = act(x)
    assert out.shape == x.shape
    for b in range(16):
        for i in range(2):
            for j in range(3):
                v, t = x[b, i, j].item(), theta[i, j].item()
                assert out[b, i, j].item() == pytest.approx(min(max(v, 0.0), t))
    assert (out >= 0).all() and (out <= theta).all()


def test_clipped_relu_theta_is_learnable():
    act = ClippedReLU((4,), theta_init=0.5)
    assert isinstance(act.theta, nn.Parameter) and act.theta.requires_grad
    assert [p is act.theta for p in act.parameters()] == [True]
    assert torch.all(act.theta == 0.5)
    x = torch.tensor([[1.0, 0.2, -1.0, 0.7], [0.1, 0.9, 0.3, -0.2]])
    act(x).sum().backward()
    # d/dtheta of sum(min(relu(x), theta)) counts the saturated examples per unit
    assert act.theta.grad.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_clamp_parameters_restores_nonnegative_theta():
    torch.manual_seed(0)
    net = CertifiableNet("4C3F", "clipped_relu", theta_init=1.0)
    thetas = [layer.activation.theta for layer in net.weight_layers()[:-1]]
    first_weight = net.weight_layers()[0].module.weight.detach().clone()
    assert (first_weight < 0).any()
    with torch.no_grad():
        thetas[0].view(-1)[:10] = -0.5
        thetas[1].view(-1)[5] = -3.0
        thetas[2].view(-1)[0] = 0.3
    net.clamp_parameters_()
    for theta in thetas:
        assert (theta >= 0).all()
    assert torch.all(thetas[0].view(-1)[:10] == 0) and thetas[1].view(-1)[5] == 0
    assert thetas[2].view(-1)[0].item() == pytest.approx(0.3)  # a positive theta is kept
    assert thetas[0].view(-1)[10].item() == 1.0
    # weights are not constrained
    assert torch.equal(net.weight_layers()[0].module.weight, first_weight)


def test_clamp_parameters_is_a_noop_without_theta():
    torch.manual_seed(0)
    net = CertifiableNet("6C2F", "relu")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.clamp_parameters_()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
