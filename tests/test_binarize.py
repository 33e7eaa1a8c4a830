"""``binarize``: BinaryMatMul/XnorMatMul lowering, first/last kept, α = mean|W|, recovery."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import assert_names_unique, chain_model, load, mixed_model, run, subgraph_model

from onnxopt import io, ops, registry
from onnxopt.calibration import Dataset
from onnxopt.compression import packed_from_node
from onnxopt.errors import DataError, RuntimeLibraryError
from onnxopt.passes.recover import recover_layers
from onnxopt.weights import WeightUse, scan_weights


def binarize(model, data=None, **options):
    pass_ = registry.get("binarize").create({k: str(v) for k, v in options.items()}, data=data)
    pass_(model)
    return pass_


def run_or_skip(model, feeds):
    try:
        return run(model, feeds)
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")


@pytest.mark.parametrize("mode,op_type", [("weights", "BinaryMatMul"), ("xnor", "XnorMatMul")])
def test_middle_layers_binarized_with_mean_abs_alpha(tmp_path, mode, op_type):
    path = chain_model(tmp_path, (32, 64, 64, 64, 10))
    original = load(path)
    weights = {u.node.name: u.matrix() for u in scan_weights(original).uses}
    model = load(path)
    details = binarize(model, mode=mode, min_elements=1).details
    nodes = {n.name: n for n in model.graph}
    assert nodes["fc0"].op_type == "MatMul" and nodes["fc3"].op_type == "Gemm"  # first and last kept
    assert "first or last" in details["layers"]["fc0"]
    for name in ("fc1", "fc2"):
        assert nodes[name].op_type == op_type and nodes[name].domain == ops.DOMAIN
        packed = packed_from_node(nodes[name])
        w = weights[name]
        np.testing.assert_allclose(packed.inputs["alpha"], np.abs(w).mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(ops.dense_weight(packed), np.where(w >= 0, 1, -1) * np.abs(w).mean(axis=0), rtol=1e-6)
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(model)))
    feeds = {"x": np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)}
    assert run_or_skip(model, feeds)[0].shape == (8, 10)


def test_gemm_alpha_beta_bias_and_subgraph(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = load(path)
    details = binarize(model, keep_first_last=False, min_elements=1).details
    nodes = {n.name: n for n in model.graph}
    assert nodes["fc2"].op_type == "BinaryMatMul"
    assert "weight shared" in details["layers"]["shared_a"]
    sub = next(n for n in model.graph.subgraphs() for n in n if n.name == "sub_matmul")
    assert sub.op_type == "BinaryMatMul"
    # Gemm alpha=0.5 folds into α, beta=2 into the bias
    packed = packed_from_node(nodes["fc2"])
    w = load(path).graph.initializers["w2"].const_value.numpy().T * 0.5
    np.testing.assert_allclose(packed.inputs["alpha"], np.abs(w).mean(axis=0), rtol=1e-6)
    b = load(path).graph.initializers["b2"].const_value.numpy() * 2
    np.testing.assert_allclose(nodes["fc2"].inputs[-1].const_value.numpy(), b, rtol=1e-6)
    assert run_or_skip(model, feeds)[0].shape == (64, 24)


def test_binary_model_matches_dense_equivalent(tmp_path):
    path = chain_model(tmp_path, (40, 72, 72, 10))
    model = load(path)
    binarize(model, min_elements=1)
    dense = load(path)
    for use in scan_weights(dense).uses:
        node = next(n for n in model.graph if n.name == use.node.name)
        if node.domain == ops.DOMAIN:
            use.value.const_value = ir.tensor(use.from_matrix(ops.dense_weight(packed_from_node(node))))
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 40)).astype(np.float32)}
    np.testing.assert_allclose(run_or_skip(model, feeds)[0], run(dense, feeds)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_layer_named_like_a_main_layer(tmp_path, kind):
    """A subgraph MatMul named fc1 (own weight) is binarized besides the main fc1, each with its own weight;
    reading the main fc1's weight instead, both are kept (shared weight)."""
    path, _, feeds = subgraph_model(tmp_path, kind, layer="fc1")
    model = load(path)
    binarize(model)
    dense = load(path)
    nodes = zip(ir.traversal.RecursiveGraphIterator(dense.graph), ir.traversal.RecursiveGraphIterator(model.graph))
    binary = [(d, b) for d, b in nodes if b.name == "fc1"]
    assert [b.op_type for _, b in binary] == ["BinaryMatMul"] * 2 and binary[0][1].graph is not binary[1][1].graph
    assert_names_unique(model)  # both packed fc1.alpha / fc1.bits existed once per graph
    for original, node in binary:
        use = WeightUse(original, 1)
        use.value.const_value = ir.tensor(use.from_matrix(ops.dense_weight(packed_from_node(node))))
    np.testing.assert_allclose(run_or_skip(model, feeds)[0], run(dense, feeds)[0], rtol=1e-4, atol=1e-4)

    path, _, feeds = subgraph_model(tmp_path, kind, layer="fc1", shared=True)
    model = load(path)
    details = binarize(model).details
    assert details["layers"]["fc1"] == "kept (weight shared by several nodes)"
    assert [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == "fc1"] == ["MatMul"] * 2
    np.testing.assert_array_equal(run(model, feeds)[0], run(load(path), feeds)[0])


@pytest.mark.parametrize("mode", ["weights", "xnor"])
def test_recover_reduces_error(tmp_path, mode):
    path = chain_model(tmp_path, (32, 96, 96, 96, 10))
    data = Dataset.from_arrays({"x": np.random.default_rng(2).standard_normal((128, 32)).astype(np.float32)})
    model = load(path)
    with pytest.raises(DataError):
        binarize(model, mode=mode, recover=True)
    try:
        details = binarize(model, data, mode=mode, recover=True, min_elements=1).details
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")
    assert set(details["recover"]) == {"fc1", "fc2"}
    for layer in details["recover"].values():
        assert layer["kind"] == "binary" and layer["error_after"] < layer["error_before"]
    nodes = {n.name: n for n in model.graph}
    assert nodes["fc1"].inputs[-1].name.endswith("bias_recovered")
    assert not [name for name, value in model.graph.initializers.items() if not value.uses()]  # replaced α, bias dropped


def test_recovered_alpha_stays_within_trust_range(tmp_path):
    """fc1's weights are exactly ±c per column, so least squares recovers α = c; started from α = 4c the
    re-fit stops at the range's edge 2c, started from 1.5c it reaches c."""
    original = load(chain_model(tmp_path, (32, 96, 96, 96, 10)))
    weight = next(u for u in scan_weights(original, ("MatMul",)).uses if u.node.name == "fc1").value
    c = np.linspace(0.05, 0.2, 96).astype(np.float32)
    weight.const_value = ir.tensor(np.sign(weight.const_value.numpy()) * c)
    compressed = original.clone()
    binarize(compressed, min_elements=1)
    node = next(n for n in compressed.graph if n.name == "fc1")
    packed = packed_from_node(node)
    np.testing.assert_allclose(packed.inputs["alpha"], c, rtol=1e-5)
    start = np.where(np.arange(96) % 2 == 0, 4 * c, 1.5 * c).astype(np.float32)
    node.inputs[1 + list(packed.inputs).index("alpha")].const_value = ir.tensor(start)
    data = Dataset.from_arrays({"x": np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)})
    try:
        report = recover_layers(original, compressed, data, {"fc1"})["fc1"]
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")
    assert report["applied"] and report["error_after"] < report["error_before"]
    alpha = packed_from_node(node).inputs["alpha"]
    np.testing.assert_allclose(alpha[0::2], 2 * c[0::2], rtol=1e-5)
    np.testing.assert_allclose(alpha[1::2], c[1::2], rtol=1e-4)
