"""``prune-structured``: channel/head removal propagated to every consumer, exactness, refusals, recovery."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import SUB_MATMUL, conv_model, load, mixed_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxopt import io, pipeline, registry
from onnxopt.calibration import Dataset
from onnxopt.errors import DataError, PassOptionError

MODELS = pathlib.Path(__file__).resolve().parents[1] / "models"
RNG = np.random.default_rng(0)
MLP_FEEDS = {"input": RNG.random((32, 64), dtype=np.float32)}
CNN_FEEDS = {"input": RNG.standard_normal((8, 1, 28, 28)).astype(np.float32)}
BLOCK_FEEDS = {"hidden_states": RNG.standard_normal((4, 16, 64)).astype(np.float32)}


def prune(model, data=None, **options):
    pass_ = registry.get("prune-structured").create({k: str(v) for k, v in options.items()}, data=data)
    pass_(model)
    return pass_.details


def initializer(model, name_prefix: str) -> np.ndarray:
    """The (single) initializer whose name starts with ``name_prefix``."""
    (value,) = [v for name, v in model.graph.initializers.items() if name.startswith(name_prefix)]
    return value.const_value.numpy()


def saved_size(model, tmp_path, name: str) -> int:
    path = tmp_path / name
    io.save(model, path)
    return path.stat().st_size


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_mlp_shrinks_and_runs(tmp_path, ratio):
    model = load(MODELS / "mlp.onnx")
    size = saved_size(model, tmp_path, "before.onnx")
    details = prune(model, ratio=ratio)
    h1, h2 = int(128 * (1 - ratio)), int(64 * (1 - ratio))
    assert initializer(model, "fc1.weight").shape == (64, h1)
    assert initializer(model, "fc1.bias").shape == (h1,)
    assert initializer(model, "fc2.weight").shape == (h1, h2)
    assert initializer(model, "fc3.weight").shape == (h2, 10)
    expected = 64 * h1 + h1 + h1 * h2 + h2 + h2 * 10 + 10
    assert details["parameters"] == f"17226 -> {expected}"
    assert saved_size(model, tmp_path, "after.onnx") < size * expected / 17226 + 2048
    assert run(model, MLP_FEEDS)[0].shape == (32, 10)
    assert "graph output" in details["refused"]["node_MatMul_6"]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_cnn_shrinks_through_batchnorm_pool_and_flatten(tmp_path, ratio):
    model = load(MODELS / "cnn_mnist.onnx")
    size = saved_size(model, tmp_path, "before.onnx")
    details = prune(model, ratio=ratio)
    c1, c2, f1 = (int(c * (1 - ratio)) for c in (16, 32, 512))
    assert initializer(model, "features.0.weight").shape == (c1, 1, 3, 3)
    for param in ("weight", "bias", "running_mean", "running_var"):
        assert initializer(model, f"features.1.{param}").shape == (c1,)
        assert initializer(model, f"features.5.{param}").shape == (c2,)
    assert initializer(model, "features.4.weight").shape == (c2, c1, 3, 3)
    assert initializer(model, "fc1.weight").shape == (f1, c2 * 7 * 7)  # transB: (N, K), 49 rows per channel
    assert initializer(model, "fc2.weight").shape == (10, f1)
    before, after = map(int, details["parameters"].split(" -> "))
    assert after < before * (1 - ratio) ** 1.5
    assert saved_size(model, tmp_path, "after.onnx") < size * after / before + 4096
    assert run(model, CNN_FEEDS)[0].shape == (8, 10)


def test_ratio_zero_reproduces_outputs():
    cases = (("mlp.onnx", MLP_FEEDS), ("cnn_mnist.onnx", CNN_FEEDS), ("transformer_block.onnx", BLOCK_FEEDS))
    for path, feeds in cases:
        model = load(MODELS / path)
        expected = run(model, feeds)[0]
        details = prune(model, ratio=0.0, heads=True)
        assert all("unchanged" in how for how in details["layers"].values())
        np.testing.assert_array_equal(run(model, feeds)[0], expected)


def _zero(model, name: str, index, axis: int) -> None:
    """Zero entries ``index`` along ``axis`` of initializer ``name`` (before pruning)."""
    value = model.graph.initializers[name]
    array = value.const_value.numpy().copy()
    np.moveaxis(array, axis, 0)[index] = 0
    value.const_value = ir.tensor(array, name=name)


@pytest.mark.parametrize("importance", ["l2", "activation"])
def test_pruning_dead_channels_is_exact_mlp(importance):
    model = load(MODELS / "mlp.onnx")
    dead1, dead2 = RNG.choice(128, 32, replace=False), RNG.choice(64, 16, replace=False)
    _zero(model, "fc1.weight", dead1, 1)
    _zero(model, "fc1.bias", dead1, 0)
    _zero(model, "fc2.weight", dead2, 1)
    _zero(model, "fc2.bias", dead2, 0)
    expected = run(model, MLP_FEEDS)[0]
    data = Dataset.from_arrays(MLP_FEEDS) if importance == "activation" else None
    details = prune(model, data=data, ratio=0.25, importance=importance)
    assert details["layers"]["node_MatMul_0"].startswith("channels 128 -> 96, importance removed 0.0000")
    np.testing.assert_allclose(run(model, MLP_FEEDS)[0], expected, rtol=1e-5, atol=1e-5)


def test_pruning_dead_channels_is_exact_cnn():
    model = load(MODELS / "cnn_mnist.onnx")
    dead1, dead2, dead_fc = (RNG.choice(n, n // 4, replace=False) for n in (16, 32, 512))
    for conv, bn, dead in (("features.0", "features.1", dead1), ("features.4", "features.5", dead2)):
        for name in (f"{conv}.weight", f"{conv}.bias", f"{bn}.weight", f"{bn}.bias"):  # BN: gamma = beta = 0
            _zero(model, name, dead, 0)
    _zero(model, "fc1.weight", dead_fc, 0)
    _zero(model, "fc1.bias", dead_fc, 0)
    expected = run(model, CNN_FEEDS)[0]
    details = prune(model, ratio=0.25)
    assert len(details["layers"]) == 3 and all("importance removed 0.0000" in v for v in details["layers"].values())
    np.testing.assert_allclose(run(model, CNN_FEEDS)[0], expected, rtol=1e-4, atol=1e-4)


def test_attention_head_removal_is_exact_for_a_dead_head():
    model = load(MODELS / "transformer_block.onnx")
    dead = np.arange(32, 48)  # head 2 of 4 (head_dim 16)
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
        _zero(model, name, dead, 1)
    for name in ("attn.q.bias", "attn.k.bias", "attn.v.bias"):
        _zero(model, name, dead, 0)
    _zero(model, "attn.o.weight", dead, 0)
    expected = run(model, BLOCK_FEEDS)[0]
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert details["layers"] == {"node_MatMul_27": "heads 4 -> 3, importance removed 0.0000 (l2)"}
    for name in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
        assert initializer(model, name).shape == (64, 48)
    assert initializer(model, "attn.o.weight").shape == (48, 64)
    shapes = sorted(initializer(model, c).tolist() for c in ("const_2", "const_3", "const_4", "const_6"))
    assert shapes == [[0, 0, 3, 16]] * 3 + [[0, 0, 48]]
    np.testing.assert_allclose(run(model, BLOCK_FEEDS)[0], expected, rtol=1e-5, atol=1e-5)


def test_heads_refused_for_a_per_head_mask_say_why():
    """A mask that differs per head cannot follow removed heads: the block is left alone, with the reason."""
    proto = onnx.load(MODELS / "transformer_block.onnx")
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    proto.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["B", 4, 16, 16]))
    proto.graph.node.insert(list(proto.graph.node).index(softmax), helper.make_node("Add", ["mask", softmax.input[0]], ["masked"]))
    softmax.input[0] = "masked"
    model = ir.serde.deserialize_model(proto)
    details = prune(model, ratio=0.5, heads=True, op_types="")
    assert details["layers"] == {}
    assert details["refused"] == {"node_MatMul_27 (heads)": "attention mask added by 'Add' is not broadcast over heads"}
    assert set(details["skipped"].values()) == {"weight is not a constant"}  # the score and context MatMuls


def test_heads_and_ffn_together_run():
    model = load(MODELS / "transformer_block.onnx")
    details = prune(model, ratio=0.5, heads=True)
    assert details["layers"]["node_MatMul_27"].startswith("heads 4 -> 2")
    assert details["layers"]["node_MatMul_39"].startswith("channels 256 -> 128")  # through the Erf GELU chain
    assert "residual" in details["refused"]["node_MatMul_46"]
    assert run(model, BLOCK_FEEDS)[0].shape == (4, 16, 64)


def _to_ir(graph):
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def _graph_model(nodes, inits, outputs):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32), n) for n, s in inits.items()],
    )
    return _to_ir(graph)


@pytest.mark.parametrize(
    ("nodes", "inits", "outputs", "reason"),
    [
        ([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
          helper.make_node("Add", ["r", "x"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2")],
         {"w1": (16, 16), "w2": (16, 4)}, ("y",), "residual"),
        ([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
          helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
         {"w1": (16, 32), "w2": (32, 4)}, ("y", "r"), "graph output"),
        ([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
          helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
          helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc3")],
         {"w1": (16, 32), "w2": (32, 4)}, ("y", "z"), "shared"),
        ([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
          helper.make_node("MatMul", ["x", "w1"], ["h2"], name="fc1b"),
          helper.make_node("Add", ["h", "h2"], ["s"]), helper.make_node("MatMul", ["s", "w2"], ["y"], name="fc2")],
         {"w1": (16, 32), "w2": (32, 4)}, ("y",), "shared"),
        ([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
          helper.make_node("Concat", ["h", "x"], ["c"], axis=-1),
          helper.make_node("MatMul", ["c", "w2"], ["y"], name="fc2")],
         {"w1": (16, 32), "w2": (48, 4)}, ("y",), "cannot be sliced"),
    ],
    ids=["residual", "graph-output", "shared-consumer", "shared-producer", "concat"],
)
def test_refusals_leave_the_layer_alone(nodes, inits, outputs, reason):
    model = _graph_model(nodes, inits, outputs)
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    expected = run(model, feeds)
    details = prune(model, ratio=0.5, op_types="MatMul")
    assert reason in details["refused"]["fc1"]
    assert "fc1" not in details["layers"]
    for got, want in zip(run(model, feeds), expected):
        np.testing.assert_array_equal(got, want)


def test_constant_weights_gemm_and_subgraphs(tmp_path):
    path, feeds = mixed_model(tmp_path)
    model = io.load(path, lift_constants=False)  # fc1's weight stays a Constant node
    details = prune(model, ratio=0.5)
    assert details["layers"]["fc1"].startswith("channels 48 -> 24")  # into Gemm fc2 (transB, alpha, beta, bias)
    assert "shared" in details["refused"]["fc2"]
    assert "graph output" in details["refused"][SUB_MATMUL]
    assert run(model, feeds)[0].shape == (64, 24)


def test_round_to_and_min_channels():
    model = load(MODELS / "mlp.onnx")
    details = prune(model, ratio=0.7, round_to=16, min_channels=40)
    assert details["layers"]["node_MatMul_0"].startswith("channels 128 -> 48")  # 38 -> 40 -> 48
    assert details["layers"]["node_MatMul_3"].startswith("channels 64 -> 48")  # 19 -> 40 -> 48


def test_recover_lowers_consumer_errors():
    model = load(MODELS / "cnn_mnist.onnx")
    calib = np.load(MODELS / "data" / "mnist_calib.npz")["input"][:64]
    details = prune(model, data=Dataset.from_arrays({"input": calib}), ratio=0.5, recover=True, samples=64)
    recovered = details["recover"]
    assert set(recovered) == {"/features/features.4/Conv", "/fc1/Gemm", "/fc2/Gemm"}
    for layer in recovered.values():
        assert layer["applied"] and layer["error_after"] < layer["error_before"]
    assert run(model, CNN_FEEDS)[0].shape == (8, 10)


def test_recover_with_few_samples_does_not_overfit():
    """16 calibration rows for consumers with 96 and 48 kept inputs: unpulled least squares interpolated
    the calibration set and generalized worse than no re-fit at all (output error on fresh inputs 0.42
    against 0.33); the re-fit pulled toward the current weights, its strength chosen on held-out
    batches, must generalize (0.12)."""
    rng = np.random.default_rng(3)
    calib, fresh = (rng.standard_normal((n, 64)).astype(np.float32) for n in (16, 512))
    reference = run(load(MODELS / "mlp.onnx"), {"input": fresh})[0]

    def fresh_error(recover: bool) -> float:
        model = load(MODELS / "mlp.onnx")
        prune(model, data=Dataset.from_arrays({"input": calib}), ratio=0.25, recover=recover, samples=16)
        out = run(model, {"input": fresh})[0]
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

    assert fresh_error(True) < 0.5 * fresh_error(False)


def test_bad_options_and_missing_data():
    with pytest.raises(PassOptionError):
        registry.get("prune-structured").create({"ratio": "1.0"})
    with pytest.raises(PassOptionError):
        registry.get("prune-structured").create({"op_types": "Gather"})
    with pytest.raises(DataError):
        prune(load(MODELS / "mlp.onnx"), importance="activation")


def test_channels_read_inside_a_subgraph_are_refused():
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["r", "w_sub"], ["t"], name="sub_fc")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(RNG.standard_normal((32, 4)).astype(np.float32), "w_sub")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((8, 4), np.float32), "zeros")],
    )
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(RNG.standard_normal((16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(np.array(-1e9, np.float32), "zero")],
    )
    model = _to_ir(graph)
    feeds = {"x": RNG.standard_normal((8, 16)).astype(np.float32)}
    expected = run(model, feeds)[0]
    details = prune(model, ratio=0.5)
    assert "subgraph" in details["refused"]["fc1"]
    np.testing.assert_array_equal(run(model, feeds)[0], expected)


def test_reshape_flatten_with_hardcoded_width_is_updated(tmp_path):
    path, feeds = conv_model(tmp_path)  # conv1 -> BN -> Relu -> conv2 (8 channels, 10x10) -> Flatten -> Gemm
    proto = onnx.load(path)
    flatten = next(n for n in proto.graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    flatten.input.append("flat_shape")
    proto.graph.initializer.append(numpy_helper.from_array(np.array([0, 800], np.int64), "flat_shape"))
    model = ir.serde.deserialize_model(proto)
    for name, dead in (("w1", [1, 5, 7, 12]), ("cb1", [1, 5, 7, 12]), ("g", [1, 5, 7, 12]), ("beta", [1, 5, 7, 12]),
                       ("w2", [2, 6])):
        _zero(model, name, dead, 0)
    expected = run(model, feeds)[0]
    details = prune(model, ratio=0.25)
    assert details["layers"]["conv2"].startswith("channels 8 -> 6, importance removed 0.0000")
    assert initializer(model, "flat_shape").tolist() == [0, 600]
    assert initializer(model, "wf").shape == (600, 10)
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- consumer patterns
# x -> producer 'p' -> Relu -> r -> pattern. The producer's dead channels output zeros, so pruning them must
# reproduce the unpruned model (or the layer is refused and left as is).
WIDTH = {"mm": 8, "conv": 4}
DEAD = {"mm": [1, 3, 5, 6], "conv": [1, 2]}
FEEDS = {"mm": {"x": RNG.standard_normal((5, 16)).astype(np.float32)},
         "conv": {"x": RNG.standard_normal((5, 3, 6, 6)).astype(np.float32)}}
mk = helper.make_node


def _pattern(kind: str, nodes: list, inits: dict, outputs=("y",), infer: bool = True) -> onnx.ModelProto:
    """The producer (MatMul 16->8, or Conv 3->4 3x3 with bias on 6x6) and Relu, then ``nodes``."""
    if kind == "mm":
        weight, shape = RNG.standard_normal((16, 8)), ["B", 16]
        weight[:, DEAD[kind]] = 0
        head, bias = [mk("MatMul", ["x", "pw"], ["h"], name="p")], {}
    else:
        weight, shape = RNG.standard_normal((4, 3, 3, 3)), ["B", 3, 6, 6]
        weight[DEAD[kind]] = 0
        bias = {"pb": np.where(np.isin(np.arange(4), DEAD[kind]), 0, RNG.standard_normal(4))}
        head = [mk("Conv", ["x", "pw", "pb"], ["h"], name="p", pads=[1, 1, 1, 1])]
    inits = {"pw": weight, **bias, **inits}
    graph = helper.make_graph(
        [*head, mk("Relu", ["h"], ["r"]), *nodes], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v, np.int64 if np.asarray(v).dtype.kind == "i" else np.float32), n)
         for n, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return onnx.shape_inference.infer_shapes(proto) if infer else proto


def _check_pattern(kind: str, proto: onnx.ModelProto, reason: str | None) -> None:
    """``reason`` None: 'p' loses its dead channels and computes the same; else 'p' is refused with it, unchanged.
    At ratio 0 the outputs are reproduced exactly either way."""
    feeds = FEEDS[kind]
    expected = run(ir.serde.deserialize_model(proto), feeds)
    model = ir.serde.deserialize_model(proto)
    prune(model, ratio=0.0)
    for got, want in zip(run(model, feeds), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    model = ir.serde.deserialize_model(proto)
    details = prune(model, ratio=0.5)
    if reason is None:
        width = WIDTH[kind]
        assert details["layers"]["p"] == f"channels {width} -> {width // 2}, importance removed 0.0000 (l2)"
    else:
        assert reason in details["refused"]["p"]
        assert "p" not in details["layers"]
    for got, want in zip(run(model, feeds), expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _w(*shape) -> np.ndarray:
    return RNG.standard_normal(shape)


@pytest.mark.parametrize(
    ("kind", "shape", "infer", "reason"),
    [
        ("mm", [-1, 8], True, None), ("mm", [0, -1], True, None), ("mm", [0, 8], True, None),
        ("mm", [5, -1], True, "not a proven"), ("mm", [-1, 4], True, "not a proven"),
        ("mm", [-1, 8], False, None),  # no static shape, but the channels stay last: rows regrouped, as in GPT-2
        ("mm", [-1, 2, 4], True, "not a proven"),  # the channels split
        ("conv", [-1, 144], True, None), ("conv", [0, -1], False, None), ("conv", [0, 144], False, None),
        ("conv", [5, -1], True, "not a proven"), ("conv", [-1, 36], True, "not a proven"),
        ("conv", [0, 4, 36], True, "not a proven"),
    ],
)
def test_reshape_after_the_pruned_layer(kind, shape, infer, reason):
    """-1 and 0 change meaning when channels disappear: only a proven (batch, C·rest) flatten, or a regroup of
    the rows that keeps the channels last, is followed."""
    rows = shape[-1] if shape[-1] > 0 else WIDTH[kind] * (36 if kind == "conv" else 1)
    nodes = [mk("Reshape", ["r", "shape"], ["f"]), mk("MatMul", ["f", "w2"], ["y"], name="fc2")]
    _check_pattern(kind, _pattern(kind, nodes, {"shape": shape, "w2": _w(rows, 3)}, infer=infer), reason)


@pytest.mark.parametrize(("reads", "reason"), [
    ([mk("Shape", ["r"], ["s"])], None),  # the whole run-time shape: the channel count is read where it is
    ([mk("Shape", ["r"], ["s0"]), mk("Slice", ["s0", "zero", "one"], ["b"]), mk("Concat", ["b", "eight"], ["s"], axis=0)],
     None),  # the batch read, the width a constant: rewritten
    ([mk("Shape", ["r"], ["s"]), mk("ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", 1, [1], [1.0])),
      mk("Mul", ["ones", "f0"], ["scaled"])], "is read by ConstantOfShape"),  # the width read for another tensor
])
def test_reshape_to_a_shape_read_at_run_time(reads, reason):
    """HF Conv1D's Reshape back to the input's shape: ``Shape`` of the channel data may feed the targets of
    Reshapes of it (checked as reshapes) and read other axes; any other reader refuses the group."""
    nodes = [*reads, mk("Reshape", ["r", "s"], ["f0"]), *([mk("Identity", ["f0"], ["f"])] if reason is None else
                                                          [mk("Identity", ["scaled"], ["f"])]),
             mk("MatMul", ["f", "w2"], ["y"], name="fc2")]
    inits = {"w2": _w(8, 3), "zero": [0], "one": [1], "eight": [8]}
    _check_pattern("mm", _pattern("mm", nodes, inits), reason)


@pytest.mark.parametrize(("kind", "shape"), [("conv", [-1, 144]), ("mm", [-1, 8])])
def test_reshape_with_allowzero(kind, shape):
    """torch's dynamo exporter writes allowzero=1 on every Reshape: it only matters for a 0 in the target
    (a dimension of size 0 instead of a copied one), so [-1, K] is still a flatten."""
    nodes = [mk("Reshape", ["r", "shape"], ["f"], allowzero=1), mk("MatMul", ["f", "w2"], ["y"], name="fc2")]
    _check_pattern(kind, _pattern(kind, nodes, {"shape": shape, "w2": _w(shape[-1], 3)}, infer=True), None)


def _layer_norm(kind: str) -> tuple[list, dict]:
    """Decomposed LayerNorm over the channels (MatMul: last axis; Conv: axis 1) of r into n."""
    axes, const = ([-1], (8,)) if kind == "mm" else ([1], (4, 1, 1))
    nodes = [mk("ReduceMean", ["r"], ["mu"], axes=axes), mk("Sub", ["r", "mu"], ["d"]),
             mk("Pow", ["d", "two"], ["d2"]), mk("ReduceMean", ["d2"], ["var"], axes=axes),
             mk("Add", ["var", "eps"], ["ve"]), mk("Sqrt", ["ve"], ["sd"]), mk("Div", ["d", "sd"], ["nd"]),
             mk("Mul", ["nd", "g"], ["ng"]), mk("Add", ["ng", "b"], ["n"])]
    return nodes, {"two": np.float32(2), "eps": np.float32(1e-5), "g": 1 + _w(*const), "b": _w(*const)}


def _consumer(kind: str, source: str) -> tuple[list, dict]:
    if kind == "mm":
        return [mk("MatMul", [source, "w2"], ["y"], name="fc2")], {"w2": _w(8, 3)}
    return [mk("Conv", [source, "w2"], ["y"], name="fc2")], {"w2": _w(2, 4, 1, 1)}


@pytest.mark.parametrize("kind", ["mm", "conv"])
@pytest.mark.parametrize("decomposed", [False, True])
def test_layer_norm_over_the_channels_is_refused(kind, decomposed):
    """Its statistics average over the channels: slicing them is not zeroing them."""
    if decomposed:
        nodes, inits = _layer_norm(kind)
    else:
        shape = (8,) if kind == "mm" else (4, 6, 6)
        nodes = [mk("LayerNormalization", ["r", "g", "b"], ["n"], axis=-1 if kind == "mm" else 1)]
        inits = {"g": 1 + _w(*shape), "b": _w(*shape)}
    consumer, weights = _consumer(kind, "n")
    reason = "ReduceMean" if decomposed else "LayerNormalization"
    _check_pattern(kind, _pattern(kind, nodes + consumer, {**inits, **weights}), reason)


@pytest.mark.parametrize(
    ("kind", "nodes", "inits", "reason"),
    [
        ("mm", [mk("Split", ["r"], ["s1", "s2"], axis=-1), mk("MatMul", ["s1", "w2"], ["y"], name="fc2")],
         {"w2": _w(4, 3)}, "Split"),
        ("mm", [mk("Concat", ["r", "r"], ["c"], axis=-1), mk("MatMul", ["c", "w2"], ["y"], name="fc2")],
         {"w2": _w(16, 3)}, "Concat"),
        ("mm", [mk("Transpose", ["r"], ["t"], perm=[1, 0]), mk("MatMul", ["t", "w2"], ["y"], name="fc2")],
         {"w2": _w(5, 3)}, "Transpose"),
        ("mm", [mk("Flatten", ["r"], ["f"]), mk("MatMul", ["f", "w2"], ["y"], name="fc2")], {"w2": _w(8, 3)}, None),
        ("mm", [mk("Flatten", ["r"], ["f"], axis=0), mk("MatMul", ["f", "w2"], ["y"], name="fc2")],
         {"w2": _w(40, 3)}, "Flatten"),
        ("conv", [mk("Split", ["r"], ["s1", "s2"], axis=1), mk("Conv", ["s1", "w2"], ["y"], name="fc2")],
         {"w2": _w(2, 2, 1, 1)}, "Split"),
        ("conv", [mk("Concat", ["r", "r"], ["c"], axis=1), mk("Conv", ["c", "w2"], ["y"], name="fc2")],
         {"w2": _w(2, 8, 1, 1)}, "Concat"),
        ("conv", [mk("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]), mk("MatMul", ["t", "w2"], ["y"], name="fc2")],
         {"w2": _w(4, 3)}, "Transpose"),
        ("conv", [mk("Flatten", ["r"], ["f"]), mk("Gemm", ["f", "w2"], ["y"], name="fc2", transB=1)],
         {"w2": _w(3, 144)}, None),
        ("conv", [mk("Flatten", ["r"], ["f"], axis=2), mk("MatMul", ["f", "w2"], ["y"], name="fc2")],
         {"w2": _w(36, 3)}, "Flatten"),
    ],
    ids=["mm-split", "mm-concat", "mm-transpose", "mm-flatten", "mm-flatten0",
         "conv-split", "conv-concat", "conv-transpose", "conv-flatten", "conv-flatten2"],
)
def test_ops_that_move_the_channel_axis(kind, nodes, inits, reason):
    _check_pattern(kind, _pattern(kind, nodes, inits), reason)


@pytest.mark.parametrize("group", [4, 2])
def test_grouped_conv_consumer_is_refused(group):
    """Depthwise (group 4 = channels) and group 2: an input channel cannot leave a group alone."""
    nodes = [mk("Conv", ["r", "gw"], ["d"], name="grouped", group=group, pads=[1, 1, 1, 1]),
             mk("Conv", ["d", "w2"], ["y"], name="fc2")]
    inits = {"gw": _w(4, 4 // group, 3, 3), "w2": _w(2, 4, 1, 1)}
    _check_pattern("conv", _pattern("conv", nodes, inits), f"grouped convolution (group={group})")


@pytest.mark.parametrize(
    ("nodes", "outputs", "reason"),
    [
        ([mk("MatMul", ["r", "w2"], ["y"], name="fc2")], ("y", "h"), "graph output 'h'"),
        ([mk("MatMul", ["r", "w2"], ["y"], name="fc2"), mk("Softmax", ["r"], ["z"])], ("y", "z"), "Softmax"),
        ([mk("MatMul", ["r", "w2"], ["y"], name="fc2"), mk("Tanh", ["r"], ["t"]),
          mk("MatMul", ["t", "w3"], ["z"], name="fc3")], ("y", "z"), None),
    ],
    ids=["producer-is-output", "one-sliceable-reader", "two-sliceable-readers"],
)
def test_several_readers(nodes, outputs, reason):
    inits = {"w2": _w(8, 3), "w3": _w(8, 3)}
    _check_pattern("mm", _pattern("mm", nodes, inits, outputs), reason)


def test_a_reader_listed_before_the_producer_is_seen():
    """onnxruntime runs a graph whose nodes are out of order: tracing in list order missed the Softmax
    listed first, and pruning changed its output from (5, 8) to (5, 4)."""
    proto = _pattern("mm", [mk("MatMul", ["r", "w2"], ["y"], name="fc2"), mk("Softmax", ["r"], ["z"])],
                     {"w2": _w(8, 3)}, ("y", "z"), infer=False)
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([nodes[-1], *nodes[:-1]])
    _check_pattern("mm", proto, "Softmax")


@pytest.mark.parametrize("kind", ["mm", "conv"])
def test_residual_with_an_unpruned_branch_is_refused(kind):
    other = (mk("MatMul", ["x", "w0"], ["o"]) if kind == "mm"
             else mk("Conv", ["x", "w0"], ["o"], pads=[1, 1, 1, 1]))
    consumer, weights = _consumer(kind, "s")
    nodes = [other, mk("Add", ["r", "o"], ["s"]), *consumer]
    inits = {"w0": _w(16, 8) if kind == "mm" else _w(4, 3, 3, 3), **weights}
    _check_pattern(kind, _pattern(kind, nodes, inits), "non-constant tensor 'o'")


# PyTorch's exporters: head counts are -1 or run-time Shape reads, SDPA adds a NaN guard after Softmax,
# TorchScript a no-op Reshape of the context, dynamo a Reshape-Transpose-Reshape for Kᵀ (models/torch_exports.py).
# Llama rotates Q and K by a rotary embedding, a per-head pattern the trace passes through.
TORCH_EXPORTS = ["bert_tiny_ts.onnx", "bert_tiny_dy.onnx", "gpt2_tiny_ts.onnx", "gpt2_tiny_dy.onnx",
                 "llama_tiny_ts.onnx", "llama_tiny_dy.onnx"]


def _head_groups(model, kv_cache=False):
    from onnxopt.passes.prune_structured import trace_heads
    from onnxopt.weights import WeightUse

    groups = []
    for node in list(model.graph):
        if node.op_type in ("MatMul", "Gemm") and node.inputs[1].const_value is not None:
            try:
                groups.append(trace_heads(WeightUse(node, 1), model, kv_cache))
            except Exception:  # noqa: BLE001 - not an output projection
                pass
    return groups


def _kill_head(model, head: int) -> None:
    """Zero one pruning unit of every attention block (a head; with grouped-query attention a key/value head
    and the query heads it serves): Q/K/V columns and biases (in each third of a fused projection), output
    projection rows."""
    from onnxopt.passes.prune_structured import _unit_index

    for group in _head_groups(model, kv_cache=True):
        units = group.as_channel_group()
        dead = lambda per, segments=1: _unit_index(np.array([head]), per, segments, units.channels)  # noqa: E731
        for use, per in units.producers:
            _zero(model, use.value.name, dead(per, units.segments), 1)
        for node, index, _, per in units.constants:
            _zero(model, node.inputs[index].name, dead(per, units.segments), 0)
        for consumer in units.consumers:
            _zero(model, consumer.use.value.name, dead(consumer.group), 0)


def _torch_feeds():
    from models.torch_exports import feeds

    return [feeds(), feeds(batch=3, seq=11, seed=1)]


@pytest.mark.parametrize("cleanup", [False, True])
@pytest.mark.parametrize("name", TORCH_EXPORTS)
def test_heads_of_pytorch_exports_are_removed_exactly(name, cleanup):
    """Also after ``cleanup``: onnxscript writes Constant nodes with ``value_ints``, which onnxruntime's
    symbolic shape inference (the mask check) cannot read; the mask was refused then."""
    model = load(MODELS / name)
    if cleanup:
        registry.get("cleanup").create()(model)
    assert len(_head_groups(model)) == 2
    _kill_head(model, 1)
    expected = [run(model, feeds)[0] for feeds in _torch_feeds()]
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert details["refused"] == {}
    assert list(details["layers"].values()) == ["heads 4 -> 3, importance removed 0.0000 (l2)"] * 2
    groups = _head_groups(model)  # traced again in the pruned model
    assert len(groups) == 2
    for group in groups:
        assert [u.matrix().shape for u in group.projections] == [(32, 24 * group.segments)] * (3 // group.segments)
        assert group.output.matrix().shape == (24, 32) and group.heads == 3
    for feeds, reference in zip(_torch_feeds(), expected):
        np.testing.assert_allclose(run(model, feeds)[0], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2_tiny_ts.onnx", "gpt2_tiny_dy.onnx"])
def test_fused_qkv_heads_by_activation_with_recovery(name):
    """GPT-2: both exporters give the same head choice; recovery re-fits each 2-D Gemm output projection."""
    from models.torch_exports import feeds

    batches = [feeds(batch=4, seq=9, seed=s) for s in range(4)]
    data = Dataset.from_arrays({k: np.concatenate([b[k] for b in batches]) for k in ("input_ids", "attention_mask")})
    model = load(MODELS / name)
    details = prune(model, data=data, ratio=0.5, heads=True, op_types="", importance="activation", recover=True)
    assert [v.split(",")[0] for v in details["layers"].values()] == ["heads 4 -> 2"] * 2
    assert all(r["applied"] and r["error_after"] < r["error_before"] and r["inputs"] == 17 for r in details["recover"].values())
    groups = _head_groups(model)
    assert [(g.segments, g.projections[0].matrix().shape) for g in groups] == [(3, (32, 48))] * 2
    assert run(model, _torch_feeds()[1])[0].shape == (3, 11, 32)


@pytest.mark.parametrize("cleanup", [False, True])
@pytest.mark.parametrize("name", ["gpt2_tiny_ts.onnx", "gpt2_tiny_dy.onnx"])
def test_gpt2_ffn_channels_through_2d_gemms_are_removed_exactly(name, cleanup):
    """c_fc (Gemm on rows flattened to 2-D) → Reshape to (b, q, 128) → tanh GELU → Reshape to 2-D → c_proj:
    the Reshapes keep the channels last (a constant 128 rewritten, a run-time read followed)."""
    model = load(MODELS / name)
    if cleanup:
        registry.get("cleanup").create()(model)
    dead = RNG.choice(128, 32, replace=False)
    fcs = [n for n in model.graph if n.op_type == "Gemm" and n.inputs[1].const_value.shape[1] == 128]
    projections = [n for n in model.graph if n.op_type == "Gemm" and n.inputs[1].const_value.shape[0] == 128]
    assert len(fcs) == len(projections) == 2
    for fc, projection in zip(fcs, projections):
        _zero(model, fc.inputs[1].name, dead, 1)
        _zero(model, fc.inputs[2].name, dead, 0)  # GELU(0) = 0: the dead channels add nothing to c_proj
        _zero(model, projection.inputs[1].name, dead, 0)
    expected = [run(model, feeds)[0] for feeds in _torch_feeds()]
    details = prune(model, ratio=0.25, op_types="Gemm")
    assert {fc.name: details["layers"].get(fc.name) for fc in fcs} == {
        fc.name: "channels 128 -> 96, importance removed 0.0000 (l2)" for fc in fcs}
    assert all(fc.inputs[1].const_value.shape == (32, 96) for fc in fcs)
    for feeds, reference in zip(_torch_feeds(), expected):
        np.testing.assert_allclose(run(model, feeds)[0], reference, rtol=1e-5, atol=1e-5)


CACHE_EXPORTS = ["gpt2_cache_tiny_ts.onnx", "gpt2_cache_tiny_dy.onnx",
                 "llama_cache_tiny_ts.onnx", "llama_cache_tiny_dy.onnx"]  # Llama: rotary embedding, then the cache
CACHES = [f"{kind}_{what}_{layer}" for kind in ("past", "present") for layer in (0, 1) for what in ("key", "value")]


def _cache_feeds():
    from models.torch_exports import cache_feeds

    return [cache_feeds(), cache_feeds(batch=3, seq=1, past=7, seed=1), cache_feeds(seq=4, past=0, seed=2)]


@pytest.mark.parametrize("cleanup", [False, True])
@pytest.mark.parametrize("name", CACHE_EXPORTS)
def test_heads_leave_the_kv_cache_with_kv_cache_true(name, cleanup):
    """A decoder step with past keys and values: the cache inputs and the updated-cache outputs lose the
    pruned head too; the model records what it kept, and onnxopt's runner cuts the original's caches alike."""
    from onnxopt import runtime, signature

    model = load(MODELS / name)
    if cleanup:
        registry.get("cleanup").create()(model)
    _kill_head(model, 1)
    feeds = _cache_feeds()
    expected = [run(model, f) for f in feeds]
    details = prune(model, ratio=0.25, heads=True, kv_cache=True, op_types="")
    assert details["refused"] == {}
    assert list(details["layers"].values()) == ["heads 4 -> 3, importance removed 0.0000 (l2)"] * 2
    assert details["model inputs and outputs cut"] == {n: "heads 4 -> 3 on axis 1" for n in CACHES}
    assert signature.kept_entries(model) == {n: signature.Kept(1, 4, (0, 2, 3)) for n in CACHES}
    assert [v.shape[1] for v in model.graph.inputs[2:]] == [3] * 4
    assert [v.shape[1] for v in model.graph.outputs[1:]] == [3] * 4
    for f, reference in zip(feeds, expected):
        cut = {k: np.delete(v, 1, axis=1) if k.startswith("past") else v for k, v in f.items()}
        got = run(model, cut)  # the model itself, fed the cut caches
        np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
        for out, ref in zip(got[1:], reference[1:]):
            np.testing.assert_allclose(out, np.delete(ref, 1, axis=1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(runtime.run(runtime.session(model), None, f)[0], reference[0], rtol=1e-5, atol=1e-5)
    assert _head_groups(model) == []  # traced again: refused without kv_cache, 3 heads with it
    assert [g.heads for g in _head_groups(model, kv_cache=True)] == [3, 3]


@pytest.mark.parametrize("name", ["llama_gqa_cache_tiny_ts.onnx", "llama_gqa_cache_tiny_dy.onnx",
                                  "llama_gqa_token_tiny_ts.onnx"])
def test_grouped_query_attention_loses_whole_key_value_heads(name):
    """Llama with 2 key/value heads for 4 query heads: a key/value head goes with the 2 query heads it serves
    and the caches lose it. K and V repeated per query head (Expand, then Reshape), or, in the one-token
    export, the query heads regrouped per key/value head around the attention: those shapes follow."""
    from models.torch_exports import cache_feeds

    from onnxopt import runtime, signature

    model = load(MODELS / name)
    assert [(g.heads, g.group_size) for g in _head_groups(model, kv_cache=True)] == [(2, 2)] * 2
    _kill_head(model, 0)
    feeds = [cache_feeds(seq=1, heads=2), cache_feeds(batch=3, seq=1, past=7, seed=1, heads=2)]
    if "token" not in name:  # that export takes one new token per step
        feeds += [cache_feeds(heads=2), cache_feeds(seq=4, past=0, seed=2, heads=2)]
    expected = [run(model, f) for f in feeds]
    details = prune(model, ratio=0.5, heads=True, kv_cache=True, op_types="")
    assert details["refused"] == {}
    assert list(details["layers"].values()) == ["kv heads 2 -> 1, importance removed 0.0000 (l2)"] * 2
    assert signature.kept_entries(model) == {n: signature.Kept(1, 2, (1,)) for n in CACHES}
    groups = _head_groups(model, kv_cache=True)  # traced again: 2 query heads on 1 key/value head
    assert [(g.heads, g.group_size) for g in groups] == [(1, 2)] * 2
    assert [u.matrix().shape for u in groups[0].projections] == [(32, 16), (32, 8), (32, 8)]
    for f, reference in zip(feeds, expected):
        got = run(model, {k: v[:, 1:] if k.startswith("past") else v for k, v in f.items()})
        np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
        for out, ref in zip(got[1:], reference[1:]):
            np.testing.assert_allclose(out, ref[:, 1:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(runtime.run(runtime.session(model), None, f)[0], reference[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [*CACHE_EXPORTS, "llama_gqa_cache_tiny_dy.onnx", "llama_gqa_token_tiny_ts.onnx"])
def test_heads_extending_a_kv_cache_are_refused_by_default(name):
    model = load(MODELS / name)
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert details["layers"] == {}
    assert sorted(details["refused"].values()) == [
        f"keys or values are appended to the cache input 'past_key_{i}': kv_cache=true prunes the cache's heads too "
        "(the model's cache inputs and outputs change)" for i in (0, 1)]


@pytest.mark.parametrize(("name", "heads", "kept", "refits"), [("gpt2_cache_tiny_ts.onnx", 4, "heads 4 -> 2", all),
                                                               ("llama_gqa_cache_tiny_dy.onnx", 2, "kv heads 2 -> 1", any)])
def test_kv_cache_heads_by_activation_with_recovery_on_the_original_caches(name, heads, kept, refits):
    """Calibration data holds the original's caches; recovery runs the pruned model on them, cut. (The GQA
    export copies the Expand shape shared by K and V per Expand: both copies had one node name, which
    onnxruntime refused when recovery ran the model. Its first layer's re-fit does not beat held-out data.)"""
    from models.torch_exports import cache_feeds

    batches = [cache_feeds(batch=4, seq=5, past=3, seed=s, heads=heads) for s in range(4)]
    data = Dataset.from_arrays({k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
    model = load(MODELS / name)
    details = prune(model, data=data, ratio=0.5, heads=True, kv_cache=True, op_types="", importance="activation",
                    recover=True)
    assert [v.split(",")[0] for v in details["layers"].values()] == [kept] * 2
    recovered = details["recover"].values()
    assert refits(r["applied"] for r in recovered)
    assert all(r["error_after"] < r["error_before"] if r["applied"] else r["error_after"] == r["error_before"]
               for r in recovered)
    data.check(model)  # the original's caches still fit the pruned model
    assert next(data.batches(model))["past_key_0"].shape == (8, heads // 2, 3, 8)


def test_two_kv_cache_prunings_in_a_pipeline_compare_each_step_and_the_original():
    """4 -> 3 -> 2 heads: each step's outputs are compared with the step before (its 3-head caches cut
    again) and with the original (the recorded indices are the original's)."""
    from onnxopt import signature

    model = load(MODELS / "gpt2_cache_tiny_ts.onnx")
    data = Dataset.from_arrays(_cache_feeds()[0])
    spec = "prune-structured:heads=true,kv_cache=true,op_types=,ratio={}"
    model, report = pipeline.run_pipeline(model, [spec.format(0.25), spec.format(0.34)], data)
    assert [r.status for r in report.records] == ["ok", "ok"]
    assert all({e.name for e in r.errors} == {"last_hidden_state", *CACHES[4:]} for r in report.records)
    kept = signature.kept_entries(model)["past_key_0"]
    assert len(kept.indices) == 2 and kept.of == 4
    assert {e.name for e in report.records[1].input_errors} == {"last_hidden_state", *CACHES[4:]}


def test_cli_prunes_kv_cache_heads_and_validates_against_the_original(tmp_path):
    from click.testing import CliRunner
    from models.torch_exports import cache_feeds
    from onnxopt.cli import main

    out, data = tmp_path / "pruned.onnx", tmp_path / "steps.npz"
    np.savez(data, **cache_feeds(batch=4))  # the original's caches: 4 heads
    src = MODELS / "gpt2_cache_tiny_dy.onnx"
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(out), "--data", str(data), "-p",
                                       "prune-structured:heads=true,kv_cache=true,op_types=,ratio=0.5"])
    assert result.exit_code == 0, result.output
    assert "rolled back" not in result.output
    assert [i.shape[1] for i in load(out).graph.inputs[2:]] == [2] * 4
    result = CliRunner().invoke(main, ["validate", str(src), str(out), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "present_key_0" in result.output


def test_fused_qkv_read_out_of_order_is_refused():
    """Q and K swapped at the Split: not GPT-2's layout, so the block is left alone with the reason."""
    proto = onnx.load(MODELS / "gpt2_tiny_dy.onnx")
    split = next(n for n in proto.graph.node if n.op_type == "Split")
    for node in proto.graph.node:
        node.input[:] = [{split.output[0]: split.output[1], split.output[1]: split.output[0]}.get(i, i) for i in node.input]
    model = ir.serde.deserialize_model(proto)
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert details["refused"] == {"node_addmm_1 (heads)": f"Q, K and V are not the outputs of Split '{split.name}' in that order"}
    assert list(details["layers"]) == ["node_addmm_5"]


def _dynamo_with_constant_head_count() -> ir.Model:
    """The dynamo export with the head count of its (shared) split shape ``Concat`` written as 4, not -1."""
    proto = onnx.load(MODELS / "bert_tiny_dy.onnx")
    split = next(n for n in proto.graph.node if n.op_type == "Reshape" and n.output[0] == "view")
    concat = next(n for n in proto.graph.node if n.output[0] == split.input[1])
    proto.graph.initializer.append(numpy_helper.from_array(np.array([4], np.int64), "four_heads"))
    concat.input[2] = "four_heads"
    return ir.serde.deserialize_model(proto)


def test_a_constant_head_count_in_a_shared_concat_is_rewritten_per_block():
    model = _dynamo_with_constant_head_count()
    _kill_head(model, 2)
    expected = [run(model, feeds)[0] for feeds in _torch_feeds()]
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert list(details["layers"].values()) == ["heads 4 -> 3, importance removed 0.0000 (l2)"] * 2
    counts = sorted(v.const_value.numpy().tolist() for v in model.graph.initializers.values() if v.name.startswith("four_heads"))
    assert counts and {tuple(c) for c in counts} == {(3,)}  # every Q/K/V split reads 3 heads, none 4
    for feeds, reference in zip(_torch_feeds(), expected):
        np.testing.assert_allclose(run(model, feeds)[0], reference, rtol=1e-5, atol=1e-5)


def test_a_block_left_alone_keeps_reading_the_shared_head_count():
    from onnxopt.filters import NodeFilter
    from onnxopt.passes.prune_structured import PruneStructuredPass

    model = _dynamo_with_constant_head_count()
    first, second = (group.output.node.name for group in _head_groups(model))
    _kill_head(model, 3)
    expected = [run(model, feeds)[0] for feeds in _torch_feeds()]
    pass_ = PruneStructuredPass(ratio=0.25, heads=True, op_types=[], node_filter=NodeFilter(name_regex=f"^{first}$"))
    pass_(model)
    assert pass_.details["layers"] == {first: "heads 4 -> 3, importance removed 0.0000 (l2)"}
    counts = sorted(v.const_value.numpy().tolist() for v in model.graph.initializers.values() if v.name.startswith("four_heads"))
    assert counts == [[3], [3], [3], [4]]  # the first block's Q/K/V splits own a copy; the second's still reads 4
    for feeds, reference in zip(_torch_feeds(), expected):
        np.testing.assert_allclose(run(model, feeds)[0], reference, rtol=1e-5, atol=1e-5)
    assert second not in pass_.details["refused"]


def test_a_mask_expanded_per_head_at_run_time_is_refused():
    """Symbolic shape inference finds the head axis of a mask computed with run-time shapes."""
    proto = onnx.load(MODELS / "bert_tiny_ts.onnx")
    add = next(n for n in proto.graph.node if n.name == "/bert/encoder/layer.0/attention/self/Add")
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "per_head"))
    proto.graph.node.insert(list(proto.graph.node).index(add), helper.make_node("Expand", [add.input[1], "per_head"], ["mask4"]))
    add.input[1] = "mask4"
    model = ir.serde.deserialize_model(proto)
    details = prune(model, ratio=0.5, heads=True, op_types="")
    assert details["refused"] == {"/bert/encoder/layer.0/attention/output/dense/MatMul (heads)":
                                  "attention mask added by '/bert/encoder/layer.0/attention/self/Add' is not broadcast over heads"}
    assert list(details["layers"]) == ["/bert/encoder/layer.1/attention/output/dense/MatMul"]
    assert run(model, _torch_feeds()[1])[0].shape == (3, 11, 32)


def _ts_block_mutated(mutate) -> tuple[ir.Model, dict]:
    """The TorchScript export with ``mutate(proto, prefix)`` applied to layer 0's attention; prune its heads."""
    proto = onnx.load(MODELS / "bert_tiny_ts.onnx")
    mutate(proto, "/bert/encoder/layer.0/attention/self/")
    model = ir.serde.deserialize_model(proto)
    return model, prune(model, ratio=0.25, heads=True, op_types="")


def _swap_context_rows(proto, prefix):
    """Context target [B, -1, S, d] -> [S, -1, B, d]: a valid model that regroups rows across heads."""
    concat = next(n for n in proto.graph.node if n.name == prefix + "Concat_3")
    b, minus_one, s, d = list(concat.input)
    concat.input[:] = [s, minus_one, b, d]


def _width_read_downstream(proto, prefix):
    """The merged context width read with Shape and used after the block (as width / 32)."""
    merged = prefix + "Reshape_4_output_0"
    dense = next(n for n in proto.graph.node if n.output[0] == "/bert/encoder/layer.0/attention/output/dense/Add_output_0")
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "two"),
                                    numpy_helper.from_array(np.array(32, np.float32), "thirty_two")])
    for node in proto.graph.node:
        node.input[:] = ["scaled" if name == dense.output[0] else name for name in node.input]
    nodes = list(proto.graph.node)
    at = nodes.index(dense) + 1
    nodes[at:at] = [helper.make_node("Shape", [merged], ["width_shape"]),
                    helper.make_node("Gather", ["width_shape", "two"], ["width"]),
                    helper.make_node("Cast", ["width"], ["width_f"], to=TensorProto.FLOAT),
                    helper.make_node("Div", ["width_f", "thirty_two"], ["factor"]),
                    helper.make_node("Mul", [dense.output[0], "factor"], ["scaled"])]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _nan_test_output(proto, prefix):
    """SDPA's IsNaN(probabilities) also made a graph output: per-head data leaving the block."""
    proto.graph.output.append(helper.make_tensor_value_info(prefix + "IsNaN_output_0", TensorProto.BOOL, None))


@pytest.mark.parametrize("mutate,reason", [
    (_swap_context_rows, "Reshape '/bert/encoder/layer.0/attention/self/Reshape_3' entry 0 does not give the batch"),
    (_width_read_downstream, "the shape of '/bert/encoder/layer.0/attention/self/Reshape_4_output_0' is read outside the attention pattern"),
    (_nan_test_output, "'/bert/encoder/layer.0/attention/self/IsNaN_output_0' is read outside the attention pattern"),
])
def test_exported_blocks_whose_head_slicing_would_change_other_values_are_refused(mutate, reason):
    model, details = _ts_block_mutated(mutate)
    assert details["refused"] == {"/bert/encoder/layer.0/attention/output/dense/MatMul (heads)": reason}
    assert list(details["layers"]) == ["/bert/encoder/layer.1/attention/output/dense/MatMul"]
    assert run(model, _torch_feeds()[1])[0].shape == (3, 11, 32)


def test_a_rotary_table_that_differs_per_head_is_refused():
    """Llama's rotary embedding is followed only while its cos/sin tables broadcast over the heads."""
    proto = onnx.load(MODELS / "llama_tiny_ts.onnx")
    prefix = "/llama/layers.0/self_attn/"
    rotate = next(n for n in proto.graph.node if n.name == prefix + "Mul")  # q · cos
    proto.graph.initializer.append(numpy_helper.from_array(np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1), "per_head"))
    scale = helper.make_node("Mul", [rotate.input[1], "per_head"], ["cos_per_head"])
    rotate.input[1] = "cos_per_head"
    nodes = list(proto.graph.node)
    nodes.insert(nodes.index(rotate), scale)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    model = ir.serde.deserialize_model(proto)
    details = prune(model, ratio=0.25, heads=True, op_types="")
    assert details["refused"] == {
        prefix + "o_proj/MatMul (heads)": f"'{prefix}Add_output_0' is computed from 2 tensors by a per-head pattern, not one"}
    assert list(details["layers"]) == ["/llama/layers.1/self_attn/o_proj/MatMul"]
    assert run(model, _torch_feeds()[1])[0].shape == (3, 11, 32)


def test_heads_report_how_many_attention_blocks_were_found():
    from onnxopt.passes.prune_structured import NO_BLOCK

    assert prune(load(MODELS / "bert_tiny_dy.onnx"), ratio=0.5, heads=True, op_types="")["attention blocks"] == 2
    mask_refused, details = _ts_block_mutated(_nan_test_output)
    assert details["attention blocks"] == 2 and len(details["layers"]) == 1  # one pruned, one refused
    assert prune(load(MODELS / "mlp.onnx"), ratio=0.5, heads=True)["attention blocks"] == NO_BLOCK


def test_reported_parameters_match_the_pipeline_table():
    """The pass counted Constant nodes' elements (the export's shape constants), the pipeline table only
    initializers: 20414 against 20320 on this export. Both now count every constant tensor."""
    model, report = pipeline.run_pipeline(load(MODELS / "bert_tiny_ts.onnx"), ["prune-structured:heads=true,ratio=0.5"])
    record = report.records[0]
    assert record.details["parameters"] == f"{record.parameters[0]} -> {record.parameters[1]}"
    assert any(n.op_type == "Constant" for n in model.graph)  # the case where the two counts differed
