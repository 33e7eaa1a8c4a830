"""``prune``: masks, sparse initializers, SparseMatMul lowering, shared/Constant/subgraph weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import ELSE_MATMUL, SUB_MATMUL, chain_model, conv_model, load, mixed_model, run, subgraph_model, tied_model

from onnxopt import io, ops, registry
from onnxopt.calibration import Dataset
from onnxopt.compression import keep_mask, nm_mask, packed_from_node
from onnxopt.errors import DataError, PassOptionError, RuntimeLibraryError
from onnxopt.passes.prune import sparse_break_even
from onnxopt.weights import constant_array, scan_weights


def prune(model, data=None, **options):
    pass_ = registry.get("prune").create({k: str(v) for k, v in options.items()}, data=data)
    pass_(model)
    return pass_


def assert_runs_like(lowered, dense, feeds, atol=1e-5):
    """Every output of the lowered model (onnxopt kernels) matches the dense pruned one's; skips when the
    kernel library is not built."""
    try:
        got = run(lowered, feeds)
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")
    for a, b in zip(got, run(dense, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


def weights_by_node(model):
    return {u.node.name: u.matrix() for u in scan_weights(model, ("MatMul", "Gemm", "Conv")).uses}


def test_zero_sparsity_reproduces_outputs(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = load(path)
    expected = run(model, feeds)
    prune(model, sparsity=0.0, sparse_op=False, min_elements=1)
    np.testing.assert_allclose(run(model, feeds)[0], expected[0], rtol=1e-6, atol=1e-6)


def test_constant_shared_and_subgraph_weights(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = io.load(path, lift_constants=False)  # fc1's weight stays a Constant node
    details = prune(model, sparsity=0.75, sparse_op=False, min_elements=1).details
    assert set(details["layers"]) == {"fc1", "fc2", "shared_a", "shared_b", SUB_MATMUL, ELSE_MATMUL}
    for name, w in weights_by_node(model).items():
        assert abs(np.mean(w == 0) - 0.75) < 0.01, name
    shared = [n for n in model.graph if n.name in ("shared_a", "shared_b")]
    assert shared[0].inputs[1] is shared[1].inputs[1], "a shared weight must stay one tensor"
    assert not any(n.op_type == "Constant" for n in model.graph), "the old Constant weight must be dropped"
    assert run(model, feeds)[0].shape == (64, 24)


def test_masks():
    scores = np.arange(24, dtype=float).reshape(8, 3)[::-1]
    mask = nm_mask(scores, 2, 4)
    assert mask.reshape(2, 4, 3).sum(axis=1).tolist() == [[2, 2, 2], [2, 2, 2]]
    assert mask[:2].all() and not mask[2:4].any()
    per_column = keep_mask(np.random.default_rng(0).random((10, 5)), 0.6, per_column=True)
    assert per_column.sum(axis=0).tolist() == [4] * 5


def test_nm_and_global_scope(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = load(path)
    prune(model, pattern="2:4", sparse_op=False, min_elements=1)
    for w in weights_by_node(model).values():
        groups = (w != 0).reshape(-1, 4, w.shape[1]).sum(axis=1)
        assert groups.max() <= 2
    model = load(path)
    prune(model, sparsity=0.8, scope="global", sparse_op=False, min_elements=1)
    weights = weights_by_node(model)
    unique = {id(w): w for w in weights.values()}  # shared and If-branch weights once
    total = sum(w.size for name, w in weights.items() if name != "shared_b")
    zeros = sum(np.sum(w == 0) for name, w in weights.items() if name != "shared_b")
    assert unique and abs(zeros / total - 0.8) < 0.01


def test_global_scope_prunes_exactly_with_tied_scores(tmp_path):
    """All magnitudes equal (±0.5): a threshold would prune everything; the ranking prunes exactly 10 %,
    spread over both layers."""
    path = chain_model(tmp_path, (32, 32, 32), gemm_last=False, name="ties")
    model = load(path)
    signs = np.where(np.random.default_rng(4).random((32, 32)) > 0.5, 0.5, -0.5).astype(np.float32)
    for name in ("w0", "w1"):
        model.graph.initializers[name].const_value = ir.tensor(signs, name=name)
    prune(model, sparsity=0.1, scope="global", sparse_op=False, min_elements=1)
    zeros = [float(np.mean(w == 0)) for w in weights_by_node(model).values()]
    assert np.sum(zeros) * 32 * 32 == round(0.1 * 2 * 32 * 32)
    assert all(0.05 < z < 0.15 for z in zeros)


def test_weight_also_read_by_an_embedding_is_kept(tmp_path):
    """A tied embedding (Gather and lm_head Gemm reading one weight): pruning a copy for the Gemm would
    leave the dense weight for the Gather and grow the file."""
    path = tied_model(tmp_path)
    model = load(path)
    details = prune(model, sparsity=0.5, min_elements=1).details
    assert details["layers"]["lm_head"] == "kept (weight also read by Gather 'emb')"
    assert list(model.graph.initializers) == ["E"]


def test_nm_32_lowers_to_sparse_matmul(tmp_path):
    """3:32 (the pattern SparseMatMul's batch-1 panels pack without padding) on K not a multiple of 32."""
    path = chain_model(tmp_path, (70, 96, 40))
    dense, lowered = load(path), load(path)
    prune(dense, pattern="3:32", sparse_op=False, min_elements=1)
    prune(lowered, pattern="3:32", min_elements=1, min_sparse_ratio=0.5)
    w = weights_by_node(dense)["fc0"]
    counts = (w != 0)[:64].reshape(2, 32, -1).sum(axis=1)
    assert counts.max() == 3 and np.count_nonzero(w[64:], axis=0).max() == 1  # last 6 rows: ceil(3 * 6 / 32)
    assert [n.op_type for n in lowered.graph if n.name in ("fc0", "fc1")] == ["SparseMatMul", "SparseMatMul"]
    x = {"x": np.random.default_rng(2).standard_normal((1, 70)).astype(np.float32)}
    assert_runs_like(lowered, dense, x)


def test_relu_after_a_sparse_layer_is_folded(tmp_path):
    """A Relu that alone consumes a SparseConv/SparseMatMul output becomes the op's ``activation`` (the
    graph output name kept); after a layer whose output is also a graph output it stays a Relu."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = {"wc": rng.standard_normal((8, 3, 3, 3)), "w1": rng.standard_normal((512, 64)) / 20, "b1": rng.standard_normal(64),
             "w2": rng.standard_normal((64, 32)) / 8, "b2": rng.standard_normal(32)}
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["rc"]),
        helper.make_node("Flatten", ["rc"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32]),
                               helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["B", 64])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    dense, lowered = load(path), load(path)
    prune(dense, sparsity=0.9, sparse_op=False, min_elements=1)
    details = prune(lowered, sparsity=0.9, min_elements=1, min_sparse_ratio=0.5).details["layers"]
    assert details["conv"].endswith("SparseConv + Relu") and details["fc2"].endswith("SparseMatMul + Relu")
    assert details["fc1"].endswith("SparseMatMul")  # h1 is a graph output: its Relu stays
    ops_by_name = {n.name: n for n in lowered.graph}
    assert [n.op_type for n in lowered.graph].count("Relu") == 1
    assert ops_by_name["conv"].attributes["activation"].value == "relu"
    assert "activation" not in ops_by_name["fc1"].attributes
    assert [v.name for v in lowered.graph.outputs] == ["y", "h1"]
    x = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert_runs_like(lowered, dense, x, atol=1e-4)


def test_sparse_initializers_round_trip(tmp_path):
    path = chain_model(tmp_path, (64, 128, 128, 10))
    model = load(path)
    prune(model, sparsity=0.8, sparse_op=False)
    pruned = weights_by_node(model)
    out = io.save(model, tmp_path / "pruned.onnx")
    proto = onnx.load(out)
    assert {s.values.name for s in proto.graph.sparse_initializer} == {"w0_pruned", "w1_pruned", "w2_pruned"}
    assert out.stat().st_size < 0.7 * path.stat().st_size
    reloaded = io.load(out)
    for name, w in weights_by_node(reloaded).items():
        np.testing.assert_array_equal(w, pruned[name])
    x = {"x": np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)}
    np.testing.assert_allclose(run(reloaded, x)[0], run(model, x)[0], rtol=1e-6)


def test_sparse_initializers_inside_subgraphs_round_trip(tmp_path):
    """Pruned weights of If branches are written as their branch's sparse_initializer and read back."""
    path, feeds = mixed_model(tmp_path)
    model = load(path)
    prune(model, sparsity=0.9, sparse_op=False, min_elements=1)
    out = io.save(model, tmp_path / "pruned.onnx")
    branches = [a.g for n in onnx.load(out).graph.node if n.op_type == "If" for a in n.attribute]
    assert [len(g.sparse_initializer) for g in branches] == [1, 1] and not any(g.initializer for g in branches)
    reloaded = io.load(out)
    assert weights_by_node(reloaded)["sub_matmul"].tolist() == weights_by_node(model)["sub_matmul"].tolist()
    for cond in (True, False):
        feeds = {**feeds, "cond": np.array(cond)}
        np.testing.assert_allclose(run(reloaded, feeds)[0], run(model, feeds)[0], rtol=1e-6)
    assert len(io.to_bytes(reloaded)) < len(io.to_bytes(load(path)))  # still sparse when written again


def test_sparse_matmul_lowering_matches_dense(tmp_path):
    path, feeds = mixed_model(tmp_path)
    dense = load(path)
    prune(dense, sparsity=0.9, sparse_op=False, min_elements=1)
    lowered = load(path)
    details = prune(lowered, sparsity=0.9, min_elements=1, min_sparse_ratio=0.6).details
    ops_by_name = {n.name: n for n in lowered.graph}
    assert ops_by_name["fc1"].op_type == "SparseMatMul" and ops_by_name["fc2"].op_type == "SparseMatMul"
    assert "weight shared" in details["layers"]["shared_a"]
    assert lowered.opset_imports[ops.DOMAIN] == 1
    # fc2 is a Gemm with transB, alpha=0.5 and beta=2: packed weight and bias must include them
    fc2 = ops_by_name["fc2"]
    dense_fc2 = next(n for n in dense.graph if n.name == "fc2")
    w = weights_by_node(dense)["fc2"] * 0.5
    np.testing.assert_allclose(ops.dense_weight(packed_from_node(fc2)), w, rtol=1e-6)
    bias = fc2.inputs[-1].const_value.numpy()
    np.testing.assert_allclose(bias, dense_fc2.inputs[2].const_value.numpy() * 2.0, rtol=1e-6)
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(lowered)))
    assert_runs_like(lowered, dense, feeds)


def test_maxpool_after_a_sparse_conv_is_folded(tmp_path):
    """A MaxPool that alone consumes a SparseConv output (after or before its Relu) becomes the op's
    ``maxpool_*`` attributes; MaxPools with pads or ceil_mode, whose Indices are read, or after a conv
    output that is also a graph output stay MaxPools. Outputs equal the dense pruned model's."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    convs = {"a": {"kernel_shape": [2, 2]}, "b": {"kernel_shape": [3, 2], "strides": [1, 2]},
             "c": {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1]}, "d": {"kernel_shape": [2, 2], "ceil_mode": 1},
             "e": {"kernel_shape": [2, 2]}, "f": {"kernel_shape": [2, 2]}}
    nodes, outputs, inits = [], [], []
    for name, pool in convs.items():
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), f"w{name}"))
        nodes.append(helper.make_node("Conv", ["x", f"w{name}"], [f"c{name}"], name=f"conv_{name}", pads=[1, 1, 1, 1]))
        pooled = [f"p{name}", *([f"i{name}"] if name == "e" else [])]
        if name == "b":  # MaxPool first, then Relu
            nodes += [helper.make_node("MaxPool", [f"c{name}"], pooled, **pool), helper.make_node("Relu", [f"p{name}"], [f"y{name}"])]
        else:
            nodes += [helper.make_node("Relu", [f"c{name}"], [f"r{name}"]), helper.make_node("MaxPool", [f"r{name}"], pooled, **pool),
                      helper.make_node("Identity", [f"p{name}"], [f"y{name}"])]
        outputs += [f"y{name}", *([f"i{name}"] if name == "e" else []), *([f"c{name}"] if name == "f" else [])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 9, 8])],
                              [helper.make_tensor_value_info(o, TensorProto.INT64 if o[0] == "i" else TensorProto.FLOAT, ["B", 8, None, None])
                               for o in outputs], inits)
    path = tmp_path / "pool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    dense, lowered = load(path), load(path)
    prune(dense, sparsity=0.9, sparse_op=False, min_elements=1)
    details = prune(lowered, sparsity=0.9, min_elements=1, min_sparse_ratio=0.5).details["layers"]
    assert {k: details[f"conv_{k}"].rsplit(", ", 1)[-1] for k in convs} == {
        "a": "SparseConv + Relu + MaxPool", "b": "SparseConv + Relu + MaxPool", "c": "SparseConv + Relu",
        "d": "SparseConv + Relu", "e": "SparseConv + Relu", "f": "SparseConv"}
    by_name = {n.name: n for n in lowered.graph}
    assert by_name["conv_b"].attributes["maxpool_kernel_shape"].value == (3, 2)
    assert by_name["conv_b"].attributes["maxpool_strides"].value == (1, 2)
    assert [n.op_type for n in lowered.graph].count("MaxPool") == 4
    assert [v.name for v in lowered.graph.outputs] == outputs
    saved = io.save(lowered, tmp_path / "lowered.onnx")
    onnx.checker.check_model(str(saved))
    inferred = onnx.shape_inference.infer_shapes(onnx.load(saved), strict_mode=True)  # the op schema's own inference
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    assert shapes[by_name["conv_a"].outputs[0].name] == ["B", 8, 8, 7]  # MaxPool strides default to 1
    x = {"x": rng.standard_normal((2, 3, 9, 8)).astype(np.float32)}
    assert_runs_like(lowered, dense, x, atol=1e-4)


def test_sparse_conv_lowering_matches_dense(tmp_path):
    path, feeds = conv_model(tmp_path)
    dense = load(path)
    prune(dense, sparsity=0.9, sparse_op=False, min_elements=1, op_types="Conv")
    lowered = load(path)
    details = prune(lowered, sparsity=0.9, min_elements=1, op_types="Conv", min_sparse_ratio=0.5).details
    by_name = {n.name: n for n in lowered.graph}
    assert by_name["conv1"].op_type == "SparseConv" and by_name["conv2"].op_type == "SparseConv", details
    assert details["layers"]["conv1"].endswith("SparseConv")
    assert list(by_name["conv1"].attributes["pads"].as_ints()) == [1, 1, 1, 1]
    # conv1 keeps its bias; conv2 has none
    assert len(by_name["conv1"].inputs) == 6 and len(by_name["conv2"].inputs) == 5
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(lowered)), full_check=True)
    assert_runs_like(lowered, dense, feeds)


def test_conv_break_even_and_blockers(tmp_path):
    assert sparse_break_even(144, 32, conv=True) == 0.8  # MNIST conv2: 18 KiB
    assert sparse_break_even(9, 16, conv=True) > 1  # a 1-channel 3x3 conv: never
    assert sparse_break_even(576, 64, conv=True) == 0.75  # 64->64 3x3: 144 KiB
    path, _ = conv_model(tmp_path)
    model = load(path)
    conv1 = next(n for n in model.graph if n.name == "conv1")
    conv1.attributes["auto_pad"] = ir.AttrString("auto_pad", "SAME_UPPER")
    del conv1.attributes["pads"]
    details = prune(model, sparsity=0.9, min_elements=1, op_types="Conv", min_sparse_ratio=0.5).details
    assert details["layers"]["conv1"].endswith("dense (Conv auto_pad=SAME_UPPER)"), details
    assert details["layers"]["conv2"].endswith("SparseConv")


def test_below_break_even_stays_dense(tmp_path):
    path = chain_model(tmp_path, (64, 128, 10))
    model = load(path)
    details = prune(model, sparsity=0.5, min_sparse_ratio=0.6).details
    assert all("dense (below break-even)" in v for v in details["layers"].values())
    assert {n.op_type for n in model.graph} == {"MatMul", "Add", "Relu", "Gemm"}


def test_wanda_uses_activations_and_needs_data(tmp_path):
    path = chain_model(tmp_path, (32, 64, 10))
    model = load(path)
    with pytest.raises(DataError):
        prune(model, sparsity=0.5, method="wanda")
    x = np.random.default_rng(2).standard_normal((128, 32)).astype(np.float32)
    x[:, :8] *= 100  # loud inputs: Wanda keeps their rows
    prune(model, Dataset.from_arrays({"x": x}), sparsity=0.5, method="wanda", scope="column", sparse_op=False, min_elements=1)
    w = weights_by_node(model)["fc0"]
    assert np.mean(w[:8] != 0) > 0.95 and np.mean(w[8:] != 0) < 0.4


def test_activity_keeps_weights_on_rarely_active_inputs(tmp_path):
    """method=activity divides Wanda's score by how often the input is nonzero (SparseMatMul skips zero
    inputs): at equal ‖X_k‖, rows of rarely active inputs are kept, and the row walk visits fewer weights."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 32)).astype(np.float32)
    x[:, :16] *= np.sqrt(10) * (rng.random((400, 16)) < 0.1)  # active in 10 % of rows, same ‖X_k‖ on average
    data = Dataset.from_arrays({"x": x})
    masks = {}
    for method in ("wanda", "activity"):
        model = load(chain_model(tmp_path, (32, 64, 10)))
        prune(model, data, sparsity=0.5, method=method, sparse_op=False, min_elements=1)
        masks[method] = weights_by_node(model)["fc0"] != 0
    rates = np.mean(x != 0, axis=0)
    walked = {method: float(rates @ mask.sum(axis=1)) for method, mask in masks.items()}
    assert masks["activity"][:16].mean() > 0.8 and masks["activity"][16:].mean() < 0.2
    assert masks["activity"].mean() == masks["wanda"].mean() == 0.5
    assert walked["activity"] < 0.5 * walked["wanda"]


def test_activity_ranks_convs_like_wanda(tmp_path):
    """SparseConv visits every input, so a Conv's activity score is Wanda's."""
    path, feeds = conv_model(tmp_path)
    feeds["x"][:, 0] *= np.random.default_rng(4).random(feeds["x"][:, 0].shape) < 0.2  # channel 0 mostly zero
    data = Dataset.from_arrays(feeds)
    weights = {}
    for method in ("wanda", "activity"):
        model = load(path)
        prune(model, data, sparsity=0.6, method=method, op_types="Conv", sparse_op=False, min_elements=1)
        weights[method] = weights_by_node(model)
    for name, w in weights["wanda"].items():
        np.testing.assert_array_equal(weights["activity"][name] != 0, w != 0)


def test_bad_options():
    for options in ({"sparsity": "1.5"}, {"pattern": "4:2"}, {"op_types": "Gather"}, {"scope": "row"}):
        with pytest.raises(PassOptionError):
            registry.get("prune").create(options)


def test_default_break_even_depends_on_weight_size(tmp_path):
    assert sparse_break_even(4096, 4096) == 0.6  # 64 MiB: streamed from DRAM
    assert sparse_break_even(1568, 512) == 0.85  # 3 MiB: cache-resident
    assert sparse_break_even(512, 10) > 1  # 20 KiB: never
    path = chain_model(tmp_path, (1024, 512, 10))  # fc0 2 MiB (cached), fc1 20 KiB (tiny)
    for sparsity, fc0 in ((0.8, "dense (below break-even)"), (0.9, "SparseMatMul")):
        details = prune(load(path), sparsity=sparsity).details
        assert details["layers"]["fc0"].endswith(fc0), details["layers"]
        assert details["layers"]["fc1"].endswith("dense (below break-even)")


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_weight_shared_with_a_subgraph_layer_is_pruned_where_both_see_it(tmp_path, kind):
    """w1 (main graph) is read by fc1 and by a layer inside an If branch / Loop body / Scan body: its
    pruned copy must live in the main graph (it was stored in the subgraph, and onnxruntime refused fc1)."""
    path, _, feeds = subgraph_model(tmp_path, kind, shared=True)
    model = load(path)
    registry.get("prune").create({"sparsity": "0.5", "sparse_op": "false", "min_elements": "1"})(model)
    fc1 = next(n for n in model.graph if n.name == "fc1")
    inner = next(n for g in model.graph.subgraphs() for n in g if n.name == "sub")
    assert inner.inputs[1] is fc1.inputs[1] and fc1.inputs[1].name in model.graph.initializers
    w1 = constant_array(fc1.inputs[1])
    assert np.mean(w1 == 0) == pytest.approx(0.5, abs=0.01)
    reference = load(path)
    reference.graph.initializers["w1"].const_value = ir.tensor(w1)
    for name in ("w0", "w2"):
        reference.graph.initializers[name].const_value = model.graph.initializers[f"{name}_pruned"].const_value
    np.testing.assert_allclose(run(model, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)
