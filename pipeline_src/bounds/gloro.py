"""GloRo's margin bound (Leino et al. 2021): for logits z = W h + b of a network
whose layers before the last are Lipschitz with constant K_sub = prod_{l < L}
sigma_l (every activation here is 1-Lipschitz), the margin z_j - z_i moves by at
most ||w_j - w_i||_2 * K_sub * ||delta|| when the input moves by delta. So

    K_ji = ||w_j - w_i||_2 * K_sub            (the per-class-pair Lipschitz bound),
    z_bot = max_{i != j} z_i + eps * K_ji     (GloRo's bottom logit, j = argmax z),

and the prediction j is robust at radius eps when z_j > z_bot. Every K_ji is
at most sqrt(2) ||W||_2 K_sub, so this bound is never looser than LMT's margin.

Training: K_sub from power-iteration estimates (`methods.gloro`), differentiable in
the weights; j is the prediction (no gradient through the argmax), as in GloRo's
`GloroNet.call`. Certification (`bounds.certifiers`, "gloro") uses the label y for
j, guaranteed spectral upper bounds for K_sub and float64 throughout
(`margin_shift`), and decides under the relative-margin rule."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Relative widening of the float64 pairwise bound for the rounding of its norms and
# products (as `bounds.local.FLOAT64_MARGIN`).
FLOAT64_MARGIN = 1e-9


def pairwise_row_distances(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """||w_j - w_i||_2 for j = rows[b] and every class i: (B, C); 0 at i = j."""
    return (weight.unsqueeze(0) - weight[rows].unsqueeze(1)).norm(dim=-1)


def margin_shift(weight: torch.Tensor, rows: torch.Tensor, sub_lipschitz: torch.Tensor | float,
                 eps: float | torch.Tensor) -> torch.Tensor:
    """eps * K_ji = eps * ||w_j - w_i|| * K_sub, (B, C): how far each margin z_j - z_i can
    fall inside the l2 ball of radius eps (0 at i = j)."""
    return eps * sub_lipschitz * pairwise_row_distances(weight, rows)


def bottom_logit(logits: torch.Tensor, weight: torch.Tensor, sub_lipschitz: torch.Tensor | float,
                 eps: float | torch.Tensor) -> torch.Tensor:
    """GloRo's z_bot = max_{i != j} (z_i + eps K_ji), j = argmax z: (B,)."""
    predicted = logits.argmax(1)
    raised = logits + margin_shift(weight, predicted, sub_lipschitz, eps)
    own = F.one_hot(predicted, logits.shape[1]).bool()
    return raised.masked_fill(own, float("-inf")).amax(1)


def gloro_logits(logits: torch.Tensor, weight: torch.Tensor, sub_lipschitz: torch.Tensor | float,
                 eps: float | torch.Tensor) -> torch.Tensor:
    """[z, z_bot]: the C + 1 logits GloRo trains on (the label is never the bottom class)."""
    return torch.cat([logits, bottom_logit(logits, weight, sub_lipschitz, eps)[:, None]], dim=1)


def trades_kl(logits: torch.Tensor, extended: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per example, p = softmax(z) with 0 for the bottom class, q = softmax([z, z_bot]),
    the robust term of GloRo's TRADES loss. The two softmaxes share every class but bot, so
    log p_i - log q_i is the same for every i: KL = logsumexp([z, z_bot]) - logsumexp(z)
    (= CE([z, z_bot], y) - CE(z, y) for any label y)."""
    return torch.logsumexp(extended, dim=1) - torch.logsumexp(logits, dim=1)


def certified_margin_shift(weight: torch.Tensor, y: torch.Tensor, sub_lipschitz_upper: float,
                           eps: float) -> torch.Tensor:
    """t_i = eps * ||w_y - w_i|| * K_sub in float64, widened by FLOAT64_MARGIN: the shift the
    GloRo certificate compares each margin z_y - z_i with (`sub_lipschitz_upper` a product of
    guaranteed spectral upper bounds of the layers before the last)."""
    shift = margin_shift(weight.double(), y, float(sub_lipschitz_upper), float(eps))
    return shift * (1.0 + FLOAT64_MARGIN)
