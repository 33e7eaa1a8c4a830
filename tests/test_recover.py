"""``recover`` and ``recover=true``: least-squares optimum, error always reduced, reference by path."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import SUBGRAPH_SCOPE, chain_model, conv_model, load, run, subgraph_model

from onnxopt import io, ops, registry
from onnxopt.calibration import Dataset
from onnxopt.compression import packed_from_node, solve_masked
from onnxopt.errors import DataError, PassOptionError, RuntimeLibraryError
from onnxopt.passes.recover import SUBGRAPH_REASON
from onnxopt.weights import constant_array, scan_weights


def make(name, data=None, **options):
    return registry.get(name).create({k: str(v) for k, v in options.items()}, data=data)


def weight(model, name):
    return next(u for u in scan_weights(model, ("MatMul", "Gemm", "Conv")).uses if u.node.name == name).matrix()


def test_single_layer_reaches_least_squares_optimum(tmp_path):
    path = chain_model(tmp_path, (24, 16), gemm_last=False, name="single")
    rng = np.random.default_rng(3)
    mixing = np.eye(24) + rng.standard_normal((24, 24)) / np.sqrt(24)  # correlated: the pruned weights are not optimal
    x = (rng.standard_normal((2000, 24)) @ mixing * np.linspace(0.5, 2.0, 24)).astype(np.float32)
    data = Dataset.from_arrays({"x": x})
    original = load(path)
    w_orig = weight(original, "fc0").astype(np.float64)
    model = load(path)
    pass_ = make("prune", data, sparsity=0.6, recover=True, sparse_op=False, min_elements=1, samples=2000)
    pass_(model)
    layer = pass_.details["recover"]["fc0"]
    assert layer["applied"] and layer["error_after"] < layer["error_before"]
    assert layer["ridge"] is not None and layer["held_out_after"] < layer["held_out_before"]
    # least squares on the kept inputs pulled toward the pruned (= original, kept) weights, at the chosen strength
    x = x.astype(np.float64)
    pull = np.sqrt(layer["ridge"] * np.mean(np.sum(x**2, axis=0)))
    w = weight(model, "fc0")
    target = x @ w_orig
    for col in range(w.shape[1]):
        kept = np.flatnonzero(w[:, col])
        system = np.vstack([x[:, kept], pull * np.eye(kept.size)])
        expected, *_ = np.linalg.lstsq(system, np.r_[target[:, col], pull * w_orig[kept, col]], rcond=None)
        np.testing.assert_allclose(w[kept, col], expected, rtol=2e-3, atol=2e-4)


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
    mixing = np.eye(24) + rng.standard_normal((24, 24)) / np.sqrt(24)  # correlated: fc0's pruned weights are not optimal
    data = Dataset.from_arrays({"x": (rng.standard_normal((1024, 24)) @ mixing).astype(np.float32)})
    model = load(path)
    make("prune", sparsity=0.8, sparse_op=False, min_elements=1)(model)
    pruned = {name: weight(model, name) != 0 for name in ("fc0", "fc1", "fc2")}
    pruned_path = io.save(model, tmp_path / "pruned.onnx")
    feeds = {"x": (rng.standard_normal((64, 24)) @ mixing).astype(np.float32)}
    expected = run(load(path), feeds)[0]
    error_pruned = np.abs(run(model, feeds)[0] - expected).mean()
    recovered = load(pruned_path)
    pass_ = make("recover", data, reference=str(path), samples=1024)
    pass_(recovered)
    layers = pass_.details["layers"]
    assert set(layers) == {"fc0", "fc1", "fc2"}
    for name, layer in layers.items():
        assert layer["error_after"] < layer["error_before"], name
        np.testing.assert_array_equal(weight(recovered, name) != 0, pruned[name])  # mask kept
    assert np.abs(run(recovered, feeds)[0] - expected).mean() < 0.9 * error_pruned


def test_few_rows_keep_the_pruned_weights(tmp_path):
    """Fewer calibration rows than inputs: least squares fits the calibration rows, not the layer; the
    held-out check keeps the pruned weights (or a pull toward them that generalizes about as well)."""
    path = chain_model(tmp_path, (96, 16), gemm_last=False, name="few")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    model = load(path)
    pass_ = make("prune", Dataset.from_arrays({"x": x}), sparsity=0.5, recover=True, sparse_op=False, min_elements=1, samples=64)
    pass_(model)
    layer = pass_.details["recover"]["fc0"]
    assert layer["held_out_after"] <= layer["held_out_before"]
    pruned = load(path)
    make("prune", sparsity=0.5, sparse_op=False, min_elements=1)(pruned)
    w_orig, w_pruned = weight(load(path), "fc0").astype(np.float64), weight(pruned, "fc0").astype(np.float64)
    x = x.astype(np.float64)
    unguarded = solve_masked(x.T @ x, x.T @ (x @ w_orig), len(x), w_pruned != 0)
    fresh = rng.standard_normal((4000, 96))

    def fresh_error(w):
        return np.sum((fresh @ (w - w_orig)) ** 2)

    assert fresh_error(unguarded) > 2 * fresh_error(w_pruned)  # what recovery without the check would do (~5x)
    # the held-out half may pick a slight pull that is a hair worse on fresh rows (0.5 % with some weights)
    assert fresh_error(weight(model, "fc0")) <= fresh_error(w_pruned) * 1.02


def test_conv_layers_recover(tmp_path):
    path, feeds = conv_model(tmp_path)
    noise = np.random.default_rng(6).standard_normal((256, 3, 13, 13))
    smooth = noise[:, :, 1:, 1:] + noise[:, :, :-1, 1:] + noise[:, :, 1:, :-1] + noise[:, :, :-1, :-1]  # correlated pixels
    data = Dataset.from_arrays({"x": smooth.astype(np.float32)})
    model = load(path)
    pass_ = make("prune", data, sparsity=0.7, recover=True, sparse_op=False, min_elements=1, samples=256)
    pass_(model)
    layers = pass_.details["recover"]
    assert {"conv1", "conv2", "fc"} <= set(layers)
    assert all(layer["error_after"] < layer["error_before"] for layer in layers.values())
    assert run(model, feeds)[0].shape == (16, 10)


@pytest.mark.parametrize("maxpool", [False, True])
def test_sparse_conv_recovers_standalone(tmp_path, maxpool):
    """Convs pruned and lowered to ``SparseConv``, then the standalone pass: re-fitted on their im2col rows,
    pattern kept, still SparseConv (with ``maxpool``: conv1 with its Relu and MaxPool folded, re-fitted
    toward the original conv's own output)."""
    path, _ = conv_model(tmp_path, maxpool)
    noise = np.random.default_rng(9).standard_normal((288, 3, 13, 13))
    smooth = (noise[:, :, 1:, 1:] + noise[:, :, :-1, :-1]).astype(np.float32)
    data, feeds = Dataset.from_arrays({"x": smooth[:256]}), {"x": smooth[256:]}  # checked on held-out samples
    model = load(path)
    if maxpool:
        make("fuse")(model)  # BatchNorm into conv1, so that its Relu and MaxPool fold into the SparseConv
    make("prune", sparsity=0.9, op_types="Conv", min_elements=1, min_sparse_ratio=0.5)(model)
    pruned = {n.name: ops.dense_weight(packed_from_node(n)) != 0 for n in model.graph if n.op_type == "SparseConv"}
    assert set(pruned) == {"conv1", "conv2"}
    assert ("maxpool_kernel_shape" in next(n for n in model.graph if n.name == "conv1").attributes) == maxpool
    expected = run(load(path), feeds)[0]
    error_pruned = np.abs(run(model, feeds)[0] - expected).mean()
    recovered = load(io.save(model, tmp_path / "sparse.onnx"))
    pass_ = make("recover", data, reference=str(path), samples=256)
    pass_(recovered)
    layers = pass_.details["layers"]
    for name, mask in pruned.items():
        assert layers[name]["kind"] == "sparseconv" and layers[name]["error_after"] < layers[name]["error_before"]
        node = next(n for n in recovered.graph if n.name == name)
        assert node.op_type == "SparseConv"
        assert ("maxpool_kernel_shape" in node.attributes) == (maxpool and name == "conv1")
        np.testing.assert_array_equal(ops.dense_weight(packed_from_node(node)) != 0, mask)
    assert np.abs(run(recovered, feeds)[0] - expected).mean() < error_pruned
    # the replaced packed inputs leave the file: same initializers, same size as before the re-fit
    assert not [name for name, value in recovered.graph.initializers.items() if not value.uses()]
    size_pruned = (tmp_path / "sparse.onnx").stat().st_size
    assert io.save(recovered, tmp_path / "recovered.onnx").stat().st_size <= size_pruned * 1.01


def test_spatially_split_conv_recovers(tmp_path):
    """``low-rank conv_split=spatial`` then the standalone pass: the horizontal Convs are re-fitted."""
    path, feeds = conv_model(tmp_path)
    noise = np.random.default_rng(8).standard_normal((256, 3, 13, 13))
    data = Dataset.from_arrays({"x": (noise[:, :, 1:, 1:] + noise[:, :, :-1, :-1]).astype(np.float32)})
    model = load(path)
    make("low-rank", rank=3, conv_split="spatial", min_elements=1)(model)
    split_path = io.save(model, tmp_path / "split.onnx")
    recovered = load(split_path)
    pass_ = make("recover", data, reference=str(path), samples=256)
    pass_(recovered)
    layers = pass_.details["layers"]
    assert layers["conv1"]["kind"] == layers["conv2"]["kind"] == "spatialsplit"
    for name in ("conv1", "conv2"):
        assert layers[name]["applied"] and layers[name]["error_after"] < layers[name]["error_before"]
    assert run(recovered, feeds)[0].shape == (16, 10)


def test_recover_needs_data_and_reference(tmp_path):
    path = chain_model(tmp_path, (8, 8))
    with pytest.raises(DataError):
        make("recover", reference=str(path))(load(path))
    with pytest.raises(PassOptionError, match="recover needs the original model"):
        registry.get("recover").create({}, data=Dataset.from_arrays({"x": np.ones((4, 8), np.float32)}))(load(path))


def test_recover_in_a_pipeline_refits_toward_the_model_before_the_lossy_passes(tmp_path):
    """Without ``reference``, a pipeline's ``recover`` re-fits every layer the lossy passes before it
    compressed, toward the model as it was before the first of them (here after a lossless ``fuse``,
    whose renamed layers the reference shares), in one pass."""
    from onnxopt import pipeline
    from onnxopt.pipeline import PassSpec

    path, _ = conv_model(tmp_path)
    noise = np.random.default_rng(9).standard_normal((288, 3, 13, 13))
    smooth = (noise[:, :, 1:, 1:] + noise[:, :, :-1, :-1]).astype(np.float32)
    data, feeds = Dataset.from_arrays({"x": smooth[:256]}), {"x": smooth[256:]}
    specs = [PassSpec("fuse"), PassSpec("prune", {"sparsity": "0.8", "op_types": "Conv", "min_elements": "1"}),
             PassSpec("prune", {"sparsity": "0.6", "op_types": "Gemm"})]
    pruned, _ = pipeline.run_pipeline(load(path), specs, data, numeric_check=False)
    model, report = pipeline.run_pipeline(load(path), [*specs, PassSpec("recover", {"samples": "256"})], data, numeric_check=False)
    layers = report.records[-1].details["layers"]
    assert len(layers) == 3 and all(v["error_after"] < v["error_before"] for v in layers.values())
    with pytest.raises(PassOptionError, match="recover needs the original model"):  # nothing lossy before it
        pipeline.run_pipeline(pruned, [PassSpec("fuse"), PassSpec("recover")], data, numeric_check=False)
    with pytest.raises(PassOptionError, match="no option 'original'"):
        registry.get("recover").create({"original": "x.onnx"})
    expected = run(load(path), feeds)[0]
    assert np.abs(run(model, feeds)[0] - expected).mean() < np.abs(run(pruned, feeds)[0] - expected).mean()


def test_recovered_float16_low_rank_factors_stay_float16(tmp_path):
    path = chain_model(tmp_path, (32, 48, 16), gemm_last=False, name="half")
    model = load(path)
    convert = registry.get("convert-fp16").create({"keep_io_types": "false"})
    convert(model)
    x = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float16)
    pass_ = make("low-rank", Dataset.from_arrays({"x": x}), rank=4, recover=True, min_elements=1)
    pass_(model)
    assert any(v["applied"] for v in pass_.details["recover"].values())
    assert {v.dtype for v in model.graph.initializers.values()} == {ir.DataType.FLOAT16}
    assert run(model, {"x": x[:4]})[0].dtype == np.float16


def test_pipeline_recover_matches_layers_that_had_no_names(tmp_path):
    from onnxopt import pipeline

    proto = onnx.load(chain_model(tmp_path, (32, 48, 16), name="unnamed"))
    for node in proto.graph.node:
        node.name = ""
    onnx.save(proto, tmp_path / "unnamed.onnx")
    x = np.random.default_rng(6).standard_normal((128, 32)).astype(np.float32)
    _, report = pipeline.run_pipeline(load(tmp_path / "unnamed.onnx"), ["prune:sparsity=0.7,sparse_op=false,min_elements=1", "recover"],
                                      Dataset.from_arrays({"x": x}), numeric_check=False)
    layers = report.records[-1].details["layers"]
    assert len(layers) == 2 and all(v["kind"] == "masked" for v in layers.values())


def test_layers_compressed_in_forms_recover_does_not_refit_are_listed(tmp_path):
    """low-rank twice leaves x @ U1 @ U2 @ V (the second U node renamed, as node names must be unique),
    and quantize-weights' blocked DequantizeLinear a computed weight: recover re-fits neither and says so
    (they were left out of its report)."""
    from onnxopt import pipeline

    path = chain_model(tmp_path, (32, 48, 16), gemm_last=False, name="twice")
    x = np.random.default_rng(7).standard_normal((128, 32)).astype(np.float32)
    for passes in (["low-rank:rank=8,min_elements=1", "low-rank:rank=4,min_elements=1"],
                   ["quantize-weights:format=onnx,block_size=16,min_elements=1"]):
        _, report = pipeline.run_pipeline(load(path), [*passes, "recover"], Dataset.from_arrays({"x": x}), numeric_check=False)
        layers = report.records[-1].details["layers"]
        assert layers and all(v["kind"] == "skipped" and "does not re-fit" in v["reason"] for v in layers.values()), layers


@pytest.mark.parametrize("target", ["model", "layer"])
def test_layers_narrowed_by_structured_pruning_are_listed_not_refit(tmp_path, target):
    """prune-structured removes fc0's outputs and fc1's inputs, low-rank then factors every layer: the
    original fc0 (48 outputs) and fc1 (48 inputs) cannot be the targets of the narrowed ones. recover says
    so instead of failing, and re-fits fc2."""
    from onnxopt import pipeline
    from onnxopt.filters import NodeFilter
    from onnxopt.pipeline import PassSpec

    path = chain_model(tmp_path, (32, 48, 48, 16), gemm_last=False, name="narrowed")
    x = np.random.default_rng(8).standard_normal((128, 32)).astype(np.float32)
    passes = [PassSpec("prune-structured", {"ratio": "0.5"}, NodeFilter(name_regex="^fc0$")),
              "low-rank:rank=4,min_elements=1", f"recover:target={target}"]
    model, report = pipeline.run_pipeline(load(path), passes, Dataset.from_arrays({"x": x}), numeric_check=False)
    layers = report.records[-1].details["layers"]
    reshaped = {name for name, v in layers.items() if v["kind"] == "skipped" and "differs from the reference" in v["reason"]}
    assert reshaped == {"fc0", "fc1"} and layers["fc2"]["kind"] == "lowrank", layers
    assert run(model, {"x": x[:4]})[0].shape == (4, 16)


@pytest.mark.parametrize("target", ["model", "layer"])
def test_target_sets_what_each_layer_reproduces(tmp_path, target):
    """``model``: fc1 is fitted to the original model's fc1 output (x_o W_o); ``layer``: to the original fc1
    weight applied to the pruned model's own fc1 input (x_c W_o). The reported error before the re-fit
    shows which one was used."""
    path = chain_model(tmp_path, (24, 64, 16), gemm_last=False, name="target")
    x = np.random.default_rng(7).standard_normal((64, 24)).astype(np.float32)
    original = load(path)
    model = load(path)
    make("prune", sparsity=0.7, sparse_op=False, min_elements=1)(model)
    w0, w1 = weight(model, "fc0"), weight(model, "fc1")
    o0, o1 = weight(original, "fc0"), weight(original, "fc1")
    b0 = model.graph.initializers["b0"].const_value.numpy()
    h_c, h_o = np.maximum(x @ w0 + b0, 0), np.maximum(x @ o0 + b0, 0)
    goal = (h_o if target == "model" else h_c) @ o1
    expected = np.sum((h_c @ w1 - goal) ** 2) / np.sum(goal**2)
    pass_ = make("recover", Dataset.from_arrays({"x": x}), samples=64, target=target)
    pass_.original = original
    pass_(model)
    assert pass_.details["layers"]["fc1"]["error_before"] == pytest.approx(expected, rel=1e-3)
    with pytest.raises(PassOptionError):
        make("recover", target="network")


def compress(path, how, data, recover):
    """The model at ``path`` compressed by ``how`` (``recover``: pruned, then the standalone pass) and the
    recovery details."""
    model = load(path)
    if how == "recover":
        make("prune", sparsity=0.7, sparse_op=False, min_elements=1)(model)
        if not recover:
            return model, None
        pass_ = make("recover", data, reference=str(path), samples=256)
        pass_(model)
        return model, pass_.details["layers"]
    options = {"prune": {"sparsity": 0.7, "sparse_op": False}, "low-rank": {"rank": 6}, "binarize": {"keep_first_last": False}}
    pass_ = make(how, data, recover=recover, min_elements=1, samples=256, **options[how])
    try:
        pass_(model)
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")
    return model, pass_.details.get("recover")


def subgraph_constants(model):
    """The constant inputs of every node inside a subgraph, in order."""
    return [constant_array(v) for g in model.graph.subgraphs() for n in g for v in n.inputs if v is not None and v.const_value is not None]


def main_node(model, name):
    return next(n for n in model.graph if n.name == name)


def output_error(model, expected, feeds):
    try:
        return np.abs(run(model, feeds)[0] - expected).mean()
    except RuntimeLibraryError:
        pytest.skip("onnxopt kernel library not built")


@pytest.mark.parametrize("how", ["prune", "low-rank", "binarize", "recover"])
@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_layers_are_listed_and_left_as_compressed(tmp_path, kind, how):
    """Main-graph layers are re-fitted; the compressed layer inside the If branch / Loop body / Scan body,
    whose input onnxruntime cannot expose, is listed by its path as skipped (the standalone pass listed
    nothing) and keeps its compressed weights; the model runs closer to the original than unrecovered."""
    path, data, feeds = subgraph_model(tmp_path, kind)
    compressed, _ = compress(path, how, data, recover=False)
    model, layers = compress(path, how, data, recover=True)
    inner = SUBGRAPH_SCOPE[kind] + "sub"
    assert set(layers) == {"fc0", "fc1", "fc2", inner}
    assert layers[inner] == {"kind": "skipped", "reason": SUBGRAPH_REASON}
    for name in ("fc0", "fc1", "fc2"):
        assert layers[name]["applied"] and layers[name]["error_after"] < layers[name]["error_before"], name
    kept = subgraph_constants(compressed)
    assert kept and not any(np.array_equal(a, b) for a, b in zip(kept, subgraph_constants(load(path))))  # compressed
    for got, want in zip(subgraph_constants(model), kept, strict=True):
        np.testing.assert_array_equal(got, want)
    expected = run(load(path), feeds)[0]
    assert output_error(model, expected, feeds) < output_error(compressed, expected, feeds)


@pytest.mark.parametrize("how", ["prune", "binarize"])
@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_layer_named_like_a_main_layer(tmp_path, kind, how):
    """A subgraph layer named ``fc0`` like the main graph's first layer: the main fc0 is fitted to the
    original main fc0 (was matched to the subgraph's: prune left fc0 unrecovered, binarize fitted it to
    ``h @ W_sub`` in the If case and failed to capture the Loop/Scan body's input), the other is listed."""
    path, data, feeds = subgraph_model(tmp_path, kind, layer="fc0")
    compressed, _ = compress(path, how, data, recover=False)
    model, layers = compress(path, how, data, recover=True)
    node = main_node(compressed, "fc0")
    w_c = ops.dense_weight(packed_from_node(node)) if how == "binarize" else constant_array(node.inputs[1])
    x = data.sources[0]["x"].astype(np.float64)
    target = x @ constant_array(main_node(load(path), "fc0").inputs[1])
    expected_before = np.sum((x @ w_c - target) ** 2) / np.sum(target**2)
    assert layers["fc0"]["error_before"] == pytest.approx(expected_before, rel=1e-3)
    assert layers["fc0"]["applied"] and layers["fc0"]["error_after"] < layers["fc0"]["error_before"]
    assert layers[SUBGRAPH_SCOPE[kind] + "fc0"] == {"kind": "skipped", "reason": SUBGRAPH_REASON}
    for got, kept in zip(subgraph_constants(model), subgraph_constants(compressed), strict=True):
        np.testing.assert_array_equal(got, kept)
    expected = run(load(path), feeds)[0]
    assert output_error(model, expected, feeds) < output_error(compressed, expected, feeds)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_weight_shared_with_a_subgraph_layer(tmp_path, kind):
    """w1 (main graph) is read by fc1 and by the subgraph layer, pruned in place for both: the re-fit gives
    fc1 its own weight (mask kept) and the subgraph layer still reads the pruned w1."""
    path, data, feeds = subgraph_model(tmp_path, kind, shared=True)
    model = load(path)
    for name in ("w0", "w1", "w2"):
        w = model.graph.initializers[name].const_value.numpy()
        w = np.where(np.abs(w) >= np.quantile(np.abs(w), 0.7), w, 0).astype(np.float32)
        model.graph.initializers[name].const_value = ir.tensor(w, name=name)
    pruned = load(io.save(model, tmp_path / "pruned.onnx"))
    w1 = constant_array(model.graph.initializers["w1"])
    pass_ = make("recover", data, reference=str(path), samples=256)
    pass_(model)
    layers = pass_.details["layers"]
    assert layers[SUBGRAPH_SCOPE[kind] + "sub"] == {"kind": "skipped", "reason": SUBGRAPH_REASON}
    assert all(layers[name]["applied"] for name in ("fc0", "fc1", "fc2"))
    inner = next(n for g in model.graph.subgraphs() for n in g if n.name == "sub")
    fc1 = main_node(model, "fc1")
    assert inner.inputs[1] is model.graph.initializers["w1"] and fc1.inputs[1] is not inner.inputs[1]
    np.testing.assert_array_equal(constant_array(inner.inputs[1]), w1)
    np.testing.assert_array_equal(constant_array(fc1.inputs[1]) != 0, w1 != 0)
    expected = run(load(path), feeds)[0]
    assert output_error(model, expected, feeds) < output_error(pruned, expected, feeds)
