"""The rotation-similarity stage (Table 1 of the paper): how close each layer's
rank-r rotation U_r V_r^T of a trained model is to the vanilla model's, per
layer and averaged over layers, at the run's rank and at full rank; beside it
the product of the layers' spectral norms (the Lipschitz constant column),
guaranteed upper bound and estimate.

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

The run's rank is `duet.rank` for every run but a Duet grid point, which is
measured at its own rank. The `similarity_control` stage scores Table 1's
control rows with the same measures: a second vanilla model trained from
another seed (the `vanilla_control` stage), and the certified architecture at
initialisation."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import git_commit, load_json, save_json, state_dict_sha256
from ..models import build_model
from ..paths import RunLayout
from ..runs import SIMILARITY_CONTROLS, control_seed, similarity_rank, similarity_settings
from ..spectral.rotation import exact_rotation, layer_matrix, rotation_cosine
from ..runtime import resolve_device, stage_seed
from ..bounds.certifiers import layer_norms, sound_numerics
from ..models.loading import load_trained

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


def rotation_similarity(model, vanilla, ranks: list[int | str | None]) -> dict:
    """{rank: per-layer cosine (%) between the two models' U_r V_r^T}; rank None or
    'full' means all singular vectors. One SVD per layer and model serves every rank."""
    out = {rank: [] for rank in ranks}
    for mine, theirs in zip(model.weight_layers(), vanilla.weight_layers()):
        svd_a, svd_b = svd64(_matrix64(mine)), svd64(_matrix64(theirs))
        for rank in ranks:
            r = None if rank == "full" else rank
            a, b = (exact_rotation(None, r, svd) for svd in (svd_a, svd_b))
            out[rank].append(100.0 * rotation_cosine(a, b).item())
    return out


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A^T B||_F^2 / r for two (n x r) matrices with orthonormal columns: 1 for the
    same subspace, 0 for orthogonal ones, k/r when they share exactly k directions;
    unchanged by sign flips and by any rotation of either basis within its span."""
    if a.shape != b.shape:
        raise ValueError(f"subspace_overlap: bases of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    return ((a.t() @ b).square().sum() / a.shape[1]).item()


def _effective_rank(rank: int | str | None, shape: tuple[int, int]) -> int:
    full = min(shape)
    return full if rank in (None, "full") else min(int(rank), full)


def layer_svds(model) -> list:
    """The float64 SVD of every weight layer's matrix view."""
    return [svd64(_matrix64(layer)) for layer in model.weight_layers()]


def measures_from_svds(svds_a: list, svds_b: list, rank: int | str) -> dict:
    """Every measure of MEASURES, per layer (in %), from the two models' layer SVDs."""
    out = {name: [] for name in MEASURES}
    out["rank_per_layer"] = []
    for svd_a, svd_b in zip(svds_a, svds_b):
        shape = (svd_a.U.shape[0], svd_a.Vh.shape[1])
        r = _effective_rank(rank, shape)
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


def similarity_measures(model, vanilla, rank: int | str) -> dict:
    """Every measure of MEASURES between two networks of the same architecture,
    per weight layer (in %), at `rank` (similarity_full_rank: at full rank)."""
    return measures_from_svds(layer_svds(model), layer_svds(vanilla), rank)


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
    from scipy.optimize import linear_sum_assignment

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


# ------------------------------------------------------------------ metrics files
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


def _summary_line(metrics: dict) -> str:
    return (f"cosine {metrics['similarity_mean']:.1f}% (matched {metrics['matched_similarity_mean']:.1f}%) "
            f"at rank {metrics['rank']}, {metrics['similarity_full_rank_mean']:.1f}% "
            f"(matched {metrics['matched_similarity_full_rank_mean']:.1f}%) at full rank; subspace overlap "
            f"{metrics['subspace_overlap_mean']:.1f}% (matched {metrics['matched_subspace_overlap_mean']:.1f}%, "
            f"chance {metrics['subspace_overlap_chance_mean']:.1f}%); Lipschitz {metrics['lipschitz_upper']:.4g}")


def similarity_metrics(params: dict, method: str, root: Path) -> dict:
    from ..runs import method_runs

    layout = RunLayout.of(params)
    device = resolve_device(params["run"]["device"])
    model = load_trained(root / layout.train(method, "model.pt"), device)
    vanilla = load_trained(root / layout.vanilla_model, device)
    rank = similarity_rank(params, method)
    # The Lipschitz column: the certification stage's guaranteed norms, not recomputed.
    norms = load_json(root / layout.certify(method, "metrics.json"))["spectral_norms"]
    metrics = {
        "stage": "similarity", "method": method, "profile": params["profile"],
        "init_from": method_runs(params)[method].config.get("init_from", "scratch"),
        # Ties this file to the trained model it evaluated (train metrics.json) and to the vanilla model.
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "vanilla_weights_sha256": state_dict_sha256(vanilla.state_dict()),
        **comparison_metrics(model, vanilla, rank),
        "lipschitz_upper": norms["lipschitz_upper"],
        "lipschitz_estimate": norms["lipschitz_estimate"],
        "git_commit": git_commit(root),
    }
    save_json(metrics, root / layout.similarity(method, "metrics.json"))
    print(f"[similarity] {method}: {_summary_line(metrics)}")
    return metrics


def random_control_seed(params: dict) -> int:
    """The seed of the random network of Table 1's control row (its own, from the control seed)."""
    return stage_seed(control_seed(params), "similarity", "random")


def certified_model_params(params: dict) -> dict:
    """The certified architecture as BCP (and Duet, paired with it) builds it: the
    `model` block with the bcp block's `model` overrides (its initialisation)."""
    return {**params["model"], **params["bcp"].get("model", {})}


def random_network(params: dict, device: torch.device):
    """The certified architecture at initialisation, from its own seed; the global
    random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_control_seed(params))
        return build_model(certified_model_params(params)).to(device).eval()


def control_metrics(params: dict, control: str, root: Path, vanilla=None, vanilla_svds: list | None = None) -> dict:
    """A control row of Table 1 against the vanilla model, at `duet.rank`: the second
    vanilla model (`vanilla_control`) or a network at initialisation (`random`), with
    its Lipschitz product (guaranteed upper bound per layer, as the certifier's)."""
    layout = RunLayout.of(params)
    device = resolve_device(params["run"]["device"])
    vanilla = load_trained(root / layout.vanilla_model, device) if vanilla is None else vanilla
    settings = similarity_settings(params)
    extra = {}
    if control == "vanilla_control":
        model = load_trained(root / layout.vanilla_control("model.pt"), device)
        trained = load_json(root / layout.vanilla_control("metrics.json"))
        seed = control_seed(params)
        extra = {"test_accuracy": trained["test_accuracy"], "epochs": trained["epochs"]}
        description = f"a second vanilla model, the same recipe from seed {seed}"
    elif control == "random":
        model = random_network(params, device)
        seed = random_control_seed(params)
        spec = certified_model_params(params)
        description = f"the {spec['arch']} {spec['activation']} network at initialisation ({spec['init']}, " \
                      f"as BCP builds it), seed {seed}"
    else:
        raise ValueError(f"unknown similarity control '{control}'")
    with sound_numerics(model):
        norms = layer_norms(model, params["certify"]["power_iterations"], params["run"]["seed"])
    metrics = {
        "stage": "similarity_control", "control": control, "description": description,
        "profile": params["profile"], "seed": seed, "control_seed_offset": settings["control_seed_offset"],
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "vanilla_weights_sha256": state_dict_sha256(vanilla.state_dict()),
        **extra,
        **comparison_metrics(model, vanilla, params["duet"]["rank"], vanilla_svds),
        "lipschitz_upper": norms.lipschitz_upper,
        "lipschitz_estimate": norms.report()["lipschitz_estimate"],
        "spectral_norms": norms.report(),
        "git_commit": git_commit(root),
    }
    save_json(metrics, root / layout.similarity_control(control))
    print(f"[similarity] control {control}: {_summary_line(metrics)}")
    return metrics


def similarity_controls(params: dict, root: Path) -> dict[str, dict]:
    """The `similarity_control` stage: every control row of Table 1 (SIMILARITY_CONTROLS),
    the vanilla model loaded and decomposed once."""
    layout = RunLayout.of(params)
    vanilla = load_trained(root / layout.vanilla_model, resolve_device(params["run"]["device"]))
    vanilla_svds = layer_svds(vanilla)
    return {control: control_metrics(params, control, root, vanilla, vanilla_svds) for control in SIMILARITY_CONTROLS}
