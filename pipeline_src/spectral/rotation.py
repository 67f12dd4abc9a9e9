"""Rotation factors of weight layers (Duet, sections 4.3-4.4): for the matrix
view W = U S V^T of a layer (out x in for a dense layer, C_out x C_in*k*k for
a convolution), its rank-r "rotation" R_r = U_r V_r^T (r: `resolve_rank`), the
cosine of two models' rotations, and the layer map with R_r in place of W ("Rota").

Two readings of the certification model's rotation are computed here (see
docs/duet-method.md):
  * the paper's (introduction, Algorithm 1 line 9): the layer's own map
    divided by its spectral norm, W / sigma, which needs no factorisation at
    all (`methods.duet` takes W x from the step's clean pass);
  * the exact one, U_r V_r^T of an SVD (`top_rank_rotation`), with a gradient
    that is the SVD's own, written out so that it stays finite when singular
    values come close (certified training pushes them together).
The vanilla model's rotation is only ever applied as a rank-r factorised map
(`apply_factorised_rotation`), never as a full-size weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.architectures import WeightLayer
from .operator_norm import apply_operator, matrix_view

# Floor of sigma_i^2 - sigma_j^2 (relative to sigma_1^2) in the SVD's gradient: the
# divided differences 1/(sigma_i^2 - sigma_j^2) are clamped there instead of blowing up.
GAP_FLOOR = 1e-6


class _TopRankRotation(torch.autograd.Function):
    """U_r V_r^T of a matrix, forward by a float64 SVD, backward by the closed form
    of its derivative (Daleckii-Krein for f(W) = W h(W^T W), h(s^2) = 1/s on the top
    r singular values and 0 elsewhere):

        dL/dW = G V_r S_r^-1 V_r^T
              + 2 U S (D o sym(S U^T G V)) V^T
              + U_r S_r^-1 U_r^T G (I - V V^T)

    with G = dL/d(U_r V_r^T), the thin SVD W = U S V^T, and the divided differences
    D_ij = -1/(s_i s_j (s_i + s_j)) for i, j both in the top r (stable: no
    difference of singular values), 1/(s_i (s_i^2 - s_j^2)) for one in the top r
    and one not (the only terms that need a gap, clamped by GAP_FLOOR), 0 otherwise."""

    @staticmethod
    def forward(ctx, weight_matrix: torch.Tensor, rank: int) -> torch.Tensor:
        w = weight_matrix.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        ctx.save_for_backward(u, s, vh.transpose(-1, -2))
        ctx.rank = rank
        return (u[:, :rank] @ vh[:rank]).to(weight_matrix.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, s, v = ctx.saved_tensors
        r, k = ctx.rank, s.shape[0]
        g = grad.double()
        tiny = torch.finfo(torch.float64).tiny ** 0.5
        s_top = s[:r].clamp_min(tiny * max(s[0].item(), 1.0))
        u_r, v_r = u[:, :r], v[:, :r]
        result = (g @ v_r) / s_top @ v_r.t()
        # Divided differences over the k x k block of singular values.
        top = torch.arange(k, device=s.device) < r
        si, sj = s[:, None], s[None, :]
        both = top[:, None] & top[None, :]
        one = top[:, None] ^ top[None, :]
        safe = s.clamp_min(tiny * max(s[0].item(), 1.0))
        d = torch.zeros((k, k), dtype=s.dtype, device=s.device)
        d = torch.where(both, -1.0 / (safe[:, None] * safe[None, :] * (safe[:, None] + safe[None, :])), d)
        gap = (si.square() - sj.square()).abs().clamp_min(GAP_FLOOR * s[0].item() ** 2 + tiny)
        larger = torch.where(top[:, None], safe[:, None], safe[None, :])
        d = torch.where(one, 1.0 / (larger * gap), d)
        m = s[:, None] * (u.t() @ g @ v)              # S U^T G V
        sym = (m + m.t()) / 2
        result = result + 2.0 * (u * s) @ (d * sym) @ v.t()
        if v.shape[0] > k:                            # the null space of W (wide matrices)
            outside = g - (g @ v) @ v.t()
            result = result + (u_r / s_top) @ (u_r.t() @ outside)
        return result.to(grad.dtype), None


def resolve_rank(rank: int | str | None, matrix_shape: tuple[int, ...]) -> int:
    """The number of singular vectors r that `rank` means for a matrix of this shape:
    all of them (min(out, in)) for 'full' or None, else `rank` capped at that."""
    full = min(matrix_shape)
    return full if rank in (None, "full") else min(int(rank), full)


def top_rank_rotation(weight_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r V_r^T of `weight_matrix`, differentiable (see `_TopRankRotation`)."""
    return _TopRankRotation.apply(weight_matrix, resolve_rank(rank, weight_matrix.shape))


def rotation_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius cosine <A, B> / (||A|| ||B||) of two rotation matrices, in float64
    (float32 norms of the 512 x 4096 layer are off by ~1e-4 on the CPU)."""
    a, b = a.double(), b.double()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)


def factorised_inner(u_r: torch.Tensor, v_r: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """<U_r V_r^T, M> = trace(U_r^T M V_r), without forming U_r V_r^T."""
    return (u_r * (matrix @ v_r)).sum()


def exact_rotation(weight_matrix: torch.Tensor | None, rank: int | None, svd=None) -> torch.Tensor:
    """U_r V_r^T from a float64 SVD (rank None: full); `svd` reuses a computed one."""
    u, _, vh = svd if svd is not None else torch.linalg.svd(weight_matrix.double(), full_matrices=False)
    r = resolve_rank(rank, vh.shape)
    return u[:, :r] @ vh[:r]


def apply_rotation(layer: WeightLayer, rotation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rota(x): the layer's linear map (stride, padding) with its weight replaced by
    a full matrix reshaped to the weight's shape; no bias."""
    weight = layer.module.weight
    return apply_operator(layer, x, rotation.reshape(weight.shape).to(weight.dtype))


class FactorisedRotation:
    """U_r V_r^T of one layer applied as a rank-r map: V_r^T as r filters of the
    layer's shape (with its stride and padding), then U_r as a 1x1 map; for a dense
    layer two thin matmuls. Costs r/C_out of the layer's own map plus a 1x1 map."""

    def __init__(self, layer: WeightLayer, u_r: torch.Tensor, v_r: torch.Tensor):
        weight = layer.module.weight
        self.layer, self.u_r, self.v_r = layer, u_r.to(weight), v_r.to(weight)
        if isinstance(layer.module, nn.Conv2d):
            self.filters = self.v_r.t().reshape(self.v_r.shape[1], *weight.shape[1:]).contiguous()
            self.mixing = self.u_r[:, :, None, None].contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.layer.module
        if isinstance(module, nn.Conv2d):
            coefficients = F.conv2d(x, self.filters, None, module.stride, module.padding)
            return F.conv2d(coefficients, self.mixing)
        return (x @ self.v_r) @ self.u_r.t()


def layer_matrix(layer: WeightLayer) -> torch.Tensor:
    return matrix_view(layer.module)
