"""The quantization passes on small graphs and the reference models, run in onnxruntime."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from compression_graphs import ELSE_MATMUL, SUB_MATMUL, SUBGRAPH_SCOPE, assert_names_unique, mixed_model, subgraph_model
from onnx import TensorProto, helper, numpy_helper

from onnxopt import io, ops, registry, runtime
from onnxopt import quantization as qz
from onnxopt.calibration import Dataset
from onnxopt.compression import packed_from_node
from onnxopt.errors import DataError, PassOptionError

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
RNG = np.random.default_rng(0)


def run_pass(name: str, model: ir.Model, data: Dataset | None = None, **options):
    instance = registry.get(name).create(options, data=data)
    instance(model)
    return instance.details


def outputs(model, feeds) -> list[np.ndarray]:
    return runtime.session(model).run(None, feeds)


def optimized_ops(model: ir.Model, tmp_path) -> collections.Counter:
    """Op histogram of the graph onnxruntime actually runs (after its QDQ fusions)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    runtime.session(model, session_options=options)
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture(scope="module")
def mnist():
    from models import evaluate

    return evaluate


def cnn_model() -> ir.Model:
    from onnxopt.pipeline import run_pipeline

    model, _ = run_pipeline(io.load(MODELS / "cnn_mnist.onnx"), ["cleanup", "fuse"], numeric_check=False)
    return model


# ------------------------------------------------------------------ quantize-int8


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "mse", "entropy"])
def test_int8_cnn_runs_integer_kernels_and_keeps_accuracy(tmp_path, mnist, calibration):
    model = cnn_model()
    fp32 = mnist.mnist_accuracy(io.to_bytes(model))
    data = Dataset.load(MODELS / "data" / "mnist_calib.npz")
    details = run_pass("quantize-int8", model, data, calibration=calibration)
    ops_run = optimized_ops(model, tmp_path)
    assert ops_run["QLinearConv"] == 2 and ops_run["QGemm"] == 2, ops_run
    assert "Conv" not in ops_run and "Gemm" not in ops_run and "DequantizeLinear" not in ops_run
    assert details["folded_relus"] == 3 and not details["kept_float"]
    accuracy = mnist.mnist_accuracy(io.to_bytes(model))
    assert accuracy >= fp32 - 0.01  # stated error: at most 1 point of accuracy


@pytest.mark.parametrize("activation_type,symmetric", [("uint8", False), ("int8", True)])
def test_int8_transformer_block_uses_matmul_integer_to_float(tmp_path, activation_type, symmetric):
    model = io.load(MODELS / "transformer_block.onnx")
    data = Dataset.load(MODELS / "data" / "transformer_calib.npz")
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:8]}
    before = outputs(model, feeds)[0]
    details = run_pass("quantize-int8", model, data, symmetric_activations=symmetric, activation_type=activation_type)
    assert len(details["weight_relative_error"]) == 6 and details["max_weight_relative_error"] < 0.02
    if activation_type == "uint8":  # onnxruntime 1.32 fuses only some s8 x s8 MatMuls
        assert optimized_ops(model, tmp_path)["MatMulIntegerToFloat"] == 6
    assert relative(before, outputs(model, feeds)[0]) < 0.05


def mask_model() -> ir.Model:
    """scores (B, 4, 8) + (1 - mask) * -3.4e38 -> Softmax -> MatMul(W): an HF-style additive mask."""
    w = RNG.standard_normal((8, 6)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "lowest"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
        helper.make_node("MatMul", ["masked", "w_mask"], ["raw"], name="masked_matmul"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "w"], ["y"], name="probs_matmul"),
    ]
    graph = helper.make_graph(
        nodes, "mask",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["B", 4, 8]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4, 6]),
         helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["B", 4, 6])],
        [numpy_helper.from_array(np.float32(1), "one"), numpy_helper.from_array(np.float32(-3.4e38), "lowest"),
         numpy_helper.from_array(w, "w"), numpy_helper.from_array(w, "w_mask")],
    )  # fmt: skip
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile", "mse"])
def test_int8_keeps_mask_path_float(calibration):
    model = mask_model()
    mask = np.ones((16, 1, 8), np.int64)
    mask[:, :, 5:] = 0
    data = Dataset.from_arrays({"scores": RNG.standard_normal((16, 4, 8)).astype(np.float32), "mask": mask})
    details = run_pass("quantize-int8", model, data, calibration=calibration)
    assert "masked" in details["kept_float"] and "exceeds max_activation" in details["kept_float"]["masked"]
    assert "probs_matmul" in details["weight_relative_error"]  # the softmax output is quantized
    assert "masked_matmul" not in details["weight_relative_error"]
    feeds = {"scores": RNG.standard_normal((2, 4, 8)).astype(np.float32), "mask": mask[:2]}
    assert np.all(np.isfinite(outputs(model, feeds)[0]))


def constant_condition(model: ir.Model) -> None:
    """Replace the scalar ``cond`` input (which cannot be batched in a data file) by a Constant True."""
    cond = next(v for v in model.graph.inputs if v.name == "cond")
    constant = ir.node("Constant", [], {"value": ir.tensor(np.array(True), name="cond_value")}, name="cond_constant")
    model.graph.insert_before(next(iter(model.graph)), constant)
    ir.convenience.replace_all_uses_with(cond, constant.outputs[0])
    model.graph.inputs.remove(cond)


def test_int8_subgraph_constant_and_shared_weights(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = io.load(path, lift_constants=False)  # keep fc1's weight in a Constant node
    with pytest.raises(DataError, match="rank"):  # a scalar input cannot be batched: clear data error
        Dataset.from_arrays({"x": feeds["x"], "cond": np.ones(64, bool)}).check(model)
    constant_condition(model)
    feeds = {"x": feeds["x"]}
    reference = outputs(model, feeds)[0]
    data = Dataset.from_arrays(feeds)
    details = run_pass("quantize-int8", model, data)
    assert {"fc1", "fc2", "shared_a", "shared_b"} <= set(details["weight_relative_error"])
    assert set(details["dynamic_in_subgraphs"]) == {SUB_MATMUL, ELSE_MATMUL}
    quantized_shared = [v for v in model.graph.initializers if v.startswith("shared_quantized")]
    assert len(quantized_shared) == 1 and "shared" not in model.graph.initializers
    assert relative(reference, outputs(model, feeds)[0]) < 0.05
    again = run_pass("quantize-int8", model, data)
    assert not again["weight_relative_error"]
    assert any("already quantized" in reason for reason in again["skipped"].values())


def test_int8_bad_options_and_data(tmp_path):
    info = registry.get("quantize-int8")
    for options, message in [
        ({"calibration": "kl"}, "calibration"),
        ({"activation_type": "int4"}, "activation_type"),
        ({"max_activation": "-1"}, "max_activation"),
        ({"exclude": "([bad"}, "quantize-int8"),
        ({"no_such_option": "1"}, "no option"),
    ]:
        with pytest.raises(PassOptionError, match=message):
            info.create(options)
    model = mask_model()
    with pytest.raises(DataError, match="needs calibration data"):
        info.create({})(model)
    with pytest.raises(DataError, match="no array for model input 'mask'"):
        info.create({}, data=Dataset.from_arrays({"scores": np.zeros((2, 4, 8), np.float32)}))(model)
    with pytest.raises(DataError, match="rank"):
        bad = {"scores": np.zeros((2, 8), np.float32), "mask": np.ones((2, 1, 8), np.int64)}
        info.create({}, data=Dataset.from_arrays(bad))(model)
    empty = tmp_path / "empty.npz"
    np.savez(empty, scores=np.zeros((0, 4, 8), np.float32), mask=np.zeros((0, 1, 8), np.int64))
    with pytest.raises(DataError, match="empty"):
        Dataset.load(empty)


# ------------------------------------------------------------------ quantize-dynamic


@pytest.mark.parametrize("fmt", ["ort", "onnx"])
def test_dynamic_quantization_mixed_graph(tmp_path, fmt):
    path, feeds = mixed_model(tmp_path)
    model = io.load(path, lift_constants=False)
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-dynamic", model, format=fmt)
    assert {"fc1", "shared_a", "shared_b", SUB_MATMUL, ELSE_MATMUL} <= set(details["weight_relative_error"])
    assert details["skipped"]["fc2"] == "Gemm with alpha != 1"
    assert relative(reference, outputs(model, feeds)[0]) < 0.05
    op = "DynamicQuantizeMatMul" if fmt == "ort" else "MatMulInteger"
    counts = collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))
    assert counts[op] == 5 and counts["MatMul"] == 0


def test_dynamic_quantization_folds_bias_and_embeddings():
    model = io.load(MODELS / "mlp.onnx")
    feeds = {"input": np.load(MODELS / "data" / "digits_calib.npz")["input"][:32]}
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-dynamic", model)
    ops_left = collections.Counter(n.op_type for n in model.graph)
    assert ops_left["DynamicQuantizeMatMul"] == 3 and ops_left["Add"] == 0 and details["quantized"] == 3
    assert (reference.argmax(-1) == outputs(model, feeds)[0].argmax(-1)).mean() >= 0.95


def recurrent_model(op: str = "LSTM", directions: int = 1, hidden: int = 24, inputs: int = 16, full: bool = True,
                    shared: bool = False) -> ir.Model:
    """``op`` over x (seq, batch, inputs) with bias, sequence lengths and initial states when ``full``;
    ``shared``: a second node reads the same W and R."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    weights = {"W": RNG.standard_normal((directions, gates * hidden, inputs)) * 0.3,
               "R": RNG.standard_normal((directions, gates * hidden, hidden)) * 0.3,
               "B": RNG.standard_normal((directions, 2 * gates * hidden)) * 0.1,
               "h0": RNG.standard_normal((directions, 3, hidden)) * 0.5,
               "c0": RNG.standard_normal((directions, 3, hidden)) * 0.5}
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    initializers.append(numpy_helper.from_array(np.array([7, 4, 6], np.int32), "lengths"))
    names = ["x", "W", "R", "B", "lengths", "h0"] + (["c0"] if op == "LSTM" else []) if full else ["x", "W", "R"]
    attributes = {"hidden_size": hidden, "direction": "bidirectional" if directions == 2 else "forward"}
    nodes = [helper.make_node(op, names, ["y", "y_h"], name="rnn", **attributes)]
    outputs = ["y", "y_h"]
    if shared:
        nodes.append(helper.make_node(op, names, ["y2"], name="rnn2", **attributes))
        outputs.append("y2")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", 3, inputs])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], initializers)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def _ort_dynamic(model: ir.Model, tmp_path, per_channel: bool) -> ort.InferenceSession:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    io.save(model, tmp_path / "float.onnx")
    quantize_dynamic(tmp_path / "float.onnx", tmp_path / "ort.onnx", weight_type=QuantType.QInt8, per_channel=per_channel,
                     op_types_to_quantize=["LSTM"])
    return ort.InferenceSession(tmp_path / "ort.onnx")


@pytest.mark.parametrize("directions,full,per_channel", [(1, True, True), (2, True, True), (1, False, True), (2, True, False)])
def test_dynamic_quantization_of_lstm_matches_onnxruntime_quantizer(tmp_path, directions, full, per_channel):
    """Full-range weights (``reduce_range=False``, the default of ORT's quantizer) are ORT's int8 weights and
    outputs. Their error is bounded only where ORT's uint8 x int8 kernels do not saturate (0.08-0.24 on an
    AVX2 CPU without VNNI); the pass's default, 7-bit weights on such CPUs, everywhere."""
    model = recurrent_model(directions=directions, full=full)
    feeds = {"x": RNG.standard_normal((7, 3, 16)).astype(np.float32)}
    reference, anchor = outputs(model, feeds), _ort_dynamic(model, tmp_path, per_channel).run(None, feeds)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    default = io.clone(model)
    details = run_pass("quantize-dynamic", model, per_channel=per_channel, reduce_range=False)
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeLSTM"] and details["quantized"] == 1
    assert 0 < details["weight_relative_error"]["rnn"] < 0.01
    scale = model.graph.initializers["W_scale"].const_value
    assert scale.shape == ((directions, 96) if per_channel else (directions,))
    assert sum(v.const_value.nbytes for v in model.graph.initializers.values()) < 0.4 * size
    for ours, theirs, exact in zip(outputs(model, feeds), anchor, reference):
        assert relative(exact, ours) < 0.03 or qz.u8s8_saturates()
        np.testing.assert_allclose(ours, theirs, atol=1e-5)  # the same int8 weights and kernel as ORT's quantizer
    run_pass("quantize-dynamic", default, per_channel=per_channel)
    for exact, ours in zip(reference, outputs(default, feeds)):
        assert relative(exact, ours) < (0.06 if qz.u8s8_saturates() else 0.03)  # 7-bit weights: twice the step


def test_dynamic_quantization_of_recurrent_layers_without_kernel_or_shared():
    gru = recurrent_model("GRU")
    assert run_pass("quantize-dynamic", gru)["skipped"] == {
        "rnn": "no onnxruntime kernel runs a GRU with integer weights (only LSTM has one)"}
    assert [n.op_type for n in gru.graph] == ["GRU"]
    model = recurrent_model(shared=True)
    feeds = {"x": RNG.standard_normal((7, 3, 16)).astype(np.float32)}
    reference = outputs(model, feeds)
    details = run_pass("quantize-dynamic", model)
    assert set(details["weight_relative_error"]) == {"rnn", "rnn2"}
    assert sorted(model.graph.initializers) == sorted(
        ["B", "lengths", "h0", "c0"] + [f"{w}_{part}" for w in "WR" for part in ("quantized", "scale", "zero_point")])
    for exact, ours in zip(reference, outputs(model, feeds)):
        assert relative(exact, ours) < 0.03


# ------------------------------------------------------------------ quantize-weights


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_weight_only_formats_match_their_dequantized_weights(tmp_path, fmt, bits, symmetric):
    path, feeds = mixed_model(tmp_path, k=64, hidden=64, n=32)
    model = io.load(path, lift_constants=False)
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-weights", model, bits=bits, symmetric=symmetric, format=fmt, block_size=32)
    expected = {"fc1", "shared_a", "shared_b", SUB_MATMUL, ELSE_MATMUL}
    assert expected <= set(details["weight_relative_error"])
    assert details["max_weight_relative_error"] < (0.2 if bits == 4 else 0.02)
    out = outputs(model, feeds)[0]
    assert relative(reference, out) < (0.25 if bits == 4 else 0.03)
    if fmt == "onnx":
        assert model.opset_imports[""] == 21


@pytest.mark.parametrize("fmt", ["onnx", "ort", "onnxopt"])
@pytest.mark.parametrize("half", ["convert-fp16", "convert-bf16"])
def test_half_precision_weights_are_quantized_with_half_scales(half, fmt):
    """A float16/bfloat16 model gets int4 weights (they were skipped: only float32 was quantized) whose scales
    keep the model's type, and ends as close to fp32 as the int4 float32 model; onnxopt's kernel takes
    float32 only and says so."""
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:4]}
    full = io.load(MODELS / "transformer_block.onnx")
    reference = outputs(full, feeds)[0]
    run_pass("quantize-weights", full, format=fmt)
    int4_error = relative(reference, outputs(full, feeds)[0])
    model = io.load(MODELS / "transformer_block.onnx")
    run_pass(half, model)
    details = run_pass("quantize-weights", model, format=fmt)
    if fmt == "onnxopt":
        assert details["quantized"] == 0 and sum("quantizes float32 weights" in r for r in details["skipped"].values()) == 6
        return
    assert details["quantized"] == 6
    scale_type = ir.DataType.FLOAT16 if half == "convert-fp16" else ir.DataType.BFLOAT16
    scales = [v for v in model.graph.initializers.values() if v.name.endswith(("_scale", "_scales"))]
    assert len(scales) == 6 and all(v.dtype == scale_type for v in scales)
    out = runtime.run(runtime.session(model), None, feeds)[0]
    assert abs(relative(reference, out) - int4_error) < 0.01


def embedding_model() -> tuple[ir.Model, dict]:
    """ids -> Gather(table) -> MatMul(table^T as a separate tied copy) : embeddings + lm head."""
    table = RNG.standard_normal((50, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
        helper.make_node("MatMul", ["emb", "head"], ["logits"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "S", 50])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "head")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    return model, {"ids": RNG.integers(0, 50, (2, 7))}


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_only_embeddings(fmt, symmetric):
    model, feeds = embedding_model()
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-weights", model, format=fmt, symmetric=symmetric, block_size=16)
    assert set(details["weight_relative_error"]) == {"embed", "lm_head"}
    assert "table" not in model.graph.initializers
    assert relative(reference, outputs(model, feeds)[0]) < 0.2


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_weight_only_onnxopt_format(scale_dtype):
    model, feeds = embedding_model()
    table = np.asarray(model.graph.initializers["table"].const_value.numpy())
    details = run_pass("quantize-weights", model, format="onnxopt", embeddings=False, block_size=32, scale_dtype=scale_dtype)
    node = next(n for n in model.graph if n.op_type == "QuantMatMul")
    assert node.domain == ops.DOMAIN and details["quantized"] == 1
    packed = packed_from_node(node)
    assert packed.inputs["scales"].dtype == np.dtype(scale_dtype)
    # the reported error is that of the weight the kernel multiplies by
    (reported,) = details["weight_relative_error"].values()
    assert reported == pytest.approx(relative(table.T, ops.dense_weight(packed)), abs=1e-5)
    out = outputs(model, feeds)[0]  # runs onnxopt's kernel library (built by the package install)
    assert relative(table[feeds["ids"]] @ table.T, out) < 0.2


def test_gptq_pass_reduces_layer_output_error():
    model = io.load(MODELS / "transformer_block.onnx")
    data = Dataset.load(MODELS / "data" / "transformer_calib.npz")
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:8]}
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-weights", model, data, algorithm="gptq", block_size=16)
    layer_errors = details["layer_output_relative_error"]
    assert len(layer_errors) == 6
    assert all(e["gptq"] <= e["rtn"] for e in layer_errors.values()), layer_errors
    assert relative(reference, outputs(model, feeds)[0]) < 0.1
    with pytest.raises(DataError, match="gptq needs calibration data"):
        registry.get("quantize-weights").create({"algorithm": "gptq"})(io.load(MODELS / "transformer_block.onnx"))



def test_sequential_gptq_takes_hessians_from_the_quantized_prefix():
    """Q/K/V share a depth (one pass); later layers see the earlier layers' quantized weights."""
    data = Dataset.load(MODELS / "data" / "transformer_calib.npz")
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][-8:]}
    reference = outputs(io.load(MODELS / "transformer_block.onnx"), feeds)[0]
    errors = {}
    for sequential in (False, True):
        model = io.load(MODELS / "transformer_block.onnx")
        options = {"algorithm": "gptq", "block_size": 16, "calibration_samples": 32, "sequential": sequential}
        details = run_pass("quantize-weights", model, data, **options)
        errors[sequential] = {k: e["gptq"] for k, e in details["layer_output_relative_error"].items()}
        assert details["quantized"] == 6  # every weight (the attention MatMuls have none)
        assert relative(reference, outputs(model, feeds)[0]) < 0.1
    assert "sequential GPTQ: 4 passes over the data (one per depth of layers)" in details["notes"]
    first = ["node_MatMul_9", "node_MatMul_13", "node_MatMul_17"]  # Q, K, V: same input, same Hessian
    assert all(errors[True][k] == errors[False][k] for k in first)
    assert any(errors[True][k] != errors[False][k] for k in errors[True] if k not in first)

def test_weight_only_bad_options():
    info = registry.get("quantize-weights")
    for options, message in [
        ({"bits": "3"}, "bits"),
        ({"block_size": "48"}, "block_size"),
        ({"format": "gguf"}, "format"),
        ({"format": "onnxopt", "block_size": "16"}, "onnxopt"),
        ({"accuracy_level": "7"}, "accuracy_level"),
    ]:
        with pytest.raises(PassOptionError, match=message):
            info.create(options)


# ------------------------------------------------------------------ convert-fp16 / bf16


def test_fp16_transformer_block_keeps_sensitive_ops_fp32():
    model = io.load(MODELS / "transformer_block.onnx")
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:4]}
    reference = outputs(model, feeds)[0]
    details = run_pass("convert-fp16", model)
    assert details["converted_nodes"] > 10
    assert {"Softmax", "ReduceMean", "Pow", "Sqrt"} <= set(details["kept_float32"])
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    matmul_weights = [n.inputs[1] for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert matmul_weights and all(w.dtype == ir.DataType.FLOAT16 for w in matmul_weights)
    out = outputs(model, feeds)[0]
    assert out.dtype == np.float32 and relative(reference, out) < 5e-3


def test_fp16_after_fuse_converts_what_reads_a_layer_norm():
    """A fused LayerNormalization stays float32 but no longer keeps everything after it in float32 (after
    `fuse`, convert-fp16 converted nothing on the transformer block)."""
    from onnxopt import pipeline

    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:4]}
    model = io.load(MODELS / "transformer_block.onnx")
    reference = outputs(model, feeds)[0]
    model, _ = pipeline.run_pipeline(model, ["fuse:target=onnx"], numeric_check=False)
    details = run_pass("convert-fp16", model)
    assert details["converted_nodes"] >= 20 and details["kept_float32"].get("MatMul", 0) == 0
    assert details["kept_float32"]["LayerNormalization"] == 2
    assert relative(reference, outputs(model, feeds)[0]) < 5e-3


@pytest.mark.parametrize("name, tolerance", [("convert-fp16", 5e-3), ("convert-bf16", 3e-2)])
@pytest.mark.parametrize("chunk", [1, 128])
def test_half_mask_clamped_overflow_reported_no_nan(monkeypatch, chunk, name, tolerance):
    """Overflows are found whether the check captures the tensors one at a time or all at once. -3.4e38
    is beyond bf16's range too (it became -inf: a BERT export's outputs were NaN)."""
    from onnxopt.passes import convert_precision

    monkeypatch.setattr(convert_precision, "OVERFLOW_CHECK_VALUES", chunk)
    model = mask_model()
    mask = np.ones((4, 1, 8), np.int64)
    mask[:, :, 6:] = 0
    feeds = {"scores": RNG.standard_normal((4, 4, 8)).astype(np.float32), "mask": mask}
    reference = outputs(model, feeds)[0]
    data = Dataset.from_arrays(feeds)
    details = run_pass(name, model, data, keep_overflowing=False)
    assert details["clamped_constants"] == {"lowest": 1}
    assert {"add_mask"} <= set(details["overflowing_ops"])
    out = outputs(model, feeds)[0]
    assert not np.isnan(out).any() and relative(reference, out) < tolerance


def test_fp16_subgraphs_and_io_option(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = io.load(path, lift_constants=False)
    reference = outputs(model, feeds)[0]
    details = run_pass("convert-fp16", model, keep_io_types=False)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    sub_matmul = next(n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == "sub_matmul")
    assert sub_matmul.outputs[0].dtype == ir.DataType.FLOAT16 and details["casts_inserted"] >= 2
    half_feeds = {"x": feeds["x"].astype(np.float16), "cond": feeds["cond"]}
    out = outputs(model, half_feeds)[0]
    assert relative(reference, out.astype(np.float32)) < 1e-2


def test_bf16_transformer_block_runs_emulated():
    """onnxruntime's CPU provider has no bf16 MatMul: runtime.session runs the bf16 ops in float32 on
    bf16-rounded tensors, and says so."""
    model = io.load(MODELS / "transformer_block.onnx")
    feeds = {"hidden_states": np.load(MODELS / "data" / "transformer_calib.npz")["hidden_states"][:4]}
    reference = outputs(model, feeds)[0]
    details = run_pass("convert-bf16", model)
    assert details["converted_nodes"] > 10
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(model)), full_check=True)
    weights = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.BFLOAT16]
    assert weights
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.NotImplemented):
        ort.InferenceSession(io.to_bytes(model))
    sess = runtime.session(model)
    assert sess.onnxopt_note == runtime.BFLOAT16_NOTE
    error = relative(reference, sess.run(None, feeds)[0])
    assert 1e-4 < error < 3e-2  # bf16 keeps 8 bits of mantissa: rounded, not exact


@pytest.mark.parametrize("opset, converted", [(17, False), (22, True)])
def test_bf16_keeps_ops_their_opset_has_no_bf16_for(opset, converted):
    """bfloat16 Conv and MaxPool exist from opset 22 only; earlier they stay float32 (with what runs on
    their outputs alone) and are reported."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Relu", ["p"], ["y"])]
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10))
    details = run_pass("convert-bf16", model)
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(model)), full_check=True)
    assert (details["converted_nodes"] == 3) == converted
    assert details[f"no_bf16_in_opset_{opset}"] == ({} if converted else {"Conv": 1, "MaxPool": 1})


@pytest.mark.parametrize("name", ["convert-fp16", "convert-bf16"])
def test_half_precision_leaves_regions_that_only_move_values(name):
    """A Transpose and Unsqueeze between ops that stay float32 (torch's GRU export at opset 17) gain nothing
    in half precision: they were converted with a Cast at each end, and the file grew."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Unsqueeze", ["t", "axes"], ["u"]),
             helper.make_node("Exp", ["u"], ["y"])]
    model = _proto_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2])],
                         [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    result = ir.passes.PassManager([registry.get(name).cls()])(model)
    assert not result.modified and [n.op_type for n in model.graph] == ["Transpose", "Unsqueeze", "Exp"]
    # keep_io_types=false: the model's input is half, so the region reading it is converted with it
    model = _proto_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2])],
                         [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    result = ir.passes.PassManager([registry.get(name).cls(keep_io_types=False)])(model)
    assert result.modified and [n.op_type for n in model.graph] == ["Transpose", "Unsqueeze", "Cast", "Exp"]
    assert model.graph.inputs[0].dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


# ------------------------------------------------------------------ main-graph tensors read inside subgraphs


def branches_model(tmp_path, hidden: int = 32, vocab: int = 40):
    """x -> fc0 -> Relu -> h; If(cond) { h @ w + Gather(E, ids) } else { tanh(h @ w) } -> g; then, after the
    If, h @ w and Gather(E, ids) in the main graph, summed with g -> fc2 -> y. The main-graph weight w, table
    E and activation h are read both in the main graph and inside the branches; the three MatMuls reading w
    are all named fc1. Returns (path, calibration Dataset, feeds)."""
    rng = np.random.default_rng(5)

    def info(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, shape)

    then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["t0"], name="fc1"),
         helper.make_node("Gather", ["E", "ids"], ["t1"], name="embed"), helper.make_node("Add", ["t0", "t1"], ["t"])],
        "then", [], [info("t", ["B", hidden])])
    other = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w"], ["e0"], name="fc1"), helper.make_node("Tanh", ["e0"], ["e"])],
        "else", [], [info("e", ["B", hidden])])
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["z0"], name="fc0"), helper.make_node("Relu", ["z0"], ["h"]),
        helper.make_node("If", ["cond"], ["g"], name="branch", then_branch=then, else_branch=other),
        helper.make_node("MatMul", ["h", "w"], ["z1"], name="fc1"),
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"), helper.make_node("Sum", ["g", "z1", "emb"], ["s"]),
        helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2"),
    ]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in [
        ("w0", rng.standard_normal((16, hidden)) / 4), ("w", rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)),
        ("E", rng.standard_normal((vocab, hidden))), ("w2", rng.standard_normal((hidden, 8)) / np.sqrt(hidden))]]
    inputs = [info("x", ["B", 16]), info("ids", ["B"], TensorProto.INT64), info("cond", [], TensorProto.BOOL)]
    graph = helper.make_graph(nodes, "branches", inputs, [info("y", ["B", 8])], inits)
    path = tmp_path / "branches.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    arrays = {"x": rng.standard_normal((320, 16)).astype(np.float32), "ids": rng.integers(0, vocab, 320)}
    calibration = Dataset.from_arrays({k: v[:256] for k, v in arrays.items()} | {"cond": np.array(True)})
    return path, calibration, {k: v[256:] for k, v in arrays.items()} | {"cond": np.array(True)}


def all_ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph))


@pytest.mark.parametrize("cond", [True, False])
@pytest.mark.parametrize("name", ["convert-fp16", "convert-bf16"])
def test_half_precision_weight_read_in_main_graph_and_branches(tmp_path, name, cond):
    """The half copy of w (first met inside the then-branch) is an initializer of the main graph, which
    the main fc1 and both branches all see."""
    path, _, feeds = branches_model(tmp_path)
    feeds["cond"] = np.array(cond)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    run_pass(name, model)
    assert_names_unique(model)
    half = ir.DataType.FLOAT16 if name == "convert-fp16" else ir.DataType.BFLOAT16
    readers = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == "fc1"]
    assert len(readers) == 3 and len({n.inputs[1] for n in readers}) == 1
    assert readers[0].inputs[1].dtype == half and readers[0].inputs[1].graph is model.graph
    onnx.checker.check_model(onnx.load_from_string(io.to_bytes(model)), full_check=True)
    assert relative(reference, outputs(model, feeds)[0]) < 3e-2  # bf16: emulated in float32


@pytest.mark.parametrize("fmt", ["ort", "onnx"])
def test_dynamic_weight_read_in_main_graph_and_branches(tmp_path, fmt):
    """w is quantized once, into the main graph (it went into the then-branch, which the main fc1 and the
    else-branch cannot see); the table E likewise; h is read in the main graph and in both branches."""
    path, _, feeds = branches_model(tmp_path)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    run_pass("quantize-dynamic", model, format=fmt)
    assert_names_unique(model)
    counts = all_ops(model)
    assert counts["MatMul"] == 0 and counts["DynamicQuantizeMatMul" if fmt == "ort" else "MatMulInteger"] == 5
    assert [v for v in model.graph.initializers if v.startswith("w_quantized")] == ["w_quantized"]
    assert not [v for g in model.graph.subgraphs() for v in g.initializers]
    assert relative(reference, outputs(model, feeds)[0]) < 0.05


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_dynamic_weight_shared_with_subgraph_layer(tmp_path, kind):
    """fc1's w1 is also read by a subgraph MatMul of the same name, met first."""
    path, _, feeds = subgraph_model(tmp_path, kind, layer="fc1", shared=True)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-dynamic", model)
    assert_names_unique(model)
    counts = all_ops(model)
    assert counts["MatMul"] == 0 and counts["DynamicQuantizeMatMul"] == 4 and "w1" not in model.graph.initializers
    assert not details["skipped"]
    assert relative(reference, outputs(model, feeds)[0]) < 0.05


def test_int8_weight_and_activation_read_in_main_graph_and_branches(tmp_path):
    """Main layers get static QDQ, the branch layers dynamic int8 of w stored once where both branches see
    it; h gets one Q/DQ pair in the main graph that the branches read too."""
    path, data, feeds = branches_model(tmp_path)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-int8", model, data)
    assert set(details["weight_relative_error"]) == {"fc0", "fc1", "fc2"}
    assert set(details["dynamic_in_subgraphs"]) == {"branch/then_branch/fc1", "branch/else_branch/fc1"}
    assert_names_unique(model)
    branch_layers = [n for g in model.graph.subgraphs() for n in g if n.name == "fc1"]
    assert [n.op_type for n in branch_layers] == ["DynamicQuantizeMatMul"] * 2
    assert branch_layers[0].inputs[1] is branch_layers[1].inputs[1] and branch_layers[0].inputs[1].graph is model.graph
    assert all(n.inputs[0].producer().op_type == "DequantizeLinear" for n in branch_layers)
    assert relative(reference, outputs(model, feeds)[0]) < 0.05


@pytest.mark.parametrize("fmt", ["ort", "onnx", "onnxopt"])
@pytest.mark.parametrize("algorithm", ["rtn", "gptq"])
def test_weight_only_weight_read_in_main_graph_and_branches(tmp_path, fmt, algorithm):
    """Each graph gets its own quantized copy of w and E (GPTQ for the main fc1, RTN in the branches)."""
    path, data, feeds = branches_model(tmp_path)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    block_size = 32 if fmt == "onnxopt" else 16
    run_pass("quantize-weights", model, data, format=fmt, bits=8, block_size=block_size, algorithm=algorithm)
    assert_names_unique(model)
    counts = all_ops(model)
    if fmt != "onnx":
        quant_op = "MatMulNBits" if fmt == "ort" else "QuantMatMul"
        assert counts["MatMul"] == 0 and counts[quant_op] == 5 and counts["GatherBlockQuantized"] == 2
    else:
        assert counts["DequantizeLinear"] == 7  # fc0, fc2, w, E; w and E in the then-branch; w in the else-branch
    assert relative(reference, outputs(model, feeds)[0]) < 0.03


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("pass_name", ["quantize-int8", "quantize-weights"])
def test_subgraph_layer_named_like_a_main_layer(tmp_path, kind, shared, pass_name):
    """A subgraph MatMul named fc1 like a main layer: both quantized, names unique, reported apart."""
    path, data, feeds = subgraph_model(tmp_path, kind, layer="fc1", shared=shared)
    model = io.load(path)
    reference = outputs(model, feeds)[0]
    if pass_name == "quantize-int8":
        details = run_pass("quantize-int8", model, data)
        assert set(details["weight_relative_error"]) == {"fc0", "fc1", "fc2"}
        assert set(details["dynamic_in_subgraphs"]) == {SUBGRAPH_SCOPE[kind] + "fc1"}
        expected_ops, tolerance = {"DynamicQuantizeMatMul": 1, "MatMul": 3}, 0.05  # main MatMuls stay, in QDQ
    else:
        run_pass("quantize-weights", model, bits=8, block_size=16)
        expected_ops, tolerance = {"MatMulNBits": 4, "MatMul": 0}, 0.03
    assert_names_unique(model)
    assert {op: all_ops(model)[op] for op in expected_ops} == expected_ops
    assert relative(reference, outputs(model, feeds)[0]) < tolerance


def _proto_model(nodes, inputs, outputs, initializers=(), opset=17) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8))


def test_half_precision_keeps_attribute_typed_outputs():
    """ConstantOfShape's output type is its value attribute's: it stays float32 (it was marked float16, and
    onnxruntime refused the type mismatch; onnx's light_* models build their weights this way)."""
    value = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])]
    model = _proto_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                         [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    run_pass("convert-fp16", model)
    assert next(n for n in model.graph if n.op_type == "ConstantOfShape").outputs[0].dtype in (ir.DataType.FLOAT, None)
    np.testing.assert_allclose(outputs(model, {"x": x})[0], x + 0.5, rtol=1e-3)


def test_half_precision_leaves_half_subgraph_outputs_half():
    """Outputs that were float16 already (a branch's, the model's) are not cast to float32: the branch then
    disagreed with its If, and the model's output changed type."""
    f16 = TensorProto.FLOAT16
    then = helper.make_graph([helper.make_node("Mul", ["h", "h"], ["t"])], "then", [], [helper.make_tensor_value_info("t", f16, [3])])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [], [helper.make_tensor_value_info("e", f16, [3])])
    nodes = [helper.make_node("If", ["c"], ["g"], then_branch=then, else_branch=other),
             helper.make_node("Relu", ["x"], ["y"])]
    inputs = [helper.make_tensor_value_info("h", f16, [3]), helper.make_tensor_value_info("c", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    model = _proto_model(nodes, inputs, [helper.make_tensor_value_info("g", f16, [3]), helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    run_pass("convert-fp16", model)
    h = np.array([1, 2, 3], np.float16)
    got = outputs(model, {"h": h, "c": np.array(True), "x": np.array([-1, 0, 2], np.float32)})
    assert got[0].dtype == np.float16 and got[0].tolist() == [1, 4, 9]


def test_int8_raises_an_old_opset():
    """QuantizeLinear with an axis needs opset 13: an opset-9 model is converted first (it was written as
    QDQ at opset 9, which onnxruntime refused), and the report says so."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]
    model = _proto_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 8])],
                         [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")], opset=9)
    x = rng.standard_normal((32, 16)).astype(np.float32)
    reference = outputs(model, {"x": x})[0]
    details = run_pass("quantize-int8", model, Dataset.from_arrays({"x": x}))
    assert details["notes"] == ["default opset 9 -> 13 for per-channel QuantizeLinear/DequantizeLinear"]
    assert model.opset_imports[""] == 13 and all_ops(model)["QuantizeLinear"] >= 1
    assert relative(reference, outputs(model, {"x": x})[0]) < 0.05


def test_int4_gather_rows_of_odd_length_are_kept():
    """GatherBlockQuantized packs two 4-bit codes per byte: a table with rows of 3 would give rows of 4."""
    table = np.random.default_rng(6).standard_normal((10, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], name="emb")]
    model = _proto_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [numpy_helper.from_array(table, "table")])
    details = run_pass("quantize-weights", model, bits="4", block_size="16", min_elements="1")
    assert "GatherBlockQuantized packs two 4-bit codes" in details["skipped"]["emb"]
    ids = np.array([[0, 3, 9, 3]], np.int64)
    np.testing.assert_array_equal(outputs(model, {"ids": ids})[0], table[ids])


def test_int8_raises_the_opset_for_activation_qdq_alone():
    """No weighted layer in the main graph, only a Relu that gets QDQ (and a MatMul inside an If): the
    opset is still raised (the check looked at main-graph MatMul/Gemm/Conv only)."""
    rng = np.random.default_rng(8)
    info = lambda name, dims, t=TensorProto.FLOAT: helper.make_tensor_value_info(name, t, dims)  # noqa: E731
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    then = helper.make_graph([helper.make_node("MatMul", ["r", "w"], ["t"], name="sub")], "then", [], [info("t", ["B", 16])], [w])
    other = helper.make_graph([helper.make_node("Identity", ["r"], ["e"])], "else", [], [info("e", ["B", 16])])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    model = _proto_model(nodes, [info("x", ["B", 16]), info("cond", [], TensorProto.BOOL)], [info("y", ["B", 16])], opset=9)
    feeds = {"x": rng.standard_normal((16, 16)).astype(np.float32), "cond": np.array(True)}
    reference = outputs(model, feeds)[0]
    details = run_pass("quantize-int8", model, Dataset.from_arrays(feeds))
    assert model.opset_imports[""] == 13 and details["quantized_ops"] == {"Relu": 1}
    assert relative(reference, outputs(model, feeds)[0]) < 0.05


@pytest.mark.parametrize("name", ["lstm_tiny_ts.onnx", "lstm_tiny_dy.onnx"])
def test_dynamic_quantization_of_pytorch_lstm_exports(name):
    """The dynamo exporter computes R by Slice/Concat of the parameter (gate reordering): ``cleanup`` folds
    that region, then the LSTM is quantized like the TorchScript export's."""
    from models.torch_exports import lstm_feeds

    model = io.load(MODELS / name)
    feeds = [lstm_feeds(), lstm_feeds(batch=3, seq=9, seed=1)]
    reference = [outputs(model, f)[0] for f in feeds]
    registry.get("cleanup").create()(model)
    details = run_pass("quantize-dynamic", model)
    assert "DynamicQuantizeLSTM" in [n.op_type for n in model.graph] and not any(
        "LSTM" in label for label in details["skipped"])
    for f, exact in zip(feeds, reference):
        assert relative(exact, outputs(model, f)[0]) < 0.03
