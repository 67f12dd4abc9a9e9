"""The benchmark command: one row per method beside the floor, ratios, the device named."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline_src.benchmark import benchmark
from pipeline_src.report.benchmark_tables import markdown_table
from pipeline_src.config import load_params
from pipeline_src.data.cifar import build_cache
from pipeline_src.paths import RunLayout


def test_benchmark_measures_every_method_against_the_floor(tmp_path: Path):
    params = load_params("smoke")
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    result = benchmark(params, tmp_path, ["lmt", "bcp"], None, warmup_steps=1, steps=1)
    assert [row["method"] for row in result["rows"]] == ["floor", "lmt", "bcp"]
    assert result["device"] == "cpu" and result["arch"] == params["model"]["arch"]
    floor, lmt, bcp = result["rows"]
    assert floor["ratio_to_floor"] == 1.0 and bcp["ratio_to_bcp"] == 1.0
    for row in result["rows"]:
        assert row["seconds_per_epoch"] > 0
        assert row["seconds_per_epoch"] == row["seconds_per_step"] * (900 // row["batch_size"])
    saved = json.loads((tmp_path / layout.root / "benchmark" / "benchmark_6C2F.json").read_text())
    assert saved["rows"] == result["rows"]
    table = markdown_table(result)
    assert "| bcp |" in table and "cpu" in table


def test_benchmark_times_duet_at_each_rank(tmp_path: Path):
    """Duet's cost against its rank; Duet reads the vanilla model and its SVD export."""
    import pytest
    import torch

    from pipeline_src.models import build_model
    from pipeline_src.spectral.svd_export import export_svd
    from pipeline_src.training.vanilla_checks import check_guide

    params = load_params("smoke")
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    (tmp_path / layout.vanilla_model).parent.mkdir(parents=True)
    torch.save({"state_dict": build_model(params["model"]).state_dict(), "model": params["model"],
                "data_sha256": "test"}, tmp_path / layout.vanilla_model)
    export_svd(params, tmp_path, check_guide)
    result = benchmark(params, tmp_path, ["bcp"], None, warmup_steps=1, steps=1, duet_ranks=[1, "full"])
    assert [row["method"] for row in result["rows"]] == ["floor", "bcp", "duet-r1", "duet-rfull"]
    assert all(row["ratio_to_bcp"] > 0 for row in result["rows"])
    with pytest.raises(ValueError, match="neither methods nor runs of this profile"):
        benchmark(params, tmp_path, ["nope"], None, warmup_steps=1, steps=1)


def test_benchmark_times_methods_the_profile_does_not_train(tmp_path: Path):
    """`benchmark.methods` may name any method with a params block (the gpu_bcp profile
    trains BCP alone and times all four)."""
    from pipeline_src.runs import benchmark_methods

    params = load_params("smoke")
    params = {**params, "methods": ["bcp"], "benchmark": {**params["benchmark"], "methods": ["lmt", "bcp"]}}
    assert benchmark_methods(params) == ["lmt", "bcp"]
    assert benchmark_methods({**params, "benchmark": {**params["benchmark"], "methods": None}}) == ["bcp"]
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    result = benchmark(params, tmp_path, benchmark_methods(params), None, warmup_steps=0, steps=1)
    assert [row["method"] for row in result["rows"]] == ["floor", "lmt", "bcp"]
    assert load_params("gpu_bcp")["benchmark"]["methods"] == ["lmt", "bcp", "localbcp", "duet"]


def test_benchmark_depth_times_every_method_at_every_architecture(tmp_path: Path, monkeypatch):
    """Cost against depth: Duet at an architecture other than the run's gets a stand-in guide."""
    from pipeline_src.benchmark import benchmark_depth
    from pipeline_src.report.benchmark_tables import depth_markdown_table

    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    params = load_params("smoke")
    layout = RunLayout.of(params)
    build_cache(params["data"], tmp_path / layout.data_cache, tmp_path / layout.data_provenance, tmp_path)
    depth = benchmark_depth(params, tmp_path, ["bcp", "duet"], ["4C3F", "8C2F"], warmup_steps=1, steps=1)
    assert set(depth["seconds_per_epoch"]) == {"floor", "bcp", "duet"}
    for method, times in depth["seconds_per_epoch"].items():
        assert set(times) == {"4C3F", "8C2F"} and all(t > 0 for t in times.values())
        assert depth["growth_over_first_arch"][method]["4C3F"] == 1.0
    saved = json.loads((tmp_path / layout.root / "benchmark" / "benchmark_depth.json").read_text())
    assert saved["seconds_per_epoch"] == depth["seconds_per_epoch"]
    assert "| duet |" in depth_markdown_table(depth) and "8C2F" in depth_markdown_table(depth)
    assert not (tmp_path / layout.vanilla_model).exists(), "the stand-in guide stays out of the run folder"
    assert not list(scratch.iterdir()), "the scratch guides are removed"


def test_compile_variants_name_what_was_timed():
    from pipeline_src.benchmark import compile_variants

    timed = [("lmt", "lmt", {"epochs": 1}), ("bcp", "bcp", {"compile": True}), ("duet", "duet", {"compile": False})]
    # The profile's own setting, named by it.
    assert [(n, c.get("compile")) for n, _, c in compile_variants(timed, False)] == [
        ("lmt", None), ("bcp+compile", True), ("duet", False)]
    # Both: every method that can compile, eager under its name and compiled beside it.
    assert [(n, c.get("compile")) for n, _, c in compile_variants(timed, True)] == [
        ("lmt", None), ("bcp", False), ("duet", False), ("bcp+compile", True), ("duet+compile", True)]
