"""The rotation-similarity stage (Table 1 of the paper): how close each layer's
rank-r rotation U_r V_r^T of a trained model is to the vanilla model's, per
layer and averaged over layers, at the run's rank and at full rank; beside it
the product of the layers' spectral norms (the Lipschitz constant column),
guaranteed upper bound and estimate.

The measures (plain cosine, channel-matched cosine, subspace overlap; all from
float64 SVDs, in percent) are `spectral/similarity.py`'s.

The run's rank is `duet.rank` for every run but a Duet grid point, which is
measured at its own rank. The `similarity_control` stage scores Table 1's
control rows with the same measures: a second vanilla model trained from
another seed (the `vanilla_control` stage), and the certified architecture at
initialisation."""
from __future__ import annotations

from pathlib import Path

import torch

from ..io import git_commit, load_json, save_json, state_dict_sha256
from ..models import build_model
from ..paths import RunLayout
from ..runs import SIMILARITY_CONTROLS, control_rank, control_seed, method_runs, similarity_rank, similarity_settings
from ..spectral.similarity import comparison_metrics, layer_svds
from ..runtime import resolve_device, stage_seed
from ..bounds.numerics import layer_norms, sound_numerics
from ..models.loading import load_trained


def _summary_line(metrics: dict) -> str:
    return (f"cosine {metrics['similarity_mean']:.1f}% (matched {metrics['matched_similarity_mean']:.1f}%) "
            f"at rank {metrics['rank']}, {metrics['similarity_full_rank_mean']:.1f}% "
            f"(matched {metrics['matched_similarity_full_rank_mean']:.1f}%) at full rank; subspace overlap "
            f"{metrics['subspace_overlap_mean']:.1f}% (matched {metrics['matched_subspace_overlap_mean']:.1f}%, "
            f"chance {metrics['subspace_overlap_chance_mean']:.1f}%); Lipschitz {metrics['lipschitz_upper']:.4g}")


def similarity_metrics(params: dict, method: str, root: Path) -> dict:
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
        **comparison_metrics(model, vanilla, control_rank(params), vanilla_svds),
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
