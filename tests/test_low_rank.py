"""``low-rank``: full rank reproduces, rank selection, activation-aware SVD, recovery, Conv spatial split."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_graphs import ELSE_MATMUL, SUB_MATMUL, assert_names_unique, chain_model, conv_model, load, mixed_model, run, subgraph_model, tied_model
from onnx import TensorProto, helper, numpy_helper

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
    assert all("kept dense" in details["layers"][name] for name in ("fc1", "fc2", "shared_a", SUB_MATMUL))
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
    assert {"fc1", "shared_a", "shared_b", SUB_MATMUL, ELSE_MATMUL} <= {
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


def test_keep_first_last_leaves_edge_layers_whole(tmp_path):
    path = chain_model(tmp_path, (64, 96, 96, 10), name="edges")
    model = load(path)
    layers = low_rank(model, rank=4, min_elements=1, keep_first_last=True).details["layers"]
    assert layers["fc0"] == layers["fc2"] == "kept dense (first or last layer)"
    assert layers["fc1"].startswith("rank 4 of 96")
    assert {n.name for n in model.graph if n.name.endswith(".lowrank_u")} == {"fc1.lowrank_u"}
    layers = low_rank(load(path), rank=4, min_elements=1).details["layers"]
    assert all(layers[name].startswith("rank 4") for name in ("fc0", "fc1", "fc2"))


def test_shared_weights_are_factored_only_when_that_shrinks_them(tmp_path):
    path = tied_model(tmp_path)
    layers = low_rank(load(path), ratio=0.5, min_elements=1).details["layers"]
    assert layers["lm_head"] == "kept dense (weight also read by Gather 'emb')"
    path, _ = mixed_model(tmp_path, k=32, hidden=48, n=24)  # shared_a, shared_b: one 48x48 weight
    layers = low_rank(load(path), rank=12, min_elements=1).details["layers"]
    assert layers["shared_a"] == "kept dense (rank 12 for each of 2 layers sharing the weight: 2304 >= 2304 parameters)"
    assert layers["fc1"].startswith("rank 12")


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_shared_weight_counts_once_in_the_ratio(tmp_path, allocation):
    """Two layers sharing a 48x48 weight split its parameter budget: their factors together keep the ratio."""
    path, feeds = mixed_model(tmp_path, k=32, hidden=48, n=24)
    model = load(path)
    options = {"ratio": "0.4", "allocation": allocation, "min_elements": "1"}
    registry.get("low-rank").create(options, node_filter=NodeFilter(name_regex="^shared_"))(model)
    factors = [v for name, v in model.graph.initializers.items() if "_lowrank_" in name]
    assert len(factors) == 4  # U and V of shared_a and of shared_b
    assert sum(v.const_value.size for v in factors) <= 0.4 * 48 * 48
    assert run(model, feeds)[0].shape == run(load(path), feeds)[0].shape


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
    for options in ({"ratio": "0"}, {"rank": "0"}, {"energy": "2"}, {"conv_split": "channel"}, {"damping": "-1"}):
        with pytest.raises(PassOptionError):
            registry.get("low-rank").create(options)


def test_global_allocation_keeps_budget_and_favors_slow_spectra():
    flat = np.ones(64)  # every rank equally useful
    steep = np.r_[np.ones(3), np.full(61, 1e-3)]  # three ranks hold all the energy
    ranks = allocate_ranks([((64, 64), flat, 1), ((64, 64), steep, 1)], 0.25)
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


def conv_graph(tmp_path, convs, x_shape=(4, 6, 15, 14), name="convs"):
    """Convs ``(name, weight, bias or None, attributes)`` in parallel on ``x`` (NCHW), each a graph output.

    A weight given as a string is a graph input of that name and shape ``attributes.pop("shape")``.
    """
    nodes, inits, inputs, outputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], []
    for layer, weight, bias, attrs in convs:
        attrs = dict(attrs)
        x = attrs.pop("input", "x")
        if isinstance(weight, str):
            inputs.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, attrs.pop("shape")))
        else:
            inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{layer}_w"))
            weight = f"{layer}_w"
        names = [x, weight]
        if bias is not None:
            inits.append(numpy_helper.from_array(bias.astype(np.float32), f"{layer}_b"))
            names.append(f"{layer}_b")
        nodes.append(helper.make_node("Conv", names, [f"{layer}_out"], name=layer, **attrs))
        outputs.append(helper.make_tensor_value_info(f"{layer}_out", TensorProto.FLOAT, None))
    if any(n.input[0] == "x1d" for n in nodes):
        inputs.append(helper.make_tensor_value_info("x1d", TensorProto.FLOAT, x_shape[:3]))
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def spatial_rank_weight(c_out, c_in, kh, kw, rank, rng):
    """A Conv weight whose (C_in·kh, C_out·kw) view has exactly ``rank``."""
    m = rng.standard_normal((c_in * kh, rank)) @ rng.standard_normal((rank, c_out * kw)) / np.sqrt(rank * c_in * kh)
    return m.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3)


GEOMETRIES = {
    "plain": {},
    "stride2_pad1": {"strides": [2, 2], "pads": [1, 1, 1, 1]},
    "asymmetric_pads": {"pads": [0, 2, 1, 0], "strides": [1, 2]},
    "dilation": {"dilations": [2, 3], "pads": [2, 1, 1, 2]},
    "stride_h": {"strides": [2, 1], "pads": [1, 0, 0, 0]},
}


def test_conv_split_at_full_rank_reproduces(tmp_path):
    """A weight of spatial rank 3 split at rank 3 (its full rank; a random weight at min(K, N) would not
    pay and stay dense): every geometry, kernels 3x3, 5x3 and 1x3, with and without bias."""
    rng = np.random.default_rng(20)
    convs = []
    for i, (geometry, attrs) in enumerate(GEOMETRIES.items()):
        kh, kw = [(3, 3), (5, 3), (1, 3)][i % 3]
        bias = None if i % 2 else rng.standard_normal(16)
        convs.append((geometry, spatial_rank_weight(16, 6, kh, kw, 3, rng), bias, attrs))
    path = conv_graph(tmp_path, convs)
    feeds = {"x": rng.standard_normal((4, 6, 15, 14)).astype(np.float32)}
    expected = run(load(path), feeds)
    model = load(path)
    details = low_rank(model, rank=3, conv_split="spatial", min_elements=1).details
    for geometry in GEOMETRIES:
        assert details["layers"][geometry].startswith("rank 3 of"), details["layers"][geometry]
    nodes = {n.name: n for n in model.graph}
    vertical, horizontal = nodes["dilation.lowrank_u"], nodes["dilation"]
    assert vertical.op_type == "Conv" and horizontal.inputs[0] is vertical.outputs[0]
    assert list(vertical.attributes.get_ints("pads")) == [2, 0, 1, 0] and list(horizontal.attributes.get_ints("pads")) == [0, 1, 0, 2]
    assert vertical.inputs[1].const_value.shape == (3, 6, 3, 1) and horizontal.inputs[1].const_value.shape == (16, 3, 1, 3)
    for got, want in zip(run(model, feeds), expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_conv_split_skips_with_reasons(tmp_path):
    rng = np.random.default_rng(21)
    convs = [
        ("grouped", rng.standard_normal((8, 3, 3, 3)), None, {"group": 2}),
        ("same", rng.standard_normal((8, 6, 3, 3)), None, {"auto_pad": "SAME_UPPER"}),
        ("valid", rng.standard_normal((8, 6, 3, 3)), None, {"auto_pad": "VALID"}),
        ("pointwise", rng.standard_normal((8, 6, 1, 1)), None, {}),
        ("conv1d", rng.standard_normal((8, 6, 3)), None, {"input": "x1d"}),
        ("dynamic", "w_in", None, {"shape": [8, 6, 3, 3]}),
        ("tiny_rank", rng.standard_normal((2, 6, 3, 3)), None, {}),  # K=18, N=6: rank 5 costs 120 >= 108
        ("split", rng.standard_normal((32, 6, 3, 3)), None, {}),
    ]
    path = conv_graph(tmp_path, convs)
    model = load(path)
    layers = low_rank(model, rank=5, conv_split="spatial", min_elements=1).details["layers"]
    assert layers["grouped"] == "grouped convolution"
    assert "auto_pad SAME_UPPER" in layers["same"] and "auto_pad VALID" in layers["valid"]
    assert "1x1 kernel" in layers["pointwise"]
    assert layers["conv1d"] == "weight of rank 3"
    assert layers["dynamic"] == "weight is not a constant"
    assert layers["tiny_rank"].startswith("kept dense (rank 5")
    assert layers["split"].startswith("rank 5 of 18")
    assert [n.name for n in model.graph if n.name.endswith(".lowrank_u")] == ["split.lowrank_u"]
    untouched = load(path)
    low_rank(untouched, rank=5, min_elements=1)  # conv_split=none: Convs are not the pass's layers
    assert not any(n.name.endswith(".lowrank_u") for n in untouched.graph)


def test_conv_split_error_decreases_with_rank(tmp_path):
    rng = np.random.default_rng(22)
    path = conv_graph(tmp_path, [("conv", rng.standard_normal((24, 6, 3, 3)), rng.standard_normal(24), {"pads": [1, 1, 1, 1]})])
    feeds = {"x": rng.standard_normal((4, 6, 15, 14)).astype(np.float32)}
    expected = run(load(path), feeds)[0]
    errors = []
    for rank in (1, 2, 4, 8, 14):  # K = 18, N = 72: rank 14 is the last that pays
        model = load(path)
        low_rank(model, rank=rank, conv_split="spatial", min_elements=1)
        errors.append(np.linalg.norm(run(model, feeds)[0] - expected) / np.linalg.norm(expected))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def smooth_images(count, rng, channels=3, size=12):
    noise = rng.standard_normal((count, channels, size + 1, size + 1))
    return (noise[:, :, 1:, 1:] + noise[:, :, :-1, 1:] + noise[:, :, 1:, :-1] + noise[:, :, :-1, :-1]).astype(np.float32)


def test_conv_split_activation_aware_and_recover(tmp_path):
    path, _ = conv_model(tmp_path)  # conv1 3->16 pad 1, conv2 16->8 unpadded, fc
    rng = np.random.default_rng(23)
    data = Dataset.from_arrays({"x": smooth_images(512, rng)})
    feeds = {"x": smooth_images(64, rng)}
    expected = run(load(path), feeds)[0]

    def output_error(model):
        return np.linalg.norm(run(model, feeds)[0] - expected) / np.linalg.norm(expected)

    errors, details = {}, {}
    for how, options in (("plain", {}), ("aware", {"activation_aware": True}), ("recovered", {"recover": True})):
        model = load(path)
        details[how] = low_rank(model, data, rank=2, conv_split="spatial", min_elements=1, samples=512, **options).details
        errors[how] = output_error(model)
    assert details["aware"]["layers"]["conv2"].startswith("rank 2 of 24 (activation-aware)")
    assert errors["aware"] < errors["plain"]
    recovered = details["recovered"]["recover"]
    assert recovered["conv2"]["kind"] == "spatialsplit"
    for name in ("conv1", "conv2"):
        assert recovered[name]["error_after"] < recovered[name]["error_before"], recovered[name]
    assert errors["recovered"] < errors["plain"]


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_layer_named_like_a_main_layer(tmp_path, kind):
    """Both layers named fc0 get factored; their U outputs get distinct names (both were 'fc0.lowrank_u',
    which onnxruntime refuses), and the model computes the original with each weight replaced by U·V."""
    path, _, feeds = subgraph_model(tmp_path, kind, layer="fc0")
    model = load(path)
    low_rank(model, rank=4, min_elements=1)
    u_nodes = [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.name == "fc0.lowrank_u"]
    assert len(u_nodes) == 2 and len({n.outputs[0].name for n in u_nodes}) == 2
    reference = load(path)
    for graph, ref_graph in [(model.graph, reference.graph), *zip(model.graph.subgraphs(), reference.graph.subgraphs())]:
        for name in [n.removesuffix("_lowrank_u") for n in graph.initializers if n.endswith("_lowrank_u")]:
            u, v = (graph.initializers[f"{name}_lowrank_{f}"].const_value.numpy() for f in "uv")
            ref_graph.initializers[name].const_value = ir.tensor(u @ v)
    np.testing.assert_allclose(run(model, feeds)[0], run(reference, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pass_name", ["low-rank", "prune"])
def test_weight_read_in_main_graph_then_branch_gets_unique_names(tmp_path, pass_name):
    """Main MatMul 'a' reads w before an If branch's MatMul 'b' does: each gets its own factors (its own
    pruned copy), and the branch's no longer reuse the main graph's names."""
    rng = np.random.default_rng(3)
    info = lambda name, dims, t=TensorProto.FLOAT: helper.make_tensor_value_info(name, t, dims)  # noqa: E731
    then = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["t"], name="b")], "then", [], [info("t", ["B", 64])])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["e"])], "else", [], [info("e", ["B", 64])])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="a"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [info("x", ["B", 64]), info("cond", [], TensorProto.BOOL)], [info("y", ["B", 64])],
                              [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    model = load(path)
    options = {"rank": "2"} if pass_name == "low-rank" else {"sparsity": "0.5", "sparse_op": "false"}
    registry.get(pass_name).create({**options, "min_elements": "1"})(model)
    assert_names_unique(model)
    feeds = {"x": rng.standard_normal((3, 64)).astype(np.float32), "cond": np.array(True)}
    assert run(model, feeds)[0].shape == (3, 64)
