"""The measures of how close two networks of the same architecture are (Table 1
of the paper), layer by layer: each layer's rank-r rotation U_r V_r^T compared
at a rank and at full rank, before and after the hidden units are matched.


Three measures, all from float64 SVDs of the matrix views (out x in for a dense
layer, C_out x C_in*k*k for a convolution), all in percent:

  * plain cosine (`similarity_*`): the Frobenius cosine of the two models'
    U_r V_r^T. It does not depend on the signs an SVD picks for its
    singular-vector pairs, but it does depend on the order of the hidden
    units: two equally good networks trained from different seeds score about
    0%, since nothing ties unit j of one to unit j of the other;
  * channel-matched cosine (`matched_similarity_*`): the same cosine after the
    trained model's hidden units are permuted onto the vanilla model's. Layer
    by layer, its output units are matched to the vanilla's by a linear
    assignment maximising the summed signed cosine of the units' weight rows
    (ReLU networks are invariant to permutations of hidden units, not to sign
    flips), and the permutation is carried into the next layer's inputs (the
    input channels of the next convolution; for the first dense layer the
    channel blocks of the C,H,W flatten order). The logits are never permuted.
    For ReLU and clipped ReLU the permuted network computes the same function
    (`permute_hidden_units`); for MaxMin, whose units act in pairs, it does not,
    and the match is a measure only;
  * subspace overlap (`subspace_overlap_*`, and `matched_subspace_overlap_*`
    after the match): ||U_r^T U'_r||_F^2 / r for the left singular subspaces
    and the same for the right ones, and their mean; free of signs and of the
    order (any rotation) within the subspaces. Two random r-dimensional
    subspaces of R^m overlap r/m on average (`subspace_overlap_chance_*`). At
    full rank the overlap is 100% on the side whose dimension is min(out, in)
    (both sides for a square layer), so it is reported at the run's rank only.

The stage that applies them to the trained runs, and its control rows, is
`certify/similarity.py`."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .rotation import exact_rotation, layer_matrix, resolve_rank, rotation_cosine

# The measures of one comparison, each a per-layer list and its mean over layers (in %).
MEASURES = ("similarity", "similarity_full_rank", "subspace_overlap_u", "subspace_overlap_v",
            "subspace_overlap", "subspace_overlap_chance")


# ------------------------------------------------------------------ the measures
def _matrix64(layer) -> torch.Tensor:
    return layer_matrix(layer).detach().cpu().double()


def svd64(matrix: torch.Tensor):
    """The thin float64 SVD (U, S, Vh) of a matrix view. A wide matrix is decomposed as
    its transpose (the same factors, swapped): LAPACK takes several times longer on the
    wide 512 x 4096 dense layer than on its transpose."""
    matrix = matrix.double()
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    u, s, vh = torch.linalg.svd(matrix.t(), full_matrices=False)
    return torch.return_types.linalg_svd((vh.t(), s, u.t()))


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / r for two (n x r) matrices with orthonormal columns: 1 for the
    same subspace, 0 for orthogonal ones, k/r when they share exactly k directions;
    unchanged by sign flips and by any rotation of either basis within its span."""
    if a.shape != b.shape:
        raise ValueError(f"subspace_overlap: bases of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    return ((a.t() @ b).square().sum() / a.shape[1]).item()


def layer_svds(model) -> list:
    """The float64 SVD of every weight layer's matrix view."""
    return [svd64(_matrix64(layer)) for layer in model.weight_layers()]


def measures_from_svds(svds_a: list, svds_b: list, rank: int | str) -> dict:
    """Every measure of MEASURES, per layer (in %), from the two models' layer SVDs."""
    out = {name: [] for name in MEASURES}
    out["rank_per_layer"] = []
    for svd_a, svd_b in zip(svds_a, svds_b):
        shape = (svd_a.U.shape[0], svd_a.Vh.shape[1])
        r = resolve_rank(rank, shape)
        out["rank_per_layer"].append(r)
        out["similarity"].append(100.0 * rotation_cosine(exact_rotation(None, r, svd_a),
                                                         exact_rotation(None, r, svd_b)).item())
        out["similarity_full_rank"].append(100.0 * rotation_cosine(exact_rotation(None, None, svd_a),
                                                                   exact_rotation(None, None, svd_b)).item())
        u = 100.0 * subspace_overlap(svd_a.U[:, :r], svd_b.U[:, :r])
        v = 100.0 * subspace_overlap(svd_a.Vh[:r].t(), svd_b.Vh[:r].t())
        out["subspace_overlap_u"].append(u)
        out["subspace_overlap_v"].append(v)
        out["subspace_overlap"].append((u + v) / 2)
        out["subspace_overlap_chance"].append(100.0 * (r / shape[0] + r / shape[1]) / 2)
    return out


# ------------------------------------------------------------------ matching hidden units
def _input_index(perm: torch.Tensor, in_features: int) -> torch.Tensor:
    """Column order of a matrix view whose inputs follow the previous layer's permuted
    outputs: blocks of in_features / len(perm) columns per unit (a unit's k*k kernel
    taps for a convolution, its H*W positions in the C,H,W flatten order, 1 otherwise)."""
    return torch.arange(in_features, device=perm.device).reshape(len(perm), -1)[perm].reshape(-1)


def _permute_inputs(layer, weight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The layer's weight with its inputs reordered as the previous layer's outputs
    were (perm[j] = the old unit now at j); a dense layer after the flatten reorders
    the channel blocks of the C,H,W flatten order."""
    if perm is None:
        return weight
    perm = perm.to(weight.device)
    if layer.kind == "conv":
        return weight[:, perm]
    return weight[:, _input_index(perm, weight.shape[1])]


def permuted_svds(svds: list, perms: list[torch.Tensor | None]) -> list:
    """The layer SVDs of `permute_hidden_units(model, perms)` from the model's own:
    permuting rows and columns of W permutes the rows of U and the columns of Vh."""
    out, previous = [], None
    for (u, s, vh), perm in zip(svds, perms):
        if previous is not None:
            vh = vh[:, _input_index(previous, vh.shape[1])]
        if perm is not None:
            u = u[perm]
        out.append(torch.return_types.linalg_svd((u, s, vh)))
        previous = perm
    return out


def match_hidden_units(model, reference) -> tuple[list[torch.Tensor | None], list[float | None]]:
    """Per weight layer, the permutation of the model's output units that best matches
    the reference's (perm[j] = the model's unit placed at the reference's unit j), by a
    linear assignment maximising the summed signed cosine of the units' weight rows,
    each layer's rows taken after its inputs were permuted as the layer before's
    outputs; and the mean cosine (%) of the matched rows. None for the logit layer."""
    perms, cosines, previous = [], [], None
    for layer, ref in zip(model.weight_layers(), reference.weight_layers()):
        if layer.activation is None:  # the logits keep their order
            perms.append(None)
            cosines.append(None)
            continue
        weight = _permute_inputs(layer, layer.module.weight.detach().cpu().double(), previous)
        rows_a = F.normalize(weight.reshape(weight.shape[0], -1), dim=1)
        rows_b = F.normalize(_matrix64(ref), dim=1)
        score = (rows_a @ rows_b.t()).numpy()  # score[i, j]: model unit i against reference unit j
        mine, theirs = linear_sum_assignment(score, maximize=True)
        perm = torch.empty(len(theirs), dtype=torch.long)
        perm[torch.as_tensor(theirs)] = torch.as_tensor(mine)
        perms.append(perm)
        cosines.append(100.0 * float(score[mine, theirs].mean()))
        previous = perm
    return perms, cosines


@torch.no_grad()
def permute_hidden_units(model, perms: list[torch.Tensor | None]):
    """A copy of the network with each layer's output units reordered by its
    permutation (weights, biases and clipped-ReLU thresholds) and the next layer's
    inputs with them; a ReLU or clipped-ReLU network computes the same function."""
    permuted = copy.deepcopy(model)
    previous = None
    for layer, perm in zip(permuted.weight_layers(), perms):
        module = layer.module
        module.weight.copy_(_permute_inputs(layer, module.weight, previous))
        if perm is not None:
            index = perm.to(module.weight.device)
            module.weight.copy_(module.weight[index])
            if module.bias is not None:
                module.bias.copy_(module.bias[index])
            theta = getattr(layer.activation, "theta", None)
            if theta is not None:
                theta.copy_(theta[index])
        previous = perm
    return permuted


# ------------------------------------------------------------------ one comparison, plain and matched
def _with_means(measures: dict, prefix: str = "") -> dict:
    out = {}
    for name in MEASURES:
        values = measures[name]
        out[f"{prefix}{name}_per_layer"] = values
        out[f"{prefix}{name}_mean"] = sum(values) / len(values)
    return out


def comparison_metrics(model, vanilla, rank: int | str, vanilla_svds: list | None = None) -> dict:
    """All measures of a model against the vanilla model, plain and channel-matched
    (one SVD per layer and model: the matched model's factors are the permuted ones;
    `vanilla_svds`, the vanilla model's layer_svds, when already computed)."""
    svds = layer_svds(model)
    vanilla_svds = layer_svds(vanilla) if vanilla_svds is None else vanilla_svds
    plain = measures_from_svds(svds, vanilla_svds, rank)
    perms, unit_cosines = match_hidden_units(model, vanilla)
    matched = measures_from_svds(permuted_svds(svds, perms), vanilla_svds, rank)
    hidden = [c for c in unit_cosines if c is not None]
    return {
        "rank": rank, "rank_per_layer": plain["rank_per_layer"],
        **_with_means(plain), **_with_means(matched, "matched_"),
        "unit_match_cosine_per_layer": unit_cosines,
        "unit_match_cosine_mean": sum(hidden) / len(hidden) if hidden else math.nan,
        "units_moved_per_layer": [None if p is None else int((p != torch.arange(len(p))).sum()) for p in perms],
    }
