"""``low-rank``: full rank reproduces, rank selection, activation-aware SVD, recovery."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from compression_graphs import chain_model, load, mixed_model, run

from onnxopt import registry
from onnxopt.calibration import Dataset
from onnxopt.compression import factorize, solve_low_rank_ridge
from onnxopt.errors import PassOptionError
from onnxopt.filters import NodeFilter
from onnxopt.passes.low_rank import allocate_ranks


def low_rank(model, data=None, **options):
    pass_ = registry.get("low-rank").create({k: str(v) for k, v in options.items()}, data=data)
    pass_(model)
    return pass_


def test_full_rank_and_exact_rank_reproduce_outputs(tmp_path):
    path, feeds = mixed_model(tmp_path, k=32, hidden=48, n=24)
    model = load(path)
    expected = run(model, feeds)[0]
    details = low_rank(model, energy=1.0, min_elements=1).details
    assert all("kept dense" in details["layers"][name] for name in ("fc1", "fc2", "shared_a", "sub_matmul"))
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-6, atol=1e-6)
    # Gemm (transB, alpha=0.5, beta=2, bias) with an exactly rank-8 weight: factorized without error
    model = load(path)
    rng = np.random.default_rng(1)
    fc2_weight = model.graph.initializers["w2"]
    fc2_weight.const_value = ir.tensor((rng.standard_normal((48, 8)) @ rng.standard_normal((8, 48)) / 8).astype(np.float32))
    expected = run(model, feeds)[0]
    details = low_rank(model, rank=8, min_elements=1).details
    nodes = {n.name: n for n in model.graph}
    assert nodes["fc2"].op_type == "Gemm" and nodes["fc2"].inputs[0] is nodes["fc2.lowrank_u"].outputs[0]
    assert {"fc1", "shared_a", "shared_b", "sub_matmul", "else_matmul"} <= {
        name for name, v in details["layers"].items() if v.startswith("rank 8")
    }
    assert not any(n.op_type == "Constant" for n in model.graph)
    got = run(model, feeds)[0]
    assert got.shape == expected.shape
    fc2_only = load(path)
    fc2_only.graph.initializers["w2"].const_value = fc2_weight.const_value
    expected = run(fc2_only, feeds)[0]
    pass_ = registry.get("low-rank").create({"rank": "8", "min_elements": "1"}, node_filter=NodeFilter(name_regex="^fc2$"))
    pass_(fc2_only)
    np.testing.assert_allclose(run(fc2_only, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_exact_low_rank_weight_is_reproduced(tmp_path):
    path = chain_model(tmp_path, (64, 96, 10), name="lr")
    model = load(path)
    rng = np.random.default_rng(7)
    w = model.graph.initializers["w0"]
    true = (rng.standard_normal((64, 8)) @ rng.standard_normal((8, 96)) / 8).astype(np.float32)
    w.const_value = ir.tensor(true, name="w0")
    feeds = {"x": rng.standard_normal((16, 64)).astype(np.float32)}
    expected = run(model, feeds)[0]
    details = low_rank(model, energy=0.999999, min_elements=1).details
    assert details["layers"]["fc0"].startswith("rank 8 of 64")
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-4, atol=1e-4)


def test_ratio_sets_parameter_budget(tmp_path):
    path = chain_model(tmp_path, (128, 256, 10), name="ratio")
    model = load(path)
    details = low_rank(model, ratio=0.25, min_elements=1).details
    assert details["layers"]["fc0"].startswith(f"rank {int(0.25 * 128 * 256 / 384)} of 128")


def test_activation_aware_beats_plain_svd_on_output_error():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((500, 40)) * np.geomspace(10, 0.01, 40)  # anisotropic inputs
    w = rng.standard_normal((40, 30))
    h = x.T @ x
    chol = np.linalg.cholesky(h / 500 + 1e-6 * np.eye(40))
    errors = {}
    for name, c in (("plain", None), ("aware", chol)):
        u, v, _ = factorize(w, 5, c)
        errors[name] = np.linalg.norm(x @ (w - u @ v))
    assert errors["aware"] < 0.6 * errors["plain"]


def test_recover_reduces_layer_error(tmp_path):
    path = chain_model(tmp_path, (48, 128, 128, 10), name="rec")
    rng = np.random.default_rng(9)
    data = Dataset.from_arrays({"x": rng.standard_normal((1024, 48)).astype(np.float32)})
    model = load(path)
    details = low_rank(model, data, ratio=0.3, activation_aware=True, recover=True, min_elements=1, samples=1024).details
    assert {"fc0", "fc1"} <= set(details["recover"])
    for layer in details["recover"].values():
        assert layer["error_after"] <= layer["error_before"]
    fc1 = details["recover"]["fc1"]
    assert fc1["error_after"] < fc1["error_before"]
    assert fc1["ridge"] is not None and fc1["held_out_after"] < fc1["held_out_before"]  # chosen on unseen rows


def test_bad_options():
    for options in ({"ratio": "0"}, {"rank": "0"}, {"energy": "2"}):
        with pytest.raises(PassOptionError):
            registry.get("low-rank").create(options)


def test_global_allocation_keeps_budget_and_favors_slow_spectra():
    flat = np.ones(64)  # every rank equally useful
    steep = np.r_[np.ones(3), np.full(61, 1e-3)]  # three ranks hold all the energy
    ranks = allocate_ranks([((64, 64), flat), ((64, 64), steep)], 0.25)
    assert sum(r * 128 for r in ranks) <= 0.25 * 2 * 64 * 64
    assert ranks == [13, 3]  # uniform would give both 0.25·64·64/128 = 8
    with pytest.raises(PassOptionError):
        registry.get("low-rank").create({"allocation": "global", "rank": "4"})


def test_global_allocation_runs_on_a_model(tmp_path):
    path, feeds = mixed_model(tmp_path, k=32, hidden=48, n=24)
    model = load(path)
    details = low_rank(model, ratio=0.3, allocation="global", min_elements=1).details
    assert any(v.startswith("rank") for v in details["layers"].values())
    assert run(model, feeds)[0].shape == (64, 24)


def _rank_r_least_squares(x, y, rank):
    """Independent reference: with X = QR, ‖XW − Y‖² = ‖RW − QᵀY‖² + const, so W = R⁻¹ (QᵀY)_r."""
    q, r = np.linalg.qr(x)
    left, sigma, right = np.linalg.svd(q.T @ y, full_matrices=False)
    return np.linalg.solve(r, (left[:, :rank] * sigma[:rank]) @ right[:rank])


def test_ridge_recovery_limits_and_optimality():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((400, 20)) * np.geomspace(3, 0.3, 20)
    y = x @ rng.standard_normal((20, 12)) + 0.1 * rng.standard_normal((400, 12))
    prior_u, prior_v, _ = factorize(rng.standard_normal((20, 12)), 4)
    prior = prior_u @ prior_v
    xtx, xty = x.T @ x, x.T @ y
    u, v = solve_low_rank_ridge(xtx, xty, 400, 4, prior, 1e-10)
    np.testing.assert_allclose(u @ v, _rank_r_least_squares(x, y, 4), rtol=1e-6, atol=1e-7)
    u, v = solve_low_rank_ridge(xtx, xty, 400, 4, prior, 1e8)
    np.testing.assert_allclose(u @ v, prior, rtol=1e-5, atol=1e-6)
    strength = 0.5
    lam = strength * np.mean(np.diag(xtx)) / 400

    def objective(w):
        return np.sum((x @ w - y) ** 2) / 400 + lam * np.sum((w - prior) ** 2)

    u, v = solve_low_rank_ridge(xtx, xty, 400, 4, prior, strength)
    best = objective(u @ v)
    assert np.linalg.matrix_rank(u @ v) == 4
    for other in (prior, _rank_r_least_squares(x, y, 4), (u + 0.01 * rng.standard_normal(u.shape)) @ v):
        assert best < objective(other)
