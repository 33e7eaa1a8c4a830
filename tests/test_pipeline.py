"""onnxopt.pipeline: checked execution of registered passes and the per-pass report."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import errors, io, pipeline, registry, runtime
from onnxopt.calibration import Dataset

X = np.random.default_rng(5).standard_normal((6, 8)).astype(np.float32)
MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"


def _outputs(model) -> np.ndarray:
    return runtime.session(model, threads=1).run(None, {"x": X})[0]


def test_numeric_check_catches_lossless_pass_that_changes_outputs(mlp_path, test_passes):
    with pytest.raises(errors.PassFailedError) as caught:
        pipeline.run_pipeline(io.load(mlp_path), ["cleanup", "test-break"], Dataset.from_arrays({"x": X}))
    assert caught.value.pass_name == "test-break"
    assert "output 'y' changed" in str(caught.value) and "first diverging value: 'h0'" in str(caught.value)


def test_skip_rolls_back_and_keeps_going(mlp_path, test_passes):
    expected = _outputs(io.load(mlp_path))
    model, report = pipeline.run_pipeline(
        io.load(mlp_path), ["test-break", "test-dangling", "fuse:matmul_add_to_gemm=true"], on_error="skip"
    )
    assert [(r.name, r.status) for r in report.records] == [
        ("test-break", "rolled back"), ("test-dangling", "rolled back"), ("fuse", "ok")]
    assert "changed by" in report.records[0].message
    np.testing.assert_allclose(_outputs(model), expected, rtol=1e-5, atol=1e-6)


def test_structural_check_catches_invalid_model(mlp_path, test_passes):
    with pytest.raises(errors.PassFailedError, match="pass 'test-dangling' failed"):
        pipeline.run_pipeline(io.load(mlp_path), ["test-dangling"], numeric_check=False)


def test_numeric_check_off_lets_changes_through(mlp_path, test_passes):
    model, report = pipeline.run_pipeline(io.load(mlp_path), ["test-break"], numeric_check=False)
    assert report.records[0].status == "ok" and report.records[0].errors == []
    assert not np.allclose(_outputs(model), _outputs(io.load(mlp_path)))


def test_lossy_pass_reports_its_error(mlp_path, test_passes):
    break_weights = registry.get("test-break").cls
    registry.register("test-lossy", lossless=False)(type("LossyBreak", (break_weights,), {"__doc__": "Lossy."}))
    try:
        _, report = pipeline.run_pipeline(io.load(mlp_path), ["test-lossy"])
    finally:
        registry._REGISTRY.pop("test-lossy")
    record = report.records[0]
    assert record.status == "ok"
    (error,) = record.errors
    assert error.name == "y" and error.max_abs > 1e-3 and 0 < error.max_rel and error.cosine < 1.0


def test_report_contents(mlp_path):
    model, report = pipeline.run_pipeline(
        io.load(mlp_path), ["cleanup", pipeline.PassSpec("fuse", {"matmul_add_to_gemm": "true"})],
        Dataset.from_arrays({"x": X}),
    )
    cleanup, fuse = report.records
    assert cleanup.nodes == (5, 5) and fuse.nodes == (5, 3)
    assert fuse.parameters == (212, 212) and fuse.tensor_bytes == (848, 848)
    assert fuse.op_delta == {"Add": -2, "Gemm": 2, "MatMul": -2}
    assert fuse.details.get("batchnorm/gemm") == 2
    assert [n.name for n in model.graph if n.op_type == "Gemm"] == ["fc1", "fc2"]  # the layers keep their names
    assert all(r.seconds > 0 for r in report.records)
    for record in report.records:
        (error,) = record.errors
        assert error.name == "y" and error.max_abs < 1e-5 and error.cosine > 0.999999
    as_json = json.loads(report.to_json())
    assert as_json["passes"][1]["op_delta"] == {"Add": -2, "Gemm": 2, "MatMul": -2}
    assert set(as_json["passes"][1]["errors"][0]) == {"name", "max_abs", "max_rel", "mean_abs", "cosine"}
    markdown = report.to_markdown()
    assert "| fuse | ok |" in markdown and "5 → 3" in markdown and "Gemm +2" in markdown
    assert "- batchnorm/gemm: 2" in markdown


def test_report_records_file_shrinking(tmp_path):
    """Duplicate weights above onnx_ir's default dedup limit (1024 elements) are merged by cleanup."""
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["n", 64]))
    w_a = ir.Value(name="w_a", const_value=ir.tensor(weight, name="w_a"))
    w_b = ir.Value(name="w_b", const_value=ir.tensor(weight.copy(), name="w_b"))
    first = ir.node("MatMul", [x, w_a])
    second = ir.node("MatMul", [first.outputs[0], w_b])
    second.outputs[0].name = "y"
    second.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    second.outputs[0].shape = ir.Shape(["n", 64])
    graph = ir.Graph([x], second.outputs, nodes=[first, second], initializers=[w_a, w_b], opset_imports={"": 17}, name="g")
    _, report = pipeline.run_pipeline(ir.Model(graph, ir_version=8), ["cleanup"])
    assert report.records[0].tensor_bytes == (2 * 64 * 64 * 4, 64 * 64 * 4)
    assert report.records[0].parameters == (2 * 64 * 64, 64 * 64)


def test_data_errors_from_passes_are_not_wrapped(mlp_path):
    class NeedsData(ir.passes.InPlacePass):
        def call(self, model):
            raise errors.DataError("calibration data required")

    registry.register("test-needs-data", lossless=False)(NeedsData)
    try:
        with pytest.raises(errors.DataError, match="calibration data required"):
            pipeline.run_pipeline(io.load(mlp_path), ["test-needs-data"], on_error="skip")
    finally:
        registry._REGISTRY.pop("test-needs-data")


def test_registered_passes_run_in_a_plain_pass_manager(mlp_path):
    model = io.load(mlp_path)
    manager = ir.passes.PassManager(
        [registry.get("cleanup").create(), registry.get("fuse").create({"matmul_add_to_gemm": True})]
    )
    result = manager(model)
    assert [n.op_type for n in result.model.graph] == ["Gemm", "Relu", "Gemm"]
    np.testing.assert_allclose(_outputs(result.model), _outputs(io.load(mlp_path)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "text, name, options",
    [
        ("cleanup", "cleanup", {}),
        ("fuse:target=onnx, matmul_add_to_gemm=1", "fuse", {"target": "onnx", "matmul_add_to_gemm": "1"}),
        ("x:names=a+b", "x", {"names": "a+b"}),
    ],
)
def test_pass_spec_parse(text, name, options):
    spec = pipeline.PassSpec.parse(text)
    assert (spec.name, spec.options) == (name, options)


def test_option_conversion():
    info = registry.get("fuse")
    created = info.create({"target": "onnx", "matmul-add-to-gemm": "yes"})
    assert created.target == "onnx" and created.matmul_add_to_gemm is True
    assert registry.convert("a+b", list[str], "w") == ["a", "b"]
    assert registry.convert("none", int | None, "w") is None
    with pytest.raises(errors.PassOptionError, match="must be a number"):
        registry.convert(True, float, "w")


@pytest.mark.parametrize("pass_name", ["fuse", "cleanup"])
def test_batchnorm_folding_keeps_the_layer_names(tmp_path, pass_name):
    """Conv + BatchNormalization folded: the Conv written keeps the layer's name (node filters, recipes and
    ``recover`` address layers by name), and outputs are unchanged. cleanup's rewriter (onnxscript) named
    the new Conv ``node_Conv_0`` before its names were restored."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from compression_graphs import conv_model, run

    path, feeds = conv_model(tmp_path)
    model, _ = pipeline.run_pipeline(io.load(path), [pass_name])
    assert [n.name for n in model.graph if n.op_type in ("Conv", "Gemm")] == ["conv1", "conv2", "fc"]
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    np.testing.assert_allclose(run(model, feeds)[0], run(io.load(path), feeds)[0], rtol=1e-4, atol=1e-4)


PASS_NAMES = [info.name for info in registry.all_passes()]
CHANGING = [name for name in PASS_NAMES if name not in ("cleanup", "fuse", "recover")]
CHAIN_MODELS = {"cnn_mnist": "mnist_calib", "transformer_block": "transformer_calib"}


@pytest.fixture(scope="module", params=sorted(CHAIN_MODELS))
def model_and_data(request):
    with np.load(MODELS / "data" / f"{CHAIN_MODELS[request.param]}.npz") as data:
        arrays = {name: data[name][:16] for name in data.files}
    return MODELS / f"{request.param}.onnx", arrays


@pytest.mark.parametrize("second", PASS_NAMES)
@pytest.mark.parametrize("first", CHANGING)
def test_every_pass_runs_after_every_other(first, second, model_and_data):
    """Each pass on a model as another pass left it (itself included), checked and run by onnxruntime.
    Found: a second convert-fp16 or quantize-int8 wrote a node name twice; `recover` after convert-fp16
    re-fitted toward a reference that had turned float16 with it (onnx_ir's clone shares value types);
    convert-bf16 wrote bf16 Conv/MaxPool, which opset 17 does not have; convert-fp16/bf16 after
    quantize-weights or quantize-dynamic mixed types at an Add reading a MatMulNBits output (no dtype
    known to onnx's shape inference)."""
    path, arrays = model_and_data
    model, report = pipeline.run_pipeline(io.load(path), [first, second], Dataset.from_arrays(arrays))
    assert [r.status for r in report.records] == ["ok", "ok"]
    feeds = {name: array[:2] for name, array in arrays.items()}
    expected = runtime.session(path).run(None, feeds)
    assert [a.shape for a in runtime.session(model).run(None, feeds)] == [a.shape for a in expected]


def test_report_gives_each_pass_error_against_the_input_too(mlp_path):
    """A `recover` after a lossy pass changes the outputs (its error against the pass before it), yet brings
    them back toward the input model's: the report says both, so recovery does not read as damage."""
    data = Dataset.from_arrays({"x": np.random.default_rng(8).standard_normal((256, 8)).astype(np.float32)})
    _, report = pipeline.run_pipeline(io.load(mlp_path), ["prune:sparsity=0.6,min_elements=1", "recover"], data)
    prune, recover = report.records
    assert prune.input_errors == prune.errors
    assert recover.errors[0].max_abs > 1e-3
    assert recover.input_errors[0].max_abs < prune.input_errors[0].max_abs
    assert recover.input_errors[0].cosine > prune.input_errors[0].cosine
    markdown = report.to_markdown()
    assert "| cosine vs input |" in markdown
    assert f"| {recover.input_errors[0].max_abs:.3g} | {recover.input_errors[0].cosine:.6f} |" in markdown


def test_a_rolled_back_pass_keeps_the_error_against_the_input(mlp_path, test_passes):
    data = Dataset.from_arrays({"x": X})
    _, report = pipeline.run_pipeline(io.load(mlp_path), ["prune:sparsity=0.5,min_elements=1", "test-break"], data,
                                      on_error="skip")
    prune, broken = report.records
    assert broken.status == "rolled back" and broken.errors[0].max_abs > 1e-3  # why it was rolled back
    assert broken.input_errors == prune.input_errors and prune.input_errors[0].max_abs > 0


def test_cleanup_folds_a_concat_of_weights_larger_than_onnxscripts_input_limit():
    """``fuse`` feeds ORT's Attention a Concat of the Q/K/V weights (128x128 each here: 16384 elements, over
    onnxscript's default input limit of 8192). Folding it frees as many elements as it stores: cleanup folds it."""
    rng = np.random.default_rng(9)
    parts = [ir.Value(name=f"w{i}", const_value=ir.tensor(rng.standard_normal((128, 128)).astype(np.float32), name=f"w{i}"))
             for i in range(3)]
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["n", 128]))
    concat = ir.node("Concat", parts, attributes={"axis": 1})
    matmul = ir.node("MatMul", [x, concat.outputs[0]])
    matmul.outputs[0].name, matmul.outputs[0].type, matmul.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 384])
    graph = ir.Graph([x], matmul.outputs, nodes=[concat, matmul], initializers=parts, opset_imports={"": 17}, name="g")
    model = ir.Model(graph, ir_version=10)
    feed = {"x": rng.standard_normal((2, 128)).astype(np.float32)}
    expected = runtime.session(io.clone(model)).run(None, feed)[0]
    model, report = pipeline.run_pipeline(model, ["cleanup"])
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert report.records[0].tensor_bytes[1] <= report.records[0].tensor_bytes[0]
    np.testing.assert_allclose(runtime.session(model).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def test_cleanup_keeps_flatten_and_never_grows_the_cnn(tmp_path):
    """onnxscript's Flatten2Reshape rule wrote a Reshape and its shape tensor in place of a Flatten."""
    path = MODELS / "cnn_mnist.onnx"
    model, report = pipeline.run_pipeline(io.load(path), ["cleanup"])
    assert "Flatten" in [n.op_type for n in model.graph] and "Reshape" not in [n.op_type for n in model.graph]
    saved = io.save(model, tmp_path / "out.onnx")
    assert saved.stat().st_size <= path.stat().st_size


@pytest.mark.parametrize("case", ["shape", "reshape", "shape and dead code"])
def test_cleanup_never_grows_a_small_model(case):
    """Folding ``Shape`` of a statically shaped input writes a Constant and frees nothing; onnxscript's
    MaterializeReshapeShape writes the static target of a Reshape whose shape is a graph input. Alone,
    both make a tiny model bigger, so cleanup leaves them out and says so; with dead code to remove as well,
    the whole cleanup shrinks the model and runs as usual."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape([3, 4, 5]))
    inputs, nodes = [x], []
    if case == "reshape":
        target = ir.val("target", ir.DataType.INT64, ir.Shape([2]))
        inputs.append(target)
        nodes.append(ir.node("Reshape", [x, target]))
        out_type, out_shape = ir.DataType.FLOAT, ir.Shape([12, 5])
    else:
        nodes.append(ir.node("Shape", [x]))
        out_type, out_shape = ir.DataType.INT64, ir.Shape([3])
    if case == "shape and dead code":
        nodes += [ir.node("Neg", [x]), ir.node("Abs", [x])]
    y = nodes[0].outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(out_type), out_shape
    model = ir.Model(ir.Graph(inputs, [y], nodes=nodes, opset_imports={"": 17}, name="g"), ir_version=10)
    size = len(io.to_bytes(model))
    feed = {"x": np.ones((3, 4, 5), np.float32), **({"target": np.array([12, 5])} if case == "reshape" else {})}
    model, report = pipeline.run_pipeline(model, ["cleanup"], numeric_check=False)  # random targets cannot reshape x
    assert len(io.to_bytes(model)) <= size
    details, ops = report.records[0].details, [n.op_type for n in model.graph]
    if case == "shape and dead code":  # removing Neg and Abs pays for the folded shape: all of it is done
        assert "constant folding" not in details and ops == ["Constant"]
    else:
        assert "bytes bigger" in details["constant folding" if case == "shape" else "rewrite rules"]
        assert ops == ["Reshape" if case == "reshape" else "Shape"]
    assert runtime.session(model).run(None, feed)[0].shape == tuple(out_shape.numpy())


def test_fuse_reports_a_change_when_only_its_constant_folding_changed_the_graph():
    """ORT's fusion pipeline folds constants too; the pass said 'no change' while the nodes went 2 → 1 here
    (17 → 11 on a GRU exported by PyTorch)."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["n", 4]))
    c = ir.Value(name="c", const_value=ir.tensor(np.arange(4, dtype=np.float32), name="c"))
    neg = ir.node("Neg", [c])
    add = ir.node("Add", [x, neg.outputs[0]])
    add.outputs[0].name, add.outputs[0].type, add.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 4])
    model = ir.Model(ir.Graph([x], add.outputs, nodes=[neg, add], initializers=[c], opset_imports={"": 17}, name="g"), ir_version=10)
    model, report = pipeline.run_pipeline(model, ["fuse"])
    assert report.records[0].nodes == (2, 1) and report.records[0].changed


@pytest.mark.parametrize(("name", "mha"), [("gpt2_tiny_dy", False), ("bert_tiny_dy", True)])
def test_fuse_keeps_the_rows_reshape_of_gpt2_attention(name, mha):
    """onnxscript's MultiHeadAttention rule took GPT-2's Reshape of the heads to 2-D rows (for its Conv1D
    Gemm) as a (B, S, D) output: the fused model's Gemm got a 3-D input and onnxruntime refused it. fuse's
    rule checks the merged heads are 3-D (GPT-2's SDPA still becomes MultiHeadAttention); BERT's match."""
    from models.torch_exports import feeds

    model = io.load(MODELS / f"{name}.onnx")
    wanted = {i.name for i in model.graph.inputs}
    feed = {k: v for k, v in feeds().items() if k in wanted}
    expected = runtime.session(model).run(None, feed)[0]
    fuse = registry.get("fuse").create()
    fuse(model)
    assert ("mha2" in fuse.details) == mha
    assert any(node.op_type in ("MultiHeadAttention", "Attention") for node in model.graph)
    np.testing.assert_allclose(runtime.session(model).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


def _bert_with_rows_merge() -> ir.Model:
    """bert_tiny_dy whose first block merges its heads to 2-D rows (b·s, 32) for the output projection and
    reshapes back to 3-D after the bias, as GPT-2's Conv1D export does; the second block as exported."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(MODELS / "bert_tiny_dy.onnx")
    graph = proto.graph
    producers = {out: node for node in graph.node for out in node.output}

    def readers(value):
        return [node for node in graph.node if value in node.input]

    merge = next(n for n in graph.node if n.op_type == "Reshape" and n.input[0] in producers
                 and producers[n.input[0]].op_type == "Transpose" and [r.op_type for r in readers(n.output[0])] == ["MatMul"])
    (matmul,) = readers(merge.output[0])
    (bias,) = readers(matmul.output[0])
    (residual,) = readers(bias.output[0])
    hidden = next(i for i in residual.input if i != bias.output[0])
    graph.initializer.append(numpy_helper.from_array(np.array([-1, 32], np.int64), "rows"))
    merge.input[1] = "rows"
    residual.input[list(residual.input).index(bias.output[0])] = "attention_3d"
    at = list(graph.node).index(residual)
    graph.node.insert(at, helper.make_node("Reshape", [bias.output[0], "hidden_shape"], ["attention_3d"]))
    graph.node.insert(at, helper.make_node("Shape", [hidden], ["hidden_shape"]))
    for info in [v for v in graph.value_info if v.name in (merge.output[0], matmul.output[0], bias.output[0])]:
        graph.value_info.remove(info)  # now 2-D
    return ir.serde.deserialize_model(proto)


def test_fuse_fuses_the_blocks_that_merge_their_heads_to_3d():
    """One block merging to rows, one as exported: only the second becomes an Attention (the MHA rule is
    checked per match, not skipped for the whole model)."""
    from models.torch_exports import feeds

    model = _bert_with_rows_merge()
    expected = runtime.session(model).run(None, feeds())[0]
    fuse = registry.get("fuse").create()
    fuse(model)
    assert fuse.details["mha2"] == 1 and fuse.details["sdpa_via_mha"] == 1
    assert sorted(n.op_type for n in model.graph if n.op_type in ("MultiHeadAttention", "Attention")) == [
        "Attention", "MultiHeadAttention"]
    np.testing.assert_allclose(runtime.session(model).run(None, feeds())[0], expected, rtol=1e-5, atol=1e-5)


def test_fuse_writes_onnxruntime_rms_norm_that_the_structural_check_accepts():
    """Llama's RMSNorm fuses into onnxruntime's SimplifiedLayerNormalization, an op onnxruntime keeps in the
    ONNX domain where onnx has none: the pipeline's checker refused the fused model ("No Op registered")."""
    from models.torch_exports import feeds

    model, report = pipeline.run_pipeline(io.load(MODELS / "llama_tiny_dy.onnx"), ["fuse"], data=None)
    ops = {n.op_type for n in model.graph}
    assert {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "MultiHeadAttention"} <= ops
    feed = {k: v for k, v in feeds().items() if k != "token_type_ids"}
    expected = runtime.session(io.load(MODELS / "llama_tiny_dy.onnx")).run(None, feed)[0]
    np.testing.assert_allclose(runtime.session(model).run(None, feed)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("passes", [["cleanup"], ["fuse"], ["fuse:target=onnx"]])
def test_lossless_passes_never_materialize_a_broadcast_constant(tmp_path, passes):
    """y = x + Expand(0.5, [1000, 256]): fuse's ORT fusions ran onnxscript's optimizer, whose folder stores
    results up to 256K elements: the 145-byte model became 1 MB."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([0.5], np.float32), "c"), numpy_helper.from_array(np.array([1000, 256], np.int64), "shape")]
    nodes = [helper.make_node("Expand", ["c", "shape"], ["e"]), helper.make_node("Add", ["x", "e"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1000, 256])],
                              [helper.make_tensor_value_info("y", 1, [1000, 256])], inits)
    path = tmp_path / "expand.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    model, _ = pipeline.run_pipeline(io.load(path), passes)
    assert "Expand" in [n.op_type for n in model.graph]
    assert io.save(model, tmp_path / "out.onnx").stat().st_size <= path.stat().st_size


@pytest.mark.parametrize("passes", [["cleanup"], ["fuse"]])
def test_lossless_passes_leave_no_onnxscript_provenance_tags(passes):
    """onnxscript's folder tags each folded value with the names it was folded from, its rewriter each new
    node with the rule's name: bytes in the file that the model does not need. Tags the model had stay."""
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["n", 4]))
    c = ir.Value(name="c", const_value=ir.tensor(np.arange(4, dtype=np.float32), name="c"))
    neg = ir.node("Neg", [c])
    add = ir.node("Add", [x, neg.outputs[0]])
    add.metadata_props[io.PROVENANCE_TAGS[1]] = "the user's"
    add.outputs[0].name, add.outputs[0].type, add.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["n", 4])
    model = ir.Model(ir.Graph([x], add.outputs, nodes=[neg, add], initializers=[c], opset_imports={"": 17}, name="g"), ir_version=10)
    model, _ = pipeline.run_pipeline(model, passes)
    assert [n.op_type for n in model.graph] == ["Add"]
    assert dict(next(iter(model.graph)).metadata_props) == {io.PROVENANCE_TAGS[1]: "the user's"}
    assert not [tag for v in model.graph.initializers.values() for tag in v.metadata_props]


def test_cleanup_keeps_a_scan_state_that_is_also_a_scan_output():
    """The body returns its running sum as state and, through an Identity, as scan output. Removing the
    Identity made one value two body outputs, which onnxruntime mis-executes; ``fuse`` used to repair it
    with onnxscript's OutputFixPass, so ``cleanup`` alone gave wrong sums."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["sum_in", "next"], ["sum_out"]), helper.make_node("Identity", ["sum_out"], ["scan_out"])],
        "body", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("sum_in", "next")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("sum_out", "scan_out")])
    scan = helper.make_node("Scan", ["initial", "x"], ["y", "z"], num_scan_inputs=1, body=body)
    graph = helper.make_graph([scan], "g", [helper.make_tensor_value_info("initial", TensorProto.FLOAT, [2]),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    feed = {"initial": np.ones(2, np.float32), "x": x}
    model, _ = pipeline.run_pipeline(model, ["cleanup"])
    y, z = runtime.session(model).run(None, feed)
    np.testing.assert_array_equal(z, 1 + np.cumsum(x, axis=0))
    np.testing.assert_array_equal(y, z[-1])


def _gate_model(weight_extra_reader: bool = False, tile: bool = False, fed_weight: bool = False):
    """x @ Unsqueeze(Concat(Slice(w) x4 in another order))[0]: dynamo's LSTM gate reordering, as a MatMul.

    ``weight_extra_reader``: w is also added to the output (it stays in the file); ``tile``: the region
    makes two copies of w; ``fed_weight``: w is a graph input with an initializer (it may be fed)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 256)).astype(np.float32)  # each gate 64x64: over the folder's size limit
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = []
    for i in range(4):
        inits += [numpy_helper.from_array(np.array([64 * i], np.int64), f"s{i}"),
                  numpy_helper.from_array(np.array([64 * i + 64], np.int64), f"e{i}")]
        nodes.append(helper.make_node("Slice", ["w", f"s{i}", f"e{i}", "axis1"], [f"gate{i}"]))
    order = ["gate0", "gate3", "gate1", "gate2"] + (["gate0", "gate3", "gate1", "gate2"] if tile else [])
    nodes += [helper.make_node("Concat", order, ["reordered"], axis=1),
              helper.make_node("Unsqueeze", ["reordered", "axis0"], ["stacked"]),
              helper.make_node("Squeeze", ["stacked", "axis0"], ["weight"]),
              helper.make_node("MatMul", ["x", "weight"], ["y" if not weight_extra_reader else "p"])]
    if weight_extra_reader:
        nodes += [helper.make_node("MatMul", ["x", "w"], ["q"]), helper.make_node("Add", ["p", "q"], ["y"])]
    width = 512 if tile else 256
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])]
    if fed_weight:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 256]))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("kind,folded", [("plain", True), ("weight_extra_reader", False), ("tile", False), ("fed_weight", False)])
def test_cleanup_folds_a_weight_region_that_frees_what_it_stores(tmp_path, kind, folded):
    """Each Slice alone would add a quarter of w while w stays; the region as a whole stores w once, reordered.
    A region whose results outweigh what it frees (w read elsewhere too, or tiled) and a weight that a graph
    input may replace are left as they are."""
    model = _gate_model(**({} if kind == "plain" else {kind: True}))
    feed = {"x": np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)}
    expected = runtime.session(io.clone(model)).run(None, feed)[0]
    before = io.save(io.clone(model), tmp_path / "before.onnx").stat().st_size
    model, report = pipeline.run_pipeline(model, ["cleanup"])
    ops = [n.op_type for n in model.graph]
    assert ("Slice" not in ops) == folded
    if folded:
        assert ops == ["MatMul"] and list(model.graph.initializers) == ["weight"]
    assert io.save(model, tmp_path / "after.onnx").stat().st_size <= before
    np.testing.assert_allclose(runtime.session(model).run(None, feed)[0], expected, rtol=1e-6, atol=1e-6)


def _string_tile_model():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Tile", ["s", "repeats"], ["tiled"]), helper.make_node("Concat", ["tiled", "q"], ["y"], axis=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("q", TensorProto.STRING, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.STRING, None)],
                              [helper.make_tensor("s", TensorProto.STRING, [1], [b"x" * 64]),
                               numpy_helper.from_array(np.array([200], np.int64), "repeats")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), {"q": np.array(["a"] * 3, dtype=object)}


def _quantized_weight_model():
    """A weight already stored as int8 behind DequantizeLinear, sliced and concatenated before its MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (64, 256)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.02, np.float32), "scale"),
             numpy_helper.from_array(np.array([0], np.int64), "start"), numpy_helper.from_array(np.array([128], np.int64), "mid"),
             numpy_helper.from_array(np.array([256], np.int64), "end"), numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"]),
             helper.make_node("Slice", ["w", "start", "mid", "axis"], ["a"]), helper.make_node("Slice", ["w", "mid", "end", "axis"], ["b"]),
             helper.make_node("Concat", ["b", "a"], ["swapped"], axis=1), helper.make_node("MatMul", ["x", "swapped"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), {"x": rng.standard_normal((2, 64)).astype(np.float32)}


@pytest.mark.parametrize("build", [_string_tile_model, _quantized_weight_model])
def test_cleanup_leaves_string_and_quantized_constants_alone(tmp_path, build):
    """Folding a string Tile left a tensor onnx_ir cannot save; folding a DequantizeLinear would store the
    int8 weight as float32 (4x the bytes) and drop its quantization."""
    proto, feed = build()
    model = ir.serde.deserialize_model(proto)
    expected = runtime.session(io.clone(model)).run(None, feed)[0]
    before = io.save(io.clone(model), tmp_path / "before.onnx").stat().st_size
    model, _ = pipeline.run_pipeline(model, ["cleanup"])
    assert io.save(model, tmp_path / "after.onnx").stat().st_size <= before
    assert ("DequantizeLinear" in [n.op_type for n in model.graph]) == (build is _quantized_weight_model)
    np.testing.assert_array_equal(runtime.session(model).run(None, feed)[0], expected)
