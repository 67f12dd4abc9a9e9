"""Spectral norms of weight layers as the linear operators they are on their
inputs (a convolution with its stride and padding, not its reshaped kernel).

Two numbers per layer:
  * `power_iteration`: an estimate from below (||Av|| for a unit v, taken in
    float64, never exceeds the true norm), the cheap number used in training;
  * `operator_norm_upper_bound`: a guaranteed upper bound, the number a
    certificate may use.
For a dense layer the upper bound is the exact largest singular value
(float64 SVD) widened by a relative margin for rounding. For a convolution
it is the norm of the circular convolution on a canvas of the padded input
size: a zero-padded, strided convolution equals "embed the input into that
canvas (norm 1), convolve circularly, keep the strided outputs (norm <= 1)",
so its norm is at most the circular one, which the 2-D DFT diagonalises into
one small C_out x C_in matrix per frequency (Sedghi et al. 2019).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..models.architectures import WeightLayer

# Relative widening of float64 singular values: their rounding error is of
# the order of 1e-15 * sigma_max, so this margin is far beyond it.
FLOAT64_MARGIN = 1e-9


def matrix_view(module: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The weight as a matrix: (out, in) for a dense layer, (C_out, C_in*k*k) for a conv."""
    return module.weight.reshape(module.weight.shape[0], -1)


def apply_operator(layer: WeightLayer, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's linear part (no bias) on a batch of inputs of the layer's input shape."""
    module, weight = layer.module, layer.module.weight if weight is None else weight
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding)
    return F.linear(x, weight)


def apply_adjoint(layer: WeightLayer, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The transpose of `apply_operator`, landing exactly on the input shape."""
    module, weight = layer.module, layer.module.weight if weight is None else weight
    if isinstance(module, nn.Conv2d):
        # Input rows/columns the strided conv never reaches come back as output_padding.
        extra = tuple(size_in - ((size_out - 1) * stride - 2 * padding + kernel)
                      for size_in, size_out, stride, padding, kernel
                      in zip(layer.input_shape[1:], y.shape[-2:], module.stride, module.padding,
                             module.kernel_size))
        return F.conv_transpose2d(y, weight, None, module.stride, module.padding, output_padding=extra)
    return F.linear(y, weight.t())


@torch.no_grad()
def power_iteration(layer: WeightLayer, iterations: int, tolerance: float = 0.0,
                    v: torch.Tensor | None = None, generator: torch.Generator | None = None
                    ) -> tuple[float, torch.Tensor]:
    """Estimate sigma_max of the layer operator; returns (sigma, right singular vector)."""
    weight = layer.module.weight.detach()
    if v is None:
        v = torch.randn((1, *layer.input_shape), generator=generator, dtype=weight.dtype,
                        device=weight.device if generator is None else generator.device)
        v = v.to(weight.device)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iterations):
        u = apply_operator(layer, v, weight)
        new_sigma = u.norm().item()
        v = apply_adjoint(layer, u, weight)
        v = v / v.norm()
        if tolerance and abs(new_sigma - sigma) <= tolerance * max(new_sigma, 1e-30):
            sigma = new_sigma
            break
        sigma = new_sigma
    # The reported value is ||A v|| for a unit v, in float64 so that float32
    # rounding cannot lift it above the true norm (it is a Rayleigh quotient).
    v64 = v.to(torch.float64)
    sigma = apply_operator(layer, v64 / v64.norm(), weight.to(torch.float64)).norm().item()
    return sigma, v


@torch.no_grad()
def operator_norm_upper_bound(layer: WeightLayer) -> float:
    """A guaranteed upper bound of the layer operator's spectral norm."""
    weight = layer.module.weight.detach().to(torch.float64).cpu()
    if isinstance(layer.module, nn.Linear):
        exact = torch.linalg.matrix_norm(weight, ord=2).item()
        return exact * (1 + FLOAT64_MARGIN)
    stride, padding = layer.module.stride, layer.module.padding
    if stride[0] != stride[1] or padding[0] != padding[1] or layer.input_shape[1] != layer.input_shape[2]:
        raise ValueError(f"layer {layer.name}: the bound assumes square inputs, strides and padding")
    kernel, canvas = _polyphase_kernel(weight, stride[0]), _polyphase_canvas(layer)
    spectrum = torch.fft.fft2(kernel, s=(canvas, canvas))     # (C_out, C_in*s*s, n, n)
    per_frequency = spectrum.permute(2, 3, 0, 1)              # (n, n, C_out, C_in*s*s)
    if per_frequency.shape[-2] < per_frequency.shape[-1]:
        # The same singular values; LAPACK is far slower on wide complex matrices than tall ones.
        per_frequency = per_frequency.transpose(-2, -1)
    bound = torch.linalg.matrix_norm(per_frequency, ord=2).max().item()
    return bound * (1 + FLOAT64_MARGIN)


def _polyphase_kernel(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A stride-s conv is a stride-1 conv of the input's s*s polyphase components
    (space-to-depth, a permutation of the padded input): kernel tap (s*q + r)
    of input channel c becomes tap q of channel (c, r)."""
    c_out, c_in, k, _ = weight.shape
    q = -(-k // stride)
    padded = F.pad(weight, (0, q * stride - k, 0, q * stride - k))
    split = padded.reshape(c_out, c_in, q, stride, q, stride)   # (.., q_h, r_h, q_w, r_w)
    return split.permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * stride * stride, q, q)


def _polyphase_canvas(layer: WeightLayer) -> int:
    """Side of the circular canvas on which the polyphase conv never wraps around
    onto an output it keeps."""
    module = layer.module
    stride, padding, kernel = module.stride[0], module.padding[0], module.kernel_size[0]
    padded_side = layer.input_shape[1] + 2 * padding
    phases_side = -(-padded_side // stride)
    out_side, taps = layer.output_shape[1], -(-kernel // stride)
    return max(phases_side, out_side + taps - 1)


def unit_norm_rescaled_(model) -> list[float]:
    """Scale each weight layer l to operator norm <= 1, in place: W_l / s_l with s_l its
    guaranteed upper bound (`operator_norm_upper_bound`), and the bias by the running product
    s_1 ... s_l, so that every pre-activation is the original's divided by s_1 ... s_l. For a
    positively homogeneous activation (ReLU, MaxMin) the network then computes the original
    logits divided by prod(s): the same classifier, each layer's norm at most 1 (a clipped
    ReLU's threshold is not rescaled: there the function changes). Returns the s_l."""
    scales, running = [], 1.0
    with torch.no_grad():
        for layer in model.weight_layers():
            scale = operator_norm_upper_bound(layer)
            running *= scale
            layer.module.weight.div_(scale)
            layer.module.bias.div_(running)
            scales.append(scale)
    return scales
