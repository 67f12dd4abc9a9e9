"""Operator norms of weight layers and the offline SVD export
(pipeline_src/spectral)."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from torch import nn

from pipeline_src.config import load_params
from pipeline_src.io import state_dict_sha256
from pipeline_src.models import CertifiableNet, WeightLayer, build_model
from pipeline_src.paths import RunLayout
from pipeline_src.spectral.operator_norm import (apply_adjoint, apply_operator, matrix_view,
                                                 operator_norm_upper_bound, power_iteration)
from pipeline_src.spectral.svd_export import export_svd, load_factors
from pipeline_src.training.vanilla_checks import check_guide
from tiny_nets import dense_operator

# (c_in, c_out, kernel, stride, padding, input side, weight seed)
CONVS = [
    (3, 4, 3, 1, 1, 8, 1),
    (4, 2, 3, 1, 0, 7, 0),
    (2, 4, 3, 1, 2, 7, 0),
    (3, 4, 4, 1, 1, 9, 0),
    (3, 5, 3, 2, 1, 9, 0),
    (2, 3, 4, 2, 1, 7, 0),
    (3, 6, 4, 2, 0, 9, 0),
    (2, 4, 3, 2, 0, 8, 0),
    (3, 3, 5, 2, 2, 9, 0),
    (3, 8, 4, 2, 1, 8, 0),
]
LINEARS = [(7, 5, 0), (20, 3, 1), (4, 12, 2), (64, 64, 3)]


def conv_layer(c_in, c_out, k, s, p, side, seed, dtype=torch.float64) -> WeightLayer:
    torch.manual_seed(seed)
    module = nn.Conv2d(c_in, c_out, k, s, p).to(dtype)
    out = (side + 2 * p - k) // s + 1
    return WeightLayer(0, module, (c_in, side, side), (c_out, out, out), None, False)


def linear_layer(d_in, d_out, seed, dtype=torch.float64) -> WeightLayer:
    torch.manual_seed(seed)
    return WeightLayer(0, nn.Linear(d_in, d_out).to(dtype), (d_in,), (d_out,), None, False)


ALL_LAYERS = ([pytest.param(("conv", c), id="conv{}-{}-k{}s{}p{}-{}x{}".format(*c[:6], c[5])) for c in CONVS]
              + [pytest.param(("linear", c), id="linear{}-{}".format(*c[:2])) for c in LINEARS])


def make(spec) -> WeightLayer:
    kind, args = spec
    return conv_layer(*args) if kind == "conv" else linear_layer(*args)


def exact_norm(layer: WeightLayer) -> float:
    return torch.linalg.matrix_norm(dense_operator(layer), ord=2).item()


# ---------------------------------------------------------------- operators
@pytest.mark.parametrize("spec", ALL_LAYERS)
def test_apply_operator_is_the_layer_without_bias(spec):
    layer = make(spec)
    x = torch.randn(3, *layer.input_shape, dtype=torch.float64)
    y = apply_operator(layer, x)
    assert tuple(y.shape[1:]) == layer.output_shape
    bias = layer.module.bias.view(-1, *[1] * (len(layer.output_shape) - 1))
    torch.testing.assert_close(y, layer.module(x) - bias)
    # dense_operator is the same map as a matrix
    dense = dense_operator(layer)
    assert tuple(dense.shape) == (math.prod(layer.output_shape), math.prod(layer.input_shape))
    torch.testing.assert_close(dense @ x.reshape(3, -1).t(), y.reshape(3, -1).t())


@pytest.mark.parametrize("spec", ALL_LAYERS)
def test_adjoint_is_the_transpose(spec):
    layer = make(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, *layer.input_shape, dtype=torch.float64, generator=g)
    y = torch.randn(4, *layer.output_shape, dtype=torch.float64, generator=g)
    aty = apply_adjoint(layer, y)
    assert tuple(aty.shape[1:]) == layer.input_shape
    lhs = (apply_operator(layer, x) * y).flatten(1).sum(1)
    rhs = (x * aty).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)
    # and exactly the transpose of the dense matrix
    torch.testing.assert_close(aty.reshape(4, -1), y.reshape(4, -1) @ dense_operator(layer),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ALL_LAYERS)
def test_power_iteration_finds_sigma_max(spec):
    layer = make(spec)
    sigma, v = power_iteration(layer, 2000, generator=torch.Generator().manual_seed(0))
    exact = exact_norm(layer)
    assert sigma == pytest.approx(exact, rel=1e-6)
    assert tuple(v.shape) == (1, *layer.input_shape)
    assert v.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert apply_operator(layer, v).norm().item() == pytest.approx(sigma, rel=1e-12)


def test_power_iteration_tolerance_stops_early():
    layer = linear_layer(30, 20, 0)
    g = torch.Generator().manual_seed(0)
    start = torch.randn(1, 30, dtype=torch.float64, generator=g)
    loose, _ = power_iteration(layer, 5000, tolerance=1e-2, v=start.clone())
    tight, _ = power_iteration(layer, 5000, tolerance=0.0, v=start.clone())
    exact = exact_norm(layer)
    assert loose <= exact * (1 + 1e-12) and tight == pytest.approx(exact, rel=1e-9)
    assert abs(loose - exact) > abs(tight - exact)


@pytest.mark.parametrize("spec", ALL_LAYERS)
def test_upper_bound_is_an_upper_bound(spec):
    layer = make(spec)
    exact = exact_norm(layer)
    bound = operator_norm_upper_bound(layer)
    assert bound >= exact * (1 - 1e-12), (bound, exact)
    assert bound <= 1.15 * exact, (bound, exact)
    if spec[0] == "linear":
        assert bound == pytest.approx(exact, rel=1e-6)


def test_random_convs_adjoint_and_bound():
    """Many random shapes, strides up to 3 (no tightness claim): the adjoint is the
    transpose and the bound is never below the exact norm."""
    g = torch.Generator().manual_seed(0)
    for trial in range(25):
        c_in, c_out = (int(v) for v in torch.randint(1, 5, (2,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        s = int(torch.randint(1, 4, (1,), generator=g))
        p = int(torch.randint(0, 3, (1,), generator=g))
        side = int(torch.randint(max(k - 2 * p, 1), 11, (1,), generator=g))
        layer = conv_layer(c_in, c_out, k, s, p, side, trial)
        dense = dense_operator(layer)
        y = torch.randn(2, *layer.output_shape, dtype=torch.float64, generator=g)
        torch.testing.assert_close(apply_adjoint(layer, y).reshape(2, -1), y.reshape(2, -1) @ dense,
                                   rtol=1e-12, atol=1e-12)
        exact, bound = exact_norm(layer), operator_norm_upper_bound(layer)
        assert bound >= exact * (1 - 1e-12), (c_in, c_out, k, s, p, side, bound, exact)


@pytest.mark.parametrize("h, w", [(8, 7), (9, 8)])
def test_adjoint_of_non_square_input(h, w):
    torch.manual_seed(0)
    module = nn.Conv2d(2, 3, 3, 2, 1).double()
    out_h, out_w = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    layer = WeightLayer(0, module, (2, h, w), (3, out_h, out_w), None, False)
    y = torch.randn(2, 3, out_h, out_w, dtype=torch.float64)
    aty = apply_adjoint(layer, y)
    assert tuple(aty.shape[1:]) == (2, h, w)
    torch.testing.assert_close(aty.reshape(2, -1), y.reshape(2, -1) @ dense_operator(layer))


def test_upper_bound_of_float32_layer_is_computed_in_float64():
    layer = conv_layer(3, 4, 3, 2, 1, 8, 0, dtype=torch.float32)
    exact = torch.linalg.matrix_norm(dense_operator(conv_layer(3, 4, 3, 2, 1, 8, 0)), ord=2).item()
    assert operator_norm_upper_bound(layer) >= exact * (1 - 1e-12)


def test_upper_bound_rejects_non_square_inputs():
    torch.manual_seed(0)
    layer = WeightLayer(0, nn.Conv2d(2, 2, 3, 1, 1), (2, 8, 6), (2, 8, 6), None, False)
    with pytest.raises(ValueError, match="square"):
        operator_norm_upper_bound(layer)


def test_matrix_view_shapes():
    conv = nn.Conv2d(5, 7, 3)
    assert tuple(matrix_view(conv).shape) == (7, 5 * 3 * 3)
    assert torch.equal(matrix_view(conv)[2], conv.weight[2].flatten())
    conv4 = nn.Conv2d(3, 8, 4, stride=2, padding=1)
    assert tuple(matrix_view(conv4).shape) == (8, 48)
    linear = nn.Linear(11, 6)
    assert tuple(matrix_view(linear).shape) == (6, 11)
    assert torch.equal(matrix_view(linear), linear.weight)


@pytest.fixture(scope="module")
def net_6c2f():
    torch.manual_seed(0)
    return CertifiableNet("6C2F")


def test_6c2f_upper_bounds_against_power_iteration(net_6c2f):
    for layer in net_6c2f.weight_layers():
        estimate, _ = power_iteration(layer, 300, generator=torch.Generator().manual_seed(0))
        bound = operator_norm_upper_bound(layer)
        assert bound >= estimate, (layer.name, bound, estimate)
        assert bound <= estimate * 1.02, (layer.name, bound, estimate)


def test_float32_power_iteration_never_exceeds_the_true_norm():
    over = []
    for seed in range(20):
        torch.manual_seed(seed)
        layer = WeightLayer(0, nn.Linear(512, 10), (512,), (10,), None, False)
        estimate, _ = power_iteration(layer, 300, generator=torch.Generator().manual_seed(seed))
        exact = torch.linalg.matrix_norm(layer.module.weight.detach().double(), ord=2).item()
        if estimate > operator_norm_upper_bound(layer) or estimate > exact:
            over.append((seed, estimate, exact))
    assert not over, over


# ---------------------------------------------------------------- SVD export
def smoke_params(ranks=(1, 4, 8), power_iterations=40) -> dict:
    params = load_params("smoke")
    params["svd"]["ranks"] = list(ranks)
    params["svd"]["power_iterations"] = power_iterations
    return params


def save_vanilla(params: dict, root, model_params: dict | None = None, seed: int = 0):
    model_params = dict(params["model"] if model_params is None else model_params)
    torch.manual_seed(seed)
    model = build_model(model_params)
    path = root / RunLayout.of(params).vanilla_model
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "model": model_params, "data_sha256": "x"}, path)
    return model, path


@pytest.fixture(scope="module")
def svd_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd")
    params = smoke_params()
    model, model_path = save_vanilla(params, root)
    summary = export_svd(params, root, check_guide)
    layout = RunLayout.of(params)
    factors = load_factors(root / layout.svd_factors)
    return {"root": root, "params": params, "model": model.eval(), "model_path": model_path,
            "summary": summary, "factors": factors, "layout": layout}


def test_svd_outputs_written(svd_export):
    root, layout = svd_export["root"], svd_export["layout"]
    assert (root / layout.svd_factors).is_file() and (root / layout.svd_summary).is_file()
    on_disk = json.loads((root / layout.svd_summary).read_text())
    assert on_disk == json.loads(json.dumps(svd_export["summary"]))
    assert sorted(p.name for p in (root / layout.svd_factors).parent.iterdir()) == \
        ["factors.pt", "summary.json"]


def test_svd_layers_match_the_model(svd_export):
    layers = svd_export["factors"]["layers"]
    weight_layers = svd_export["model"].weight_layers()
    assert len(layers) == len(weight_layers) == 8
    for entry, layer in zip(layers, weight_layers):
        assert entry["index"] == layer.index and entry["kind"] == layer.kind
        assert entry["name"] == layer.name
        assert tuple(entry["input_shape"]) == layer.input_shape
        assert tuple(entry["output_shape"]) == layer.output_shape
        assert tuple(entry["matrix_shape"]) == tuple(matrix_view(layer.module).shape)


def test_svd_factors_reconstruct_the_weights(svd_export):
    for entry, layer in zip(svd_export["factors"]["layers"], svd_export["model"].weight_layers()):
        w = matrix_view(layer.module).detach()
        u, s, v = entry["U"], entry["S"], entry["V"]
        k = min(w.shape)
        assert tuple(u.shape) == (w.shape[0], k) and tuple(s.shape) == (k,)
        assert tuple(v.shape) == (w.shape[1], k)
        torch.testing.assert_close(u @ torch.diag(s) @ v.t(), w, atol=1e-4, rtol=0)
        eye = torch.eye(k)
        torch.testing.assert_close(u.t() @ u, eye, atol=1e-4, rtol=0)
        torch.testing.assert_close(v.t() @ v, eye, atol=1e-4, rtol=0)
        assert (s[:-1] >= s[1:]).all() and (s >= 0).all(), entry["name"]
        torch.testing.assert_close(s.double(), torch.linalg.svdvals(w.double()).float().double(),
                                   rtol=1e-5, atol=1e-6)


def test_svd_top_r_factors(svd_export):
    for entry, layer in zip(svd_export["factors"]["layers"], svd_export["model"].weight_layers()):
        w = matrix_view(layer.module).detach().double()
        assert sorted(entry["top"]) == [1, 4, 8]
        svals = torch.linalg.svdvals(w)
        for r, top in entry["top"].items():
            assert torch.equal(top["U"], entry["U"][:, :r])
            assert torch.equal(top["S"], entry["S"][:r])
            assert torch.equal(top["V"], entry["V"][:, :r])
            approx = top["U"].double() @ torch.diag(top["S"].double()) @ top["V"].double().t()
            err2 = (w - approx).pow(2).sum().item()
            # Eckart-Young: the best rank-r approximation leaves the remaining energy
            assert err2 == pytest.approx((entry["S"][r:].double() ** 2).sum().item(), rel=1e-3, abs=1e-6)
            assert err2 == pytest.approx((svals[r:] ** 2).sum().item(), rel=1e-3, abs=1e-6)


def test_svd_summary(svd_export):
    summary, factors = svd_export["summary"], svd_export["factors"]
    assert summary["arch"] == "6C2F" and summary["profile"] == "smoke"
    assert summary["ranks"] == [1, 4, 8]
    for row, entry in zip(summary["layers"], factors["layers"]):
        s = entry["S"].double()
        assert row["sigma_max"] == pytest.approx(s[0].item(), rel=1e-6)
        assert row["sigma_min"] == pytest.approx(s[-1].item(), rel=1e-5, abs=1e-7)
        energies = [row["energy_top_r"][str(r)] for r in (1, 4, 8)]
        assert all(0 <= e <= 1 for e in energies) and energies == sorted(energies)
        assert energies[0] < energies[-1]
        for r, e in zip((1, 4, 8), energies):
            assert e == pytest.approx((s[:r] ** 2).sum().item() / (s ** 2).sum().item(), rel=1e-5)
        assert row["operator_norm_upper_bound"] >= row["operator_norm_estimate"]
        assert row["operator_norm_upper_bound"] == entry["operator_norm_upper_bound"]
        assert row["operator_norm_estimate"] == entry["operator_norm_estimate"]
        assert row["upper_bound_over_estimate"] == pytest.approx(
            row["operator_norm_upper_bound"] / row["operator_norm_estimate"])
        if row["kind"] == "linear":  # dense layers: the bound is sigma_max itself
            assert row["operator_norm_upper_bound"] == pytest.approx(row["sigma_max"], rel=1e-6)
    uppers = [row["operator_norm_upper_bound"] for row in summary["layers"]]
    estimates = [row["operator_norm_estimate"] for row in summary["layers"]]
    assert summary["lipschitz_upper_bound"] == pytest.approx(math.prod(uppers), rel=1e-12)
    assert summary["lipschitz_estimate"] == pytest.approx(math.prod(estimates), rel=1e-12)
    meta = factors["metadata"]
    assert {k: v for k, v in summary.items() if k not in ("profile", "layers")} == meta


def test_svd_metadata_names_the_vanilla_weights(svd_export, tmp_path):
    saved = torch.load(svd_export["model_path"], map_location="cpu", weights_only=False)
    digest = state_dict_sha256(saved["state_dict"])
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert svd_export["summary"]["vanilla_weights_sha256"] == digest
    assert svd_export["factors"]["metadata"]["vanilla_weights_sha256"] == digest
    assert digest == state_dict_sha256(svd_export["model"].state_dict())
    # a hash of the weights: another file with the same weights has it too, other weights do not
    copy = tmp_path / "copy.pt"
    torch.save({"state_dict": saved["state_dict"], "model": saved["model"], "data_sha256": "y"}, copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() != hashlib.sha256(
        svd_export["model_path"].read_bytes()).hexdigest()
    assert state_dict_sha256(torch.load(copy, weights_only=False)["state_dict"]) == digest
    changed = {k: v.clone() for k, v in saved["state_dict"].items()}
    changed["body.0.bias"][0] += 1e-3
    assert state_dict_sha256(changed) != digest


def test_svd_ranks_beyond_a_layer_keep_all(tmp_path, capsys):
    params = smoke_params(ranks=(40, 1), power_iterations=2)
    save_vanilla(params, tmp_path, seed=1)
    summary = export_svd(params, tmp_path, check_guide)
    assert summary["ranks"] == [1, 40]
    factors = load_factors(tmp_path / RunLayout.of(params).svd_factors)
    last = factors["layers"][-1]  # 512 -> 10: 10 singular values
    assert tuple(last["top"][40]["U"].shape) == (10, 10)
    assert summary["layers"][-1]["energy_top_r"]["40"] == pytest.approx(1.0)
    assert "exceeds" in capsys.readouterr().out


def test_svd_rejects_another_arch(tmp_path):
    params = smoke_params()
    other = dict(params["model"], arch="4C3F")
    _, path = save_vanilla(params, tmp_path, model_params=other)
    with pytest.raises(ValueError, match="4C3F") as info:
        export_svd(params, tmp_path, check_guide)
    assert str(path) in str(info.value) and "6C2F" in str(info.value)
    assert not (tmp_path / RunLayout.of(params).svd_summary).exists()
    assert not (tmp_path / RunLayout.of(params).svd_factors).exists()
