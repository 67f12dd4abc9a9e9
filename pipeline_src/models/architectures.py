"""The CIFAR-10 networks of BCP (Lee et al. 2020), exactly as there: no batch
norm and no input normalisation, so that bounds are stated on pixels in [0, 1].

A network is a flat sequence of weight layers (Conv2d / Linear), each but the
last followed by an activation, with one Flatten between the convolutions and
the dense layers. `CertifiableNet.weight_layers` lists the weight layers in
order with the shapes of their inputs and outputs, so bound code never
re-derives shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .activations import make_activation

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


@dataclass(frozen=True)
class Conv:
    out_channels: int
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class Dense:
    out_features: int


# (conv layers, dense layers); the last dense layer gives the logits.
ARCHITECTURES: dict[str, list[Conv | Dense]] = {
    "4C3F": [Conv(32, 3, 1, 1), Conv(32, 4, 2, 1), Conv(64, 3, 1, 1), Conv(64, 4, 2, 1),
             Dense(512), Dense(512), Dense(NUM_CLASSES)],
    "6C2F": [Conv(32, 3, 1, 1), Conv(32, 3, 1, 1), Conv(32, 4, 2, 1), Conv(64, 3, 1, 1),
             Conv(64, 3, 1, 1), Conv(64, 4, 2, 1), Dense(512), Dense(NUM_CLASSES)],
    # Not in BCP: 6C2F with one more 3x3 conv per resolution, for the cost-against-depth
    # measurement (how each method's epoch time grows from 4C3F to 6C2F to 8C2F).
    "8C2F": [Conv(32, 3, 1, 1), Conv(32, 3, 1, 1), Conv(32, 3, 1, 1), Conv(32, 4, 2, 1),
             Conv(64, 3, 1, 1), Conv(64, 3, 1, 1), Conv(64, 3, 1, 1), Conv(64, 4, 2, 1),
             Dense(512), Dense(NUM_CLASSES)],
}


@dataclass(frozen=True)
class WeightLayer:
    """One weight layer of a network, in forward order."""
    index: int
    module: nn.Conv2d | nn.Linear
    input_shape: tuple[int, ...]   # per example: (C, H, W) for a conv, (D,) for a dense layer
    output_shape: tuple[int, ...]
    activation: nn.Module | None    # the activation after it; None for the logit layer
    flatten_before: bool            # the input is the flattened output of a conv layer

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.module, nn.Conv2d) else "linear"

    @property
    def name(self) -> str:
        return f"{self.index}:{self.kind}"


@dataclass
class CleanPass:
    """One clean forward pass, kept so that bounds around it reuse its activations:
    `pre[l]` is weight layer l's output before its activation (the last is the logits),
    `inputs[l]` its input (flattened where the layer is dense)."""
    logits: torch.Tensor
    pre: list[torch.Tensor]
    inputs: list[torch.Tensor]


class CertifiableNet(nn.Module):
    def __init__(self, arch: str, activation: str = "relu", theta_init: float = 2.0,
                 init: str = "kaiming"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"model.arch: unknown architecture '{arch}' "
                             f"(expected one of {sorted(ARCHITECTURES)})")
        self.arch, self.activation_name = arch, activation
        layers: list[nn.Module] = []
        self._layout: list[tuple[int, tuple, tuple, int | None, bool]] = []
        shape: tuple[int, ...] = INPUT_SHAPE
        specs = ARCHITECTURES[arch]
        for i, spec in enumerate(specs):
            flatten = False
            if isinstance(spec, Conv):
                c, h, w = shape
                module = nn.Conv2d(c, spec.out_channels, spec.kernel, spec.stride, spec.padding)
                out = (spec.out_channels,
                       (h + 2 * spec.padding - spec.kernel) // spec.stride + 1,
                       (w + 2 * spec.padding - spec.kernel) // spec.stride + 1)
            else:
                if len(shape) == 3:
                    layers.append(nn.Flatten())
                    shape, flatten = (shape[0] * shape[1] * shape[2],), True
                module = nn.Linear(shape[0], spec.out_features)
                out = (spec.out_features,)
            _initialise(module, init)
            layers.append(module)
            weight_pos = len(layers) - 1
            act_pos = None
            if i < len(specs) - 1:
                layers.append(make_activation(activation, out, theta_init))
                act_pos = len(layers) - 1
            self._layout.append((weight_pos, shape, out, act_pos, flatten))
            shape = out
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_trace(self, x: torch.Tensor) -> CleanPass:
        """The forward pass, keeping every weight layer's input and pre-activation output."""
        inputs, pre, h = [], [], x
        for layer in self.weight_layers():
            if layer.flatten_before:
                h = h.flatten(1)
            inputs.append(h)
            h = layer.module(h)
            pre.append(h)
            if layer.activation is not None:
                h = layer.activation(h)
        return CleanPass(h, pre, inputs)

    def forward_with_layer_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and the input of every weight layer (flattened where the layer is dense)."""
        trace = self.forward_trace(x)
        return trace.logits, trace.inputs

    def weight_layers(self) -> list[WeightLayer]:
        return [WeightLayer(i, self.body[w], in_shape, out_shape,
                            None if a is None else self.body[a], flatten)
                for i, (w, in_shape, out_shape, a, flatten) in enumerate(self._layout)]

    def clamp_parameters_(self) -> None:
        """Project parameters back onto their constraint sets (theta >= 0)."""
        for module in self.modules():
            if hasattr(module, "clamp_theta_"):
                module.clamp_theta_()


INITIALISATIONS = ("kaiming", "reference", "torch_default")


def _initialise(module: nn.Conv2d | nn.Linear, init: str) -> None:
    if init == "kaiming":
        # Plain nets without batch norm keep their activations' scale with He init.
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        nn.init.zeros_(module.bias)
    elif init == "reference":
        # The BCP and Local-Lip code: conv weights N(0, 2 / (k^2 C_out)) (fan-out), zero
        # conv bias; dense layers keep PyTorch's default. Its Lipschitz product starts far
        # lower than He fan-in's (about 28x on 6C2F).
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    elif init != "torch_default":
        raise ValueError(f"model.init: unknown initialisation '{init}' (expected one of {INITIALISATIONS})")


def build_model(model_params: dict) -> CertifiableNet:
    return CertifiableNet(model_params["arch"], model_params["activation"],
                          model_params["clipped_relu_theta"], model_params["init"])
