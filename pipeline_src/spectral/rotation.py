"""Rotation factors of weight layers (Duet, sections 4.3-4.4): for the matrix
view W = U S V^T of a layer, its rank-r "rotation" R_r = U_r V_r^T, the
similarity of two models' rotations, and the layer map with R_r in place of
W ("Rota").

The certification model's R_r must be differentiable and must stay finite
when singular values come close, which certified training makes them do: the
gradient of an SVD has 1/(s_i^2 - s_j^2) terms. So R_r is computed as
    R_r = polar(W V_r) V_r^T,
where V_r spans the top-r right singular subspace (found without gradient:
an exact SVD, or subspace iteration carried across steps) and polar(B) = B
(B^T B)^(-1/2) is the orthogonal polar factor, taken by Newton-Schulz
iterations whose gradients have no such terms. When V_r is the exact top-r
subspace, polar(W V_r) V_r^T = U_r V_r^T.
"""
from __future__ import annotations

import torch

from ..models.architectures import WeightLayer
from .operator_norm import apply_operator, matrix_view


def polar_factor(b: torch.Tensor, iterations: int = 12) -> torch.Tensor:
    """The orthogonal polar factor of a tall (m x r) matrix by Newton-Schulz.

    Scaling by the Frobenius norm puts every singular value in (0, 1], where
    X <- 1.5 X - 0.5 X X^T X converges to the polar factor (quadratically once
    close). Singular values near 0 converge slowly but stay finite."""
    x = b / b.norm().clamp_min(1e-30)
    for _ in range(iterations):
        x = 1.5 * x - 0.5 * x @ (x.transpose(-1, -2) @ x)
    return x


def rotation_from_subspace(weight_matrix: torch.Tensor, right_subspace: torch.Tensor,
                           iterations: int = 12) -> torch.Tensor:
    """R_r = polar(W V_r) V_r^T: differentiable in W, V_r (in x r, orthonormal) held fixed."""
    return polar_factor(weight_matrix @ right_subspace, iterations) @ right_subspace.t()


def top_right_subspace(weight_matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """V_r from an exact SVD (no gradient)."""
    with torch.no_grad():
        _, _, vh = torch.linalg.svd(weight_matrix.double(), full_matrices=False)
    return vh[:rank].t().to(weight_matrix.dtype).contiguous()


class SubspaceIteration:
    """Top-r right singular subspace of a changing matrix, one orthogonal
    (block power) iteration per call, carried across training steps."""

    def __init__(self, in_features: int, rank: int, generator: torch.Generator, device: torch.device):
        start = torch.randn((in_features, rank), generator=generator, device=generator.device).to(device)
        self.basis = torch.linalg.qr(start).Q

    @torch.no_grad()
    def step(self, weight_matrix: torch.Tensor, iterations: int = 1) -> torch.Tensor:
        for _ in range(iterations):
            self.basis = torch.linalg.qr(weight_matrix.t() @ (weight_matrix @ self.basis)).Q
        return self.basis


def rotation_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Frobenius cosine <A, B> / (||A|| ||B||) of two rotation matrices, in float64
    (float32 norms of the 512 x 4096 layer are off by ~1e-4 on the CPU)."""
    a, b = a.double(), b.double()
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)


def exact_rotation(weight_matrix: torch.Tensor | None, rank: int | None, svd=None) -> torch.Tensor:
    """U_r V_r^T from a float64 SVD (rank None: full); `svd` reuses a computed one."""
    u, _, vh = svd if svd is not None else torch.linalg.svd(weight_matrix.double(), full_matrices=False)
    r = vh.shape[0] if rank is None else min(rank, vh.shape[0])
    return u[:, :r] @ vh[:r]


def apply_rotation(layer: WeightLayer, rotation: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Rota(x): the layer's linear map (stride, padding) with its weight replaced by
    the rotation reshaped to the weight's shape; no bias."""
    weight = layer.module.weight
    return apply_operator(layer, x, rotation.reshape(weight.shape).to(weight.dtype))


def layer_matrix(layer: WeightLayer) -> torch.Tensor:
    return matrix_view(layer.module)
