"""``recover`` and ``recover=true``: least-squares optimum, error always reduced, reference by path."""

from __future__ import annotations

import numpy as np
import pytest
from compression_graphs import chain_model, conv_model, load, run

from onnxopt import io, registry
from onnxopt.calibration import Dataset
from onnxopt.compression import solve_masked
from onnxopt.errors import DataError, PassOptionError
from onnxopt.weights import scan_weights


def make(name, data=None, **options):
    return registry.get(name).create({k: str(v) for k, v in options.items()}, data=data)


def weight(model, name):
    return next(u for u in scan_weights(model, ("MatMul", "Gemm", "Conv")).uses if u.node.name == name).matrix()


def test_single_layer_reaches_least_squares_optimum(tmp_path):
    path = chain_model(tmp_path, (24, 16), gemm_last=False, name="single")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((200, 24)) * np.linspace(0.5, 2.0, 24)).astype(np.float32)
    data = Dataset.from_arrays({"x": x})
    original = load(path)
    w_orig = weight(original, "fc0").astype(np.float64)
    model = load(path)
    pass_ = make("prune", data, sparsity=0.6, recover=True, sparse_op=False, min_elements=1, samples=200)
    pass_(model)
    w = weight(model, "fc0")
    target = x.astype(np.float64) @ w_orig
    for col in range(w.shape[1]):
        kept = np.flatnonzero(w[:, col])
        expected, *_ = np.linalg.lstsq(x[:, kept].astype(np.float64), target[:, col], rcond=None)
        np.testing.assert_allclose(w[kept, col], expected, rtol=2e-3, atol=2e-4)
    layer = pass_.details["recover"]["fc0"]
    assert layer["applied"] and layer["error_after"] < layer["error_before"]


def test_solve_masked_matches_lstsq():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((300, 20)), rng.standard_normal((300, 6))
    mask = rng.random((20, 6)) > 0.5
    w = solve_masked(x.T @ x, x.T @ y, 300, mask, damping=0.0)
    assert not w[~mask].any()
    for col in range(6):
        expected, *_ = np.linalg.lstsq(x[:, mask[:, col]], y[:, col], rcond=None)
        np.testing.assert_allclose(w[mask[:, col], col], expected, rtol=1e-8, atol=1e-10)


def test_standalone_recover_reduces_every_layer_error(tmp_path):
    path = chain_model(tmp_path, (24, 64, 64, 16))
    rng = np.random.default_rng(5)
    data = Dataset.from_arrays({"x": rng.standard_normal((256, 24)).astype(np.float32)})
    model = load(path)
    make("prune", sparsity=0.8, sparse_op=False, min_elements=1)(model)
    pruned = {name: weight(model, name) != 0 for name in ("fc0", "fc1", "fc2")}
    pruned_path = io.save(model, tmp_path / "pruned.onnx")
    feeds = {"x": rng.standard_normal((64, 24)).astype(np.float32)}
    expected = run(load(path), feeds)[0]
    error_pruned = np.abs(run(model, feeds)[0] - expected).mean()
    recovered = load(pruned_path)
    pass_ = make("recover", data, reference=str(path))
    pass_(recovered)
    layers = pass_.details["layers"]
    assert set(layers) == {"fc0", "fc1", "fc2"}
    for name, layer in layers.items():
        assert layer["error_after"] < layer["error_before"], name
        np.testing.assert_array_equal(weight(recovered, name) != 0, pruned[name])  # mask kept
    assert np.abs(run(recovered, feeds)[0] - expected).mean() < 0.9 * error_pruned


def test_conv_layers_recover(tmp_path):
    path, feeds = conv_model(tmp_path)
    data = Dataset.from_arrays({"x": np.random.default_rng(6).standard_normal((32, 3, 12, 12)).astype(np.float32)})
    model = load(path)
    pass_ = make("prune", data, sparsity=0.7, recover=True, sparse_op=False, min_elements=1)
    pass_(model)
    layers = pass_.details["recover"]
    assert {"conv1", "conv2", "fc"} <= set(layers)
    assert all(layer["error_after"] < layer["error_before"] for layer in layers.values())
    assert run(model, feeds)[0].shape == (16, 10)


def test_recover_needs_data_and_reference(tmp_path):
    path = chain_model(tmp_path, (8, 8))
    with pytest.raises(DataError):
        make("recover", reference=str(path))(load(path))
    with pytest.raises(PassOptionError):
        registry.get("recover").create({})
