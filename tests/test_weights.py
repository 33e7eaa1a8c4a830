"""The shared weight walker and activation statistics."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import activations, calibration, runtime, weights
from onnxopt.errors import DataError

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    return onnxopt.io.normalize(model)


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_scan_finds_constant_shared_subgraph_and_skips_quantized():
    w = RNG.standard_normal((8, 6)).astype(np.float32)
    wq = numpy_helper.from_array(RNG.integers(-8, 8, (8, 6)).astype(np.int8), "wq")
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_shared"], ["t"])], "then", [], [_f("t", ["B", 6])])
    else_branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_shared"], ["e"])], "else", [], [_f("e", ["B", 6])])
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w, "c")),
        helper.make_node("MatMul", ["x", "w_const"], ["a"], name="from_constant"),
        helper.make_node("MatMul", ["x", "w_shared"], ["b"], name="shared_1"),
        helper.make_node("DequantizeLinear", ["wq", "s"], ["w_dq"]),
        helper.make_node("MatMul", ["x", "w_dq"], ["c"], name="quantized"),
        helper.make_node("If", ["cond"], ["d"], then_branch=then_branch, else_branch=else_branch),
    ]
    model = _model(
        nodes,
        [_f("x", ["B", 8]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_f("a", ["B", 6]), _f("b", ["B", 6]), _f("c", ["B", 6]), _f("d", ["B", 6])],
        [numpy_helper.from_array(w, "w_shared"), wq, numpy_helper.from_array(np.float32(0.1), "s")],
    )
    scan = weights.scan_weights(model)
    labels = sorted(u.label for u in scan.uses)
    assert "from_constant" in labels and "shared_1" in labels
    assert len(scan.uses) == 4  # constant, shared, and both If branches
    assert ("quantized", "already quantized") in scan.skipped
    shared = next(u for u in scan.uses if u.label == "shared_1")
    assert shared.shared
    np.testing.assert_array_equal(shared.matrix(), w)


def test_weights_behind_identity_nodes_are_read_directly_after_loading():
    """torch's exporter shares equal tensors through Identity nodes (HF's all-zero biases): loading lets the
    readers read the tensor, so it is a weight, and a shared one; an Identity that is a graph output stays."""
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("Identity", ["w"], ["w_alias"]), helper.make_node("Identity", ["w_alias"], ["w_alias2"]),
         helper.make_node("MatMul", ["x", "w_alias2"], ["a"], name="m1"), helper.make_node("MatMul", ["x", "w"], ["b"], name="m2"),
         helper.make_node("Identity", ["w"], ["w_out"])],
        [_f("x", [2, 4])], [_f("a", [2, 3]), _f("b", [2, 3]), _f("w_out", [4, 3])], [numpy_helper.from_array(w, "w")],
    )
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul", "Identity"]
    uses = {u.label: u for u in weights.scan_weights(model).uses}
    assert uses["m1"].value is uses["m2"].value and uses["m1"].shared
    np.testing.assert_array_equal(uses["m1"].matrix(), w)
    a, b, w_out = runtime.session(model).run(None, {"x": np.ones((2, 4), np.float32)})
    np.testing.assert_allclose(a, np.ones((2, 4)) @ w, rtol=1e-5)
    np.testing.assert_array_equal(w_out, w)


def test_scan_names_attention_that_fuse_built_from_layers():
    """After `fuse`, ORT's Attention holds the Q/K/V weights: a compression pass run then leaves them float,
    and says to run it before fuse instead of skipping them silently."""
    w = numpy_helper.from_array(RNG.standard_normal((8, 24)).astype(np.float32), "qkv")
    b = numpy_helper.from_array(np.zeros(24, np.float32), "qkv_bias")
    attention = helper.make_node("Attention", ["x", "qkv", "qkv_bias"], ["y"], name="attn", domain="com.microsoft", num_heads=2)
    model = _model([attention], [_f("x", [1, 4, 8])], [_f("y", [1, 4, 8])], [w, b])
    assert ("attn", "weights fused into com.microsoft.Attention by `fuse`: run this pass before it") in weights.scan_weights(model).skipped
    assert weights.scan_weights(model, ("Gather",)).skipped == []


def test_reading_a_constant_node_leaves_its_tensor_unnamed(tmp_path):
    """onnx_ir's get_const_tensor names the tensor of a Constant node it reads, and the name is written
    back: a pass that only looked at the weights of a TorchScript export grew the file (+144 bytes on a GRU)."""
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((2, 3), np.float32))),
             helper.make_node("MatMul", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))
    before = ir.serde.serialize_model(model).ByteSize()
    assert weights.constant_tensor(model.graph.node(1).inputs[1]).shape == (2, 3)
    assert ir.serde.serialize_model(model).ByteSize() == before


def test_set_weight_leaves_other_consumers_of_a_shared_weight():
    w = RNG.standard_normal((4, 3)).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"), helper.make_node("MatMul", ["x", "w"], ["b"], name="m2")],
        [_f("x", [2, 4])], [_f("a", [2, 3]), _f("b", [2, 3])], [numpy_helper.from_array(w, "w")],
    )
    use = next(u for u in weights.scan_weights(model).uses if u.label == "m1")
    weights.set_weight(use, np.zeros_like(w), "zero")
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    a, b = runtime.session(model).run(None, {"x": x})
    np.testing.assert_array_equal(a, 0)
    np.testing.assert_allclose(b, x @ w, rtol=1e-5)
    assert "w" in model.graph.initializers  # still used by m2


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_matrix_view_round_trips_and_matches_the_op(op):
    if op == "Gemm":
        w = RNG.standard_normal((5, 7)).astype(np.float32)  # (N, K) with transB
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        x = RNG.standard_normal((3, 7)).astype(np.float32)
        xin, yout = _f("x", [3, 7]), _f("y", [3, 5])
    else:
        w = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])
        x = RNG.standard_normal((2, 2, 7, 6)).astype(np.float32)
        xin, yout = _f("x", [2, 2, 7, 6]), _f("y", None)
    model = _model([node], [xin], [yout], [numpy_helper.from_array(w, "w")])
    (use,) = weights.scan_weights(model, (op,)).uses
    m = use.matrix()
    np.testing.assert_array_equal(use.from_matrix(m), w)
    y = runtime.session(model).run(None, {"x": x})[0]
    rows = activations.layer_input_rows(use, x)
    expected = rows @ m  # (rows, N): for Conv rows are (n, oh, ow)
    if op == "Conv":
        expected = expected.reshape(y.shape[0], y.shape[2], y.shape[3], -1).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(expected, y, rtol=1e-4, atol=1e-5)


def test_input_grams_match_numpy_and_stream():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_f("x", ["B", 3, 6])], [_f("y", ["B", 3, 4])],
                   [numpy_helper.from_array(w, "w")])
    x = RNG.standard_normal((10, 3, 6)).astype(np.float32)
    x[x < -0.5] = 0.0
    data = calibration.Dataset.from_arrays({"x": x})
    grams = activations.input_grams(model, weights.scan_weights(model).uses, data, limit=None, batch_size=3)
    rows = x.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(grams["x"].xtx, rows.T @ rows, rtol=1e-6)
    assert grams["x"].rows == 30
    np.testing.assert_allclose(grams["x"].column_norms, np.linalg.norm(rows, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(grams["x"].nonzero_rates, np.mean(rows != 0, axis=0))


def test_input_grams_count_an_input_read_by_several_layers_once():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="a"), helper.make_node("MatMul", ["x", "wb"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = _model(nodes, [_f("x", ["B", 6])], [_f("y", ["B", 4])], [numpy_helper.from_array(w, "wa"), numpy_helper.from_array(w, "wb")])
    x = RNG.standard_normal((10, 6)).astype(np.float32)
    grams = activations.input_grams(model, weights.scan_weights(model).uses, calibration.Dataset.from_arrays({"x": x}))
    assert grams["x"].rows == 10
    np.testing.assert_allclose(grams["x"].xtx, x.T.astype(np.float64) @ x, rtol=1e-6)


def test_scalar_inputs_are_fed_whole_with_every_batch():
    nodes = [helper.make_node("Mul", ["x", "s"], ["y"])]
    model = _model(nodes, [_f("x", ["B", 3]), _f("s", [])], [_f("y", ["B", 3])])
    data = calibration.Dataset.from_arrays({"x": np.ones((5, 3), np.float32), "s": np.array(2.0, np.float32)})
    batches = list(data.batches(model, batch_size=2))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 1] and all(b["s"].shape == () for b in batches)
    assert data.num_samples() == 5


def test_data_files_may_hold_scalars_but_not_empty_arrays(tmp_path):
    """An If condition or a step count comes as a 0-d array in the .npz (it was refused as 'scalar')."""
    np.savez(tmp_path / "ok.npz", x=np.ones((5, 3), np.float32), s=np.array(2.0, np.float32))
    model = _model([helper.make_node("Mul", ["x", "s"], ["y"])], [_f("x", ["B", 3]), _f("s", [])], [_f("y", ["B", 3])])
    batches = list(calibration.Dataset.load(tmp_path / "ok.npz").batches(model, batch_size=4))
    assert [b["x"].shape[0] for b in batches] == [4, 1] and all(b["s"] == 2 for b in batches)
    np.savez(tmp_path / "empty.npz", x=np.ones((0, 3), np.float32))
    with pytest.raises(DataError, match="empty array"):
        calibration.Dataset.load(tmp_path / "empty.npz")


def test_batches_follow_a_fixed_leading_dim():
    """A model fixing its batch to 4 gets batches of exactly 4 (the rest dropped, whatever batch_size asks;
    no more than ``limit`` samples unless that is less than one batch);
    inputs fixing axis 0 to different sizes (it is no batch axis) get each file whole."""
    model = _model([helper.make_node("Add", ["x", "x"], ["y"])], [_f("x", [4, 3])], [_f("y", [4, 3])])
    data = calibration.Dataset.from_arrays({"x": np.ones((10, 3), np.float32)})
    assert [b["x"].shape for b in data.batches(model, batch_size=1)] == [(4, 3), (4, 3)]
    assert [b["x"].shape for b in data.batches(model, batch_size=8, limit=3)] == [(4, 3)]  # one batch at least
    assert [b["x"].shape for b in data.batches(model, batch_size=8, limit=7)] == [(4, 3)]  # never past the limit
    with pytest.raises(DataError, match="fixes its batch to 4"):
        list(calibration.Dataset.from_arrays({"x": np.ones((3, 3), np.float32)}).batches(model))
    mixed = _model([helper.make_node("MatMul", ["q", "m"], ["y"])], [_f("q", [2, 4]), _f("m", [4, 6])], [_f("y", [2, 6])])
    feeds = {"q": np.ones((2, 4), np.float32), "m": np.ones((4, 6), np.float32)}
    batches = list(calibration.Dataset.from_arrays(feeds).batches(mixed, batch_size=1))
    assert len(batches) == 1 and batches[0]["q"].shape == (2, 4) and batches[0]["m"].shape == (4, 6)
    assert runtime.session(mixed).run(None, batches[0])[0].shape == (2, 6)


def test_synthesized_scalar_inputs_are_arrays_onnxruntime_takes():
    nodes = [helper.make_node("If", ["c"], ["y"], then_branch=helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])], "then", [], [_f("t", ["B", 3])]), else_branch=helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [_f("e", ["B", 3])]))]
    model = _model(nodes, [_f("x", ["B", 3]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [_f("y", ["B", 3])])
    feeds = calibration.synthesize_inputs(model, batch=2)
    assert isinstance(feeds["c"], np.ndarray) and feeds["c"].shape == ()
    assert runtime.session(model).run(None, feeds)[0].shape == (2, 3)


def test_other_readers_and_edge_layers():
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], name="emb"),
             helper.make_node("MatMul", ["h", "w"], ["z"], name="mid"),
             helper.make_node("Gemm", ["z", "E"], ["y"], name="head", transB=1)]
    inits = [numpy_helper.from_array(RNG.standard_normal((8, 4)).astype(np.float32), "E"),
             numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "w")]
    model = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])], [_f("y", ["B", 8])], inits)
    uses = {u.node.name: u for u in weights.scan_weights(model).uses}
    assert weights.other_readers(uses["head"], [uses["head"].node]) == ["Gather 'emb'"]
    assert weights.other_readers(uses["mid"], [uses["mid"].node]) == []
    assert weights.edge_layers(model, ("MatMul", "Gemm")) == {id(uses["mid"].node), id(uses["head"].node)}


def test_cross_gram_least_squares_recovers_the_original_weight():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    original = _model(nodes, [_f("x", ["B", 6])], [_f("y", ["B", 4])], [numpy_helper.from_array(w, "w")])
    compressed = _model(nodes, [_f("x", ["B", 6])], [_f("y", ["B", 4])], [numpy_helper.from_array(w * 0.5, "w")])
    data = calibration.Dataset.from_arrays({"x": RNG.standard_normal((64, 6)).astype(np.float32)})
    (u_orig,) = weights.scan_weights(original).uses
    (u_comp,) = weights.scan_weights(compressed).uses
    gram = activations.cross_gram(original, u_orig, compressed, u_comp, data)
    refit = np.linalg.solve(gram.xtx, gram.xty)
    np.testing.assert_allclose(refit, w, rtol=1e-4, atol=1e-5)
    assert onnx.checker.check_model(ir.to_proto(compressed)) is None


def test_name_uniquely_keeps_main_names_and_absent_outputs():
    """A branch value named like a later main value is renamed (not the main one), and an absent optional
    output ('') stays absent (NameFixPass named it: the output became present). Node names are made unique
    within each graph (onnxruntime refuses two nodes of one name in a graph, e.g. a pass's Cast written
    again by a second run); a branch node may share a main node's name."""
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["z"], name="op")], "then", [], [_f("z", [3])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="dup"),
                               helper.make_node("Identity", ["e"], ["e2"], name="dup")], "else", [], [_f("e2", [3])])
    nodes = [helper.make_node("If", ["c"], ["g"], then_branch=then, else_branch=other),
             helper.make_node("Mul", ["g", "g"], ["z"], name="op"),
             helper.make_node("LayerNormalization", ["z", "s"], ["y", "", ""], name="op")]
    model = _model(nodes, [_f("x", [3]), helper.make_tensor_value_info("c", TensorProto.BOOL, []), _f("s", [3])], [_f("y", [3])])
    weights.name_uniquely(model)
    main = {v.name for n in model.graph for v in n.outputs}
    if_node = next(iter(model.graph))
    branch, other_branch = (if_node.attributes[a].as_graph() for a in ("then_branch", "else_branch"))
    assert "z" in main and branch.outputs[0].name not in main | {"x", "c", "s"}
    layer_norm = next(n for n in model.graph if n.op_type == "LayerNormalization")
    assert [v.name for v in layer_norm.outputs] == ["y", "", ""]
    assert [n.name for n in model.graph] == ["", "op", "op_1"] and next(iter(branch)).name == "op"
    assert [n.name for n in other_branch] == ["dup", "dup_1"]
    feeds = {"x": np.array([1, 2, 3], np.float32), "c": np.array(True), "s": np.ones(3, np.float32)}
    assert runtime.session(model).run(None, feeds)[0].shape == (3,)


def test_unnamed_containers_get_distinct_scopes():
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="fc")], "then", [], [_f("t", ["B", 4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_f("e", ["B", 4])])
    nodes = [helper.make_node("If", ["c"], ["a"], then_branch=then, else_branch=other),
             helper.make_node("If", ["c"], ["b"], then_branch=then, else_branch=other), helper.make_node("Add", ["a", "b"], ["y"])]
    w = numpy_helper.from_array(RNG.standard_normal((4, 4)).astype(np.float32), "w")
    model = _model(nodes, [_f("x", ["B", 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])], [_f("y", ["B", 4])], [w])
    assert [u.label for u in weights.scan_weights(model).uses] == ["If#0/then_branch/fc", "If#1/then_branch/fc"]


def test_in_memory_data_writes_no_file(tmp_path, monkeypatch):
    """from_arrays keeps the arrays in memory (it used to leave one temporary .npz per call behind)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _model([helper.make_node("Add", ["x", "x"], ["y"])], [_f("x", ["B", 3])], [_f("y", ["B", 3])])
    data = calibration.Dataset.from_arrays({"x": np.arange(15, dtype=np.float32).reshape(5, 3)})
    assert [b["x"].shape[0] for b in data.batches(model, batch_size=2)] == [2, 2, 1] and data.num_samples() == 5
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataError, match="in-memory data has an empty array"):
        calibration.Dataset.from_arrays({"x": np.ones((0, 3), np.float32)})
