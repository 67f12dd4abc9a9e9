"""The rotation-similarity stage (Table 1 of the paper): how close each layer's
rank-r rotation U_r V_r^T of a trained model is to the vanilla model's, as the
Frobenius cosine in percent, per layer and averaged over layers, at the Duet
rank and at full rank; beside it the product of the layers' spectral norms
(the Lipschitz constant column), guaranteed upper bound and estimate.

Both rotations come from float64 SVDs of the matrix views; U_r V_r^T does not
depend on the signs an SVD picks for its singular-vector pairs."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import git_commit, state_dict_sha256, load_json, save_json
from ..paths import RunLayout
from ..spectral.rotation import exact_rotation, layer_matrix, rotation_cosine
from ..training.common import resolve_device
from .stage import load_trained


def rotation_similarity(model, vanilla, ranks: list[int | str | None]) -> dict:
    """{rank: per-layer cosine (%) between the two models' U_r V_r^T}; rank None or
    'full' means all singular vectors. One SVD per layer and model serves every rank."""
    out = {rank: [] for rank in ranks}
    for mine, theirs in zip(model.weight_layers(), vanilla.weight_layers()):
        svd_a = torch.linalg.svd(layer_matrix(mine).detach().cpu().double(), full_matrices=False)
        svd_b = torch.linalg.svd(layer_matrix(theirs).detach().cpu().double(), full_matrices=False)
        for rank in ranks:
            r = None if rank == "full" else rank
            a, b = (exact_rotation(None, r, svd) for svd in (svd_a, svd_b))
            out[rank].append(100.0 * rotation_cosine(a, b).item())
    return out


def similarity_metrics(params: dict, method: str, root: Path) -> dict:
    layout = RunLayout.of(params)
    device = resolve_device(params["run"]["device"])
    model = load_trained(root / layout.train(method, "model.pt"), device)
    vanilla = load_trained(root / layout.vanilla_model, device)
    rank = params["duet"]["rank"]
    similarity = rotation_similarity(model, vanilla, [rank, "full"])
    at_rank, full = similarity[rank], similarity["full"]
    # The Lipschitz column: the certification stage's guaranteed norms, not recomputed.
    norms = load_json(root / layout.certify(method, "metrics.json"))["spectral_norms"]
    metrics = {
        "stage": "similarity", "method": method, "profile": params["profile"],
        "rank": rank,
        # Ties this file to the trained model it evaluated (train metrics.json).
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "similarity_per_layer": at_rank, "similarity_mean": sum(at_rank) / len(at_rank),
        "similarity_full_rank_per_layer": full, "similarity_full_rank_mean": sum(full) / len(full),
        "lipschitz_upper": norms["lipschitz_upper"],
        "lipschitz_estimate": norms["lipschitz_estimate"],
        "git_commit": git_commit(root),
    }
    save_json(metrics, root / layout.similarity(method, "metrics.json"))
    print(f"[similarity] {method}: {metrics['similarity_mean']:.1f}% at rank {rank}, "
          f"{metrics['similarity_full_rank_mean']:.1f}% at full rank; Lipschitz {norms['lipschitz_upper']:.4g}")
    return metrics
