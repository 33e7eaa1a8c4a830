"""``prune-structured``: channel/head removal propagated to every consumer, exactness, refusals, recovery."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import conv_model, load, mixed_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxopt import io, registry
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
    assert "graph output" in details["refused"]["sub_matmul"]
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
