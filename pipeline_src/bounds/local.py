"""Local Lipschitz bounds (Huang et al. 2021, "Training certifiably robust
neural networks with efficient local Lipschitz bounds").

Inside the input ball, a hidden unit whose BCP box is always off (u <= 0) or,
for the clipped ReLU min(max(x, 0), theta), always saturated (l >= theta)
gives the same output for every point: it contributes nothing to how far the
layer's outputs can move. With M_l the 0/1 mask of the other ("varying")
units before activation l, the layer map x -> act(W x + b) moves its output by
at most ||M_l W_l M_{l-1}||_2 times the move of its input, so the activations
before the logit layer stay in a ball of radius eps * prod_l ||M_l W_l M_{l-1}||,
a per-example radius no larger than BCP's global one.

Training estimates each masked norm by power iteration with one vector per
layer *per training example*, cached between epochs. A certificate needs
upper bounds: a dense layer's masked norm is computed exactly (float64
eigenvalues of its Gram matrix); a convolution keeps its global guaranteed
bound (the masked norm can only be smaller), so the certified local radius is
sound but tighter only through the dense layers. The certifier runs this on a
float64 copy of the model (`pipeline_src/bounds/certifiers.py`), so the
masks, boxes, radius and translation are float64.

`local_estimated_state` is the reference's evaluation instead (Huang et al.'s
code, `evaluate.py --test_sniter 2000`): every hidden layer's masked norm,
convolutions included, estimated by per-example masked power iteration
(`REFERENCE_POWER_ITERATIONS`, stopping early as the reference does when no
example's vector moves by `REFERENCE_TOLERANCE`). An estimate is a lower bound
of each norm, so the radius it gives is *not* guaranteed: the certify stage
reports the accuracy it gives beside the certificates, never as one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.activations import ClippedReLU
from ..models.architectures import CertifiableNet, CleanPass, WeightLayer
from ..spectral.operator_norm import apply_adjoint, apply_operator
from .bcp import BallBox, ball_box_bounds, translated_logits

FLOAT64_MARGIN = 1e-9
# The LocalBCP reference's evaluation: `--test_sniter 2000` (its README's CIFAR-10
# evaluation commands) and the stopping rule of its `local_linear` (tol 1e-3 on the
# largest change of an example's unit vector).
REFERENCE_POWER_ITERATIONS = 2000
REFERENCE_TOLERANCE = 1e-3


def varying_unit_masks(model: CertifiableNet, boxes: list[tuple[torch.Tensor, torch.Tensor]]
                       ) -> list[torch.Tensor]:
    """0/1 masks of the units whose activation output can change inside the ball,
    one per hidden layer, from the boxes before each activation."""
    masks = []
    for layer, (lower, upper) in zip(model.weight_layers()[:-1], boxes):
        activation = layer.activation
        fixed = upper <= 0
        if isinstance(activation, ClippedReLU):
            fixed = fixed | (lower >= activation.theta)
        elif not isinstance(activation, nn.ReLU):
            raise TypeError(f"local bounds need ReLU or clipped-ReLU activations, not "
                            f"{type(activation).__name__}")
        masks.append((~fixed).to(lower.dtype))
    return masks


def _input_mask(layer: WeightLayer, masks: list[torch.Tensor]) -> torch.Tensor | None:
    if layer.index == 0:
        return None  # every input pixel can move
    mask = masks[layer.index - 1]
    return mask.flatten(1) if layer.flatten_before else mask


def masked_operator(layer: WeightLayer, v: torch.Tensor, mask_in, mask_out: torch.Tensor) -> torch.Tensor:
    """M_out W M_in v, per example."""
    return mask_out * apply_operator(layer, v if mask_in is None else mask_in * v)


def masked_adjoint(layer: WeightLayer, u: torch.Tensor, mask_in, mask_out: torch.Tensor) -> torch.Tensor:
    """M_in W^T M_out u, per example."""
    v = apply_adjoint(layer, mask_out * u)
    return v if mask_in is None else mask_in * v


def _per_example_normalise(t: torch.Tensor) -> torch.Tensor:
    return t / t.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (t.dim() - 1)))


class PerExamplePowerIteration:
    """Power iteration on each example's masked layer operators. With `cache`, the
    right singular vectors are kept per training example in host memory (as the
    reference does; `cache_dtype` float16 halves its ~20 GB for CIFAR-10 on 6C2F, as
    the reference's TinyImageNet code does) and continue from step to step; an
    example seen for the first time, or every example without `cache`, starts from
    random vectors drawn from the run's generator on its device. (The reference
    draws the whole cache up front, about a minute of one core before the first
    step; here a vector is drawn when its example first comes up: the same
    distribution, and a generator consumed the same way with or without the cache.)

    On a GPU the host traffic overlaps the step: a batch's vectors are gathered into
    pinned buffers, and the new ones are copied back without waiting and written
    into the cache at the start of the next call (or when `cache` is read)."""

    def __init__(self, layers: list[WeightLayer], num_examples: int, cache: bool,
                 generator: torch.Generator, cache_dtype: torch.dtype = torch.float32):
        self.generator = generator
        self._cache, self.seen = None, None
        self._pending = None          # (host index, staged vectors, copy-done event)
        self._buffers: dict = {}      # pinned staging buffers, by (direction, layer)
        if cache:
            self._cache = [torch.zeros((num_examples, *layer.input_shape), dtype=cache_dtype)
                           for layer in layers[:-1]]
            self.seen = torch.zeros(num_examples, dtype=torch.bool)

    @property
    def cache(self) -> list[torch.Tensor] | None:
        self._flush()
        return self._cache

    def _flush(self) -> None:
        """Write the last call's vectors into the cache once their copies have landed."""
        if self._pending is None:
            return
        host_index, staged, done = self._pending
        if done is not None:
            done.synchronize()
        for stored, vectors in zip(self._cache, staged):
            stored.index_copy_(0, host_index, vectors)
        self.seen[host_index] = True
        self._pending = None

    def _buffer(self, direction: str, layer: int, like: torch.Tensor, rows: int, pin: bool) -> torch.Tensor:
        """`rows` rows of a staging buffer kept at the largest batch (the last, smaller
        batch of an epoch slices it instead of pinning new memory)."""
        buffer = self._buffers.get((direction, layer))
        if buffer is None or buffer.shape[0] < rows:
            buffer = torch.empty((rows, *like.shape[1:]), dtype=like.dtype, pin_memory=pin)
            self._buffers[(direction, layer)] = buffer
        return buffer[:rows]

    def norms(self, layers: list[WeightLayer], masks: list[torch.Tensor], index: torch.Tensor | None,
              iterations: int) -> list[torch.Tensor]:
        """Per-example ||M_l W_l M_{l-1}|| estimates, (B,) each; differentiable in W."""
        sigmas, staged = [], []
        batch = masks[0].shape[0]
        caching = self._cache is not None and index is not None
        if caching:
            self._flush()   # also: the pinned buffers' last copies have landed
            host_index = index.cpu()
            seen = self.seen[host_index].to(masks[0].device)
        for layer in layers[:-1]:
            mask_in, mask_out = _input_mask(layer, masks), masks[layer.index]
            weight = layer.module.weight
            pin = weight.is_cuda
            v = torch.randn((batch, *layer.input_shape), generator=self.generator,
                            device=self.generator.device, dtype=weight.dtype).to(weight.device)
            if caching:
                stored = self._cache[layer.index]
                gathered = torch.index_select(stored, 0, host_index,
                                              out=self._buffer("in", layer.index, stored, batch, pin))
                gathered = gathered.to(weight.device, non_blocking=True).to(weight.dtype)
                # A zero vector (every unit of the layer was fixed for the example last
                # time) would stay zero under the masks: such examples start afresh too.
                usable = seen & (gathered.flatten(1).abs().amax(1) > 0)
                v = torch.where(usable.view(-1, *([1] * (v.dim() - 1))), gathered, v)
            with torch.no_grad():
                v = v if mask_in is None else mask_in * v
                v = _per_example_normalise(v)
                for _ in range(iterations):
                    v = _per_example_normalise(
                        masked_adjoint(layer, masked_operator(layer, v, mask_in, mask_out), mask_in, mask_out))
                if caching:
                    stored = self._cache[layer.index]
                    out = self._buffer("out", layer.index, stored, batch, pin)
                    staged.append(out.copy_(v.to(stored.dtype), non_blocking=True))
            sigmas.append(masked_operator(layer, v, mask_in, mask_out).flatten(1).norm(dim=1))
        if caching:
            done = None
            if layers[0].module.weight.is_cuda:
                done = torch.cuda.Event()
                done.record()
            self._pending = (host_index, staged, done)
        return sigmas

    def state_dict(self) -> dict:
        if self._cache is None:
            return {"cache": None}
        return {"cache": [c.detach().clone() for c in self.cache], "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if self._cache is not None and state["cache"] is not None:
            self._pending = None
            for current, saved in zip(self._cache, state["cache"]):
                current.copy_(saved)
            self.seen.copy_(state["seen"])


@torch.no_grad()
def masked_dense_norm_upper(layer: WeightLayer, mask_in: torch.Tensor | None,
                            mask_out: torch.Tensor) -> torch.Tensor:
    """Exact ||M_out W M_in|| per example for a dense layer, widened for rounding.

    The masks zero whole rows and columns, so the norm is that of the submatrix of W
    on the example's varying units: the square root of the largest float64 eigenvalue
    of its Gram matrix on the smaller side (k_out x k_out or k_in x k_in). Working on
    the submatrix, not on the masked full matrix, costs k_out k_in min(k_out, k_in)
    instead of out^2 in per example (6C2F's first dense layer: 512 x 4096)."""
    weight = layer.module.weight.double()
    norms = torch.zeros(mask_out.shape[0], dtype=torch.float64, device=weight.device)
    for example in range(mask_out.shape[0]):
        rows = weight[mask_out[example] > 0]
        if mask_in is not None:
            rows = rows[:, mask_in[example] > 0]
        if rows.numel() == 0:
            continue   # every unit fixed: the layer moves nothing, exactly
        gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
        norms[example] = torch.linalg.eigvalsh(gram)[-1].clamp_min(0.0).sqrt()
    upper = (norms * (1 + FLOAT64_MARGIN)).to(mask_out.dtype)
    # Casting to float32 rounds to nearest, possibly down: one ulp up keeps it an upper bound.
    # (A zero norm, every unit fixed, is exact.)
    return torch.where(upper > 0, torch.nextafter(upper, torch.full_like(upper, float("inf"))), upper)


def _local_ball(state: BallBox, eps: float, factors: list) -> BallBox:
    """The ball at the logit layer with radius eps * prod(factors), capped by BCP's."""
    radius = torch.full_like(state.radius, float(eps))
    for factor in factors:
        radius = radius * factor
    return BallBox(state.centre, torch.minimum(radius, state.radius), state.lower, state.upper)


def local_certified_state(model: CertifiableNet, x: torch.Tensor, eps: float,
                          global_upper: list[float]) -> tuple[BallBox, torch.Tensor]:
    """The BCP ball and box at the logit layer with the ball's radius tightened to
    the sound local radius; all norms are guaranteed upper bounds."""
    boxes: list = []
    state, logits = ball_box_bounds(model, x, eps, global_upper, pre_activation=boxes)
    masks = varying_unit_masks(model, boxes)
    factors = [masked_dense_norm_upper(layer, _input_mask(layer, masks), masks[layer.index])
               if isinstance(layer.module, nn.Linear) else global_upper[layer.index]
               for layer in model.weight_layers()[:-1]]
    return _local_ball(state, eps, factors), logits


@torch.no_grad()
def masked_norm_estimates(model: CertifiableNet, masks: list[torch.Tensor], iterations: int,
                          tolerance: float, generator: torch.Generator,
                          dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per-example estimates of ||M_l W_l M_{l-1}|| for every hidden layer, convolutions
    included, by masked power iteration from random vectors in `dtype` (the reference's
    evaluation: at most `iterations` steps, stopping once no example's unit vector moves
    by `tolerance`). ||M W M v|| for a unit v: never above the norm up to rounding, so
    NOT an upper bound. Returns (B,) tensors in `dtype`."""
    sigmas = []
    for layer in model.weight_layers()[:-1]:
        weight = layer.module.weight.detach().to(dtype)
        mask_in, mask_out = _input_mask(layer, masks), masks[layer.index].to(dtype)
        mask_in = None if mask_in is None else mask_in.to(dtype)

        def forward(v):
            return mask_out * apply_operator(layer, v if mask_in is None else mask_in * v, weight)

        def backward(u):
            v = apply_adjoint(layer, mask_out * u, weight)
            return v if mask_in is None else mask_in * v

        batch = mask_out.shape[0]
        v = torch.randn((batch, *layer.input_shape), generator=generator, device=generator.device,
                        dtype=dtype).to(weight.device)
        v = _per_example_normalise(v if mask_in is None else mask_in * v)
        for _ in range(iterations):
            previous = v
            v = _per_example_normalise(backward(forward(v)))
            if (v - previous).flatten(1).norm(dim=1).max() < tolerance:
                break
        sigmas.append(forward(v).flatten(1).norm(dim=1))
    return sigmas


def local_estimated_state(model: CertifiableNet, x: torch.Tensor, eps: float, global_upper: list[float],
                          generator: torch.Generator, iterations: int = REFERENCE_POWER_ITERATIONS,
                          tolerance: float = REFERENCE_TOLERANCE, estimate_dtype: torch.dtype = torch.float32
                          ) -> tuple[BallBox, torch.Tensor]:
    """As `local_certified_state`, but every hidden layer's masked norm is a power-iteration
    estimate (`masked_norm_estimates`, in `estimate_dtype`): the reference's evaluation,
    an estimate and not a certificate. Boxes, masks and translation as the certificate's."""
    boxes: list = []
    state, logits = ball_box_bounds(model, x, eps, global_upper, pre_activation=boxes)
    masks = varying_unit_masks(model, boxes)
    estimates = masked_norm_estimates(model, masks, iterations, tolerance, generator, estimate_dtype)
    return _local_ball(state, eps, [s.to(state.radius.dtype) for s in estimates]), logits


def sparsity_penalty(model: CertifiableNet, boxes: list[tuple[torch.Tensor, torch.Tensor]],
                     saturation_weight: float) -> torch.Tensor:
    """The sparsity loss of the LocalBCP reference's TinyImageNet code (its CIFAR-10
    code has none): summed over the hidden layers, from the box [l, u] before each
    activation,
        mean relu(u)                                  (towards always off), plus
        saturation_weight * mean relu(theta - l)      (towards always saturated;
                                                       clipped ReLU only).
    Units fixed in the ball drop out of the local norms, so pushing units towards
    either end tightens the bound. Differentiable in the weights and in theta."""
    total = boxes[0][0].new_zeros(())
    for layer, (lower, upper) in zip(model.weight_layers()[:-1], boxes):
        total = total + torch.relu(upper).mean()
        if isinstance(layer.activation, ClippedReLU):
            total = total + saturation_weight * torch.relu(layer.activation.theta - lower).mean()
    return total


def local_worst_logits(model: CertifiableNet, x: torch.Tensor, y: torch.Tensor, eps: float,
                       global_norms: list, power: PerExamplePowerIteration | None,
                       index: torch.Tensor | None, power_iterations: int,
                       translation_iterations: int | None,
                       boxes: list | None = None,
                       clean: CleanPass | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LocalBCP's worst-case logits and the per-example local Lipschitz product.

    Training (power given): masked norms by per-example power iteration, r_local =
    eps * prod sigma_l, the BCP translation with r_local; the boxes before each
    activation are appended to `boxes` if it is a list. Certification (power
    None): the sound local radius of `local_certified_state`. `clean`: this batch's
    clean pass, reused as the ball's centres (`bounds.bcp.ball_box_bounds`)."""
    if power is None:
        state, logits = local_certified_state(model, x, eps, global_norms)
        return translated_logits(model, state, logits, y, None), state.radius / max(eps, 1e-30)
    boxes = [] if boxes is None else boxes
    state, logits = ball_box_bounds(model, x, eps, global_norms, pre_activation=boxes, clean=clean)
    masks = [m.detach() for m in varying_unit_masks(model, boxes)]
    sigmas = power.norms(model.weight_layers(), masks, index, power_iterations)
    local_lipschitz = torch.stack(sigmas).prod(0)
    state = BallBox(state.centre, eps * local_lipschitz, state.lower, state.upper)
    return translated_logits(model, state, logits, y, translation_iterations), local_lipschitz
