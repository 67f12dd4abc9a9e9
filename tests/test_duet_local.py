"""Duet on local Lipschitz bounds (pipeline_src/methods/duet_local.py): LocalBCP
plus Duet's similarity term, one code for the term (`duet.SimilarityTerm`).

lambda = 0 is LocalBCP bit for bit through `train_certified`; the term is Duet's
own (the same value on the same model); the bound is LocalBCP's with the term's
sigmas; the two are paired per seed; the params block is LocalBCP's plus
Duet's term keys; the DAG gives its training the guide; Table 2 pairs it with
LocalBCP. The tiny training runs reuse tests/test_duet.py's fixtures."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_src.bounds.local import local_worst_logits
from pipeline_src.config import load_params
from pipeline_src.runs import METHOD_FACTS, method_runs
from pipeline_src.methods import METHODS, build_method
from pipeline_src.methods.duet import Duet, SimilarityTerm
from pipeline_src.methods.duet_local import DuetLocal
from pipeline_src.methods.localbcp import LocalBCP
from pipeline_src.models import build_model
from pipeline_src.training import certified as certified_training
from pipeline_src.runtime import seed_everything, stage_seed
from test_duet import (SEED, Recorder, batch, factors, guide_root, one_thread, params, run_root,  # noqa: F401
                       short_schedule, vanilla)

# The similarity term's keys: the same in the duet and duet_local blocks.
TERM_KEYS = ("lambda", "sim_form", "cert_rotation", "van_sigma", "rank", "layers", "probe", "detach_probe")
# Keys only a similarity method has (the grid), or only BCP (compile).
NOT_LOCALBCP = TERM_KEYS + ("ranks", "lambdas", "sim_forms")


def _local_model(params: dict) -> torch.nn.Module:
    """The certification model as `train_certified` builds it for duet_local (LocalBCP's seed)."""
    seed_everything(stage_seed(SEED, "train", "localbcp"))
    return build_model({**params["model"], **params["duet_local"]["model"]})


def make(name: str, model, cfg: dict, vanilla, factors, seed: int = 3):
    return build_method(name, model, cfg, torch.Generator().manual_seed(seed), 200,
                        {"guide": {"model": vanilla, "factors": factors}})


# ---------------------------------------------------------------- 1. what the method is
def test_duet_local_is_localbcp_plus_duets_term():
    assert METHODS["duet_local"] is DuetLocal
    assert issubclass(DuetLocal, LocalBCP) and issubclass(DuetLocal, SimilarityTerm)
    assert DuetLocal.certifier == "local" == LocalBCP.certifier
    assert DuetLocal.facts.paired_with == "localbcp" and DuetLocal.seed_family() == LocalBCP.seed_family() == "localbcp"
    assert DuetLocal.facts.similarity_term and Duet.facts.similarity_term and not LocalBCP.facts.similarity_term
    assert METHOD_FACTS["duet_local"].paired_with == "localbcp" and METHOD_FACTS["duet_local"].similarity_term
    # One code for the term: nothing of it is defined twice.
    for attr in ("regulariser", "step_norms", "forward", "after_step", "_probes", "_rota_cer", "_cosine"):
        assert getattr(DuetLocal, attr) is getattr(Duet, attr) is getattr(SimilarityTerm, attr), attr
    assert DuetLocal.bounds is LocalBCP.bounds and Duet.bounds is METHODS["bcp"].bounds


def test_the_term_is_duets_on_the_same_model(params, vanilla, factors, batch):
    """Duet-local's loss_sim is Duet's: the same value on the same (clipped-ReLU) model and batch."""
    x, y = batch
    model = _local_model(params)
    term = {key: params["duet"][key] for key in TERM_KEYS}
    local = make("duet_local", model, {**params["duet_local"], **term, "power_iterations": 2}, vanilla, factors)
    duet = make("duet", model, {**params["duet"], **term, "power_iterations": 2}, vanilla, factors)
    values = []
    for method in (local, duet):
        logits = method.forward(x)
        values.append(method.regulariser(x, y, logits))
        method.after_step()
    assert torch.isfinite(values[0]) and values[0] > 0
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


def test_bounds_are_localbcps_with_the_terms_sigmas(params, vanilla, factors, batch):
    x, y = batch
    eps, index = params["duet_local"]["eps_train"], torch.arange(len(y))
    model = _local_model(params)
    cfg = {**params["duet_local"], "power_iterations": 2, "vector_cache": False}
    method = make("duet_local", model, cfg, vanilla, factors, seed=5)
    reference = build_method("localbcp", model, {**params["localbcp"], "power_iterations": 2,
                                                 "vector_cache": False},
                             torch.Generator().manual_seed(5), 200)
    for _ in range(2):
        state = copy.deepcopy(method.power)
        logits = method.forward(x)
        regulariser = method.regulariser(x, y, logits)
        assert regulariser is not None and torch.isfinite(regulariser)
        local_state = copy.deepcopy(method.local_power)
        got = method.bounds(x, y, logits, eps, index)
        sigmas = state.norms(model.weight_layers(), cfg["power_iterations"])
        expected, _ = local_worst_logits(model, x, y, eps, sigmas, local_state, index,
                                         cfg["local_power_iterations"], cfg["translation_iterations"])
        torch.testing.assert_close(got.worst_logits, expected, rtol=0, atol=0)
        # ... and LocalBCP itself, from the same generator, gives the same worst-case logits.
        expected_local = reference.bounds(x, y, reference.forward(x), eps, index)
        torch.testing.assert_close(got.worst_logits, expected_local.worst_logits, rtol=0, atol=0)
        method.after_step()
        reference.after_step()


@pytest.mark.parametrize("key,value", [("sim_form", "foo"), ("probe", "both")])
def test_bad_choice_names_the_duet_local_block(params, vanilla, factors, key, value):
    with pytest.raises(ValueError, match=rf"duet_local\.{key}"):
        make("duet_local", _local_model(params), {**params["duet_local"], key: value}, vanilla, factors)
    with pytest.raises(ValueError, match="duet_local needs the vanilla model"):
        build_method("duet_local", _local_model(params), params["duet_local"], torch.Generator().manual_seed(0), 200)


# ---------------------------------------------------------------- 2. training: lambda = 0 is LocalBCP, paired
def test_lambda_zero_is_localbcp_bit_for_bit(params, guide_root, tmp_path):
    """Same seed, lambda = 0: Duet-local's weights (thetas included) are LocalBCP's, bit for bit."""
    local = certified_training.train_certified(short_schedule(params, "localbcp"), "localbcp",
                                               run_root(guide_root, params, tmp_path, "localbcp"))
    zero = certified_training.train_certified(short_schedule(params, "duet_local", **{"lambda": 0.0}),
                                              "duet_local", run_root(guide_root, params, tmp_path, "zero"))
    assert zero["weights_sha256"] == local["weights_sha256"]
    # ... and with the term on, the weights move away (the comparison can fail).
    on = certified_training.train_certified(short_schedule(params, "duet_local"), "duet_local",
                                            run_root(guide_root, params, tmp_path, "on"))
    assert on["weights_sha256"] != local["weights_sha256"]
    assert on["method"] == "duet_local" and on["activation"] == "clipped_relu"


def test_duet_local_and_localbcp_start_from_the_same_weights_and_batches(params, guide_root, tmp_path,
                                                                         monkeypatch):
    seen = {}
    for method in ("localbcp", "duet_local"):
        recorder = Recorder(monkeypatch)
        certified_training.train_certified(short_schedule(params, method, epochs=1), method,
                                           run_root(guide_root, params, tmp_path, method))
        seen[method] = recorder
        monkeypatch.undo()
    local, duet_local = seen["localbcp"], seen["duet_local"]
    assert all(torch.equal(local.initial[k], duet_local.initial[k]) for k in local.initial)
    assert len(local.batches) == len(duet_local.batches) == 4
    assert all(torch.equal(a, b) for a, b in zip(local.batches, duet_local.batches))


# ---------------------------------------------------------------- 3. params, DAG, report
@pytest.mark.parametrize("profile", ["paper", "smoke"])
def test_block_is_localbcps_plus_duets_term(profile):
    p = load_params(profile)
    block, local, duet = p["duet_local"], p["localbcp"], p["duet"]
    assert {k: v for k, v in block.items() if k not in NOT_LOCALBCP} == local
    assert {k: block[k] for k in TERM_KEYS} == {k: duet[k] for k in TERM_KEYS}
    assert ("duet_local" in p["methods"]) == (profile == "smoke")   # the paper profile: the paper's runs


def test_grid_and_guide():
    p = load_params("smoke")
    p["duet_local"] = {**p["duet_local"], "ranks": [1, 4]}
    runs = method_runs(p)
    assert runs["duet_local-r1-l1-paper"].method == "duet_local" and runs["duet_local-r1-l1-paper"].config["rank"] == 1
    assert "duet_local" in runs and runs["duet_local"].config["rank"] == 4
    # The generated smoke DAG gives Duet-local's training the guide (vanilla model, SVD factors), not GloRo's.
    stages = yaml.safe_load((Path(__file__).resolve().parent.parent / "config/smoke/dvc.yaml").read_text())["stages"]
    guide = {"results/smoke/vanilla/model.pt", "results/smoke/svd/factors.pt"}
    assert guide <= set(stages["train_duet_local"]["deps"]) and guide <= set(stages["train_duet"]["deps"])
    assert not guide & set(stages["train_gloro"]["deps"]) and not guide & set(stages["train_localbcp"]["deps"])
    assert "duet_local" in stages["train_duet_local"]["params"][0]["params.yaml"]


def test_table2_pairs_duet_local_with_localbcp(tmp_path):
    from test_report import _params, _row, write_fake_runs

    from pipeline_src.report.collect import collect
    from pipeline_src.report.tables import table1, table2, table3

    params = _params(seeds=[0, 1], methods=("bcp", "localbcp", "duet", "duet_local"))
    values = {}
    for s in range(2):
        values[f"bcp-s{s}"] = {"clean": 60.0, "certified": 40.0}
        values[f"duet-s{s}"] = {"clean": 62.0, "certified": 39.0}
        values[f"localbcp-s{s}"] = {"clean": 65.0 + s, "certified": 45.0}
        values[f"duet_local-s{s}"] = {"clean": 67.0 + 3 * s, "certified": 44.0}
    write_fake_runs(tmp_path, params, values)
    inputs = collect(params, tmp_path)
    two = table2(inputs)
    pair = "Duet − BCP / Duet-local − LocalBCP"
    row = _row(two, "Duet-local")
    # Per seed: clean +2, +4 (mean 3, SE 1, 95 % t-interval ± 12.71 with one degree of freedom); certified -1, -1.
    assert row[f"{pair}, clean (paired)"] == "+3.00 ± 1.00 [−9.71, +15.71]" and row["Paired seeds (n)"] == "2"
    assert row[f"{pair}, certified (paired)"] == "−1.00 ± 0.00 [−1.00, −1.00]"
    assert row["Clean (%)"] == "68.50 ± 2.12 (+3.00)"            # its difference to LocalBCP, as Duet's to BCP
    assert row["Clean, paper (%)"] == "—" and row["Certifier"] == "bcp"   # (the fake files' certifier)
    assert _row(two, "Duet")[f"{pair}, clean (paired)"] == "+2.00 ± 0.00 [+2.00, +2.00]"
    data = two.data.set_index("run_group")
    assert data.loc["duet_local", "paired_with"] == "localbcp"
    assert data.loc["duet_local", "clean_paired_diff_mean"] == pytest.approx(3.0)
    assert data.loc["duet", "clean_paired_diff_bcp_mean"] == pytest.approx(2.0)
    assert data.loc["duet_local", "clean_diff_base"] == pytest.approx(3.0)
    assert any("Duet-local" in note for note in two.notes)
    # Tables 1 and 3 have its row too.
    assert _row(table1(inputs), "Duet-local")["Similarity, paper (%)"] == "—"
    assert _row(table3(inputs), "Duet-local")["Time, paper (s)"] == "—"
