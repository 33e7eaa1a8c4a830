"""Small graphs for the compression-pass tests (prune, low-rank, binarize, recover)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt import io, runtime
from onnxopt.calibration import Dataset

RNG = np.random.default_rng(0)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


SUB_MATMUL, ELSE_MATMUL = "branch/then_branch/sub_matmul", "branch/else_branch/else_matmul"
"""Report labels of :func:`mixed_model`'s If-branch layers."""


def mixed_model(tmp_path, k: int = 32, hidden: int = 48, n: int = 24):
    """x (B, k) -> MatMul(Constant-node weight) -> Relu -> Gemm(transB, alpha, beta, bias) -> Relu ->
    two MatMuls sharing one weight, added -> If(cond) { MatMul } else { Identity } -> y.

    Returns (path, feeds).
    """
    w1 = RNG.standard_normal((k, hidden)) / np.sqrt(k)
    w2 = RNG.standard_normal((hidden, hidden)) / np.sqrt(hidden)  # Gemm B, transB=1 -> (N, K)
    b2 = RNG.standard_normal(hidden) * 0.1
    shared = RNG.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    w_sub = RNG.standard_normal((hidden, n)) / np.sqrt(hidden)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["s", "w_sub"], ["t_out"], name="sub_matmul")],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["B", n])], [_init("w_sub", w_sub)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["s", "w_else"], ["e_mm"], name="else_matmul"),
         helper.make_node("Neg", ["e_mm"], ["e_out"], name="else_neg")],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["B", n])], [_init("w_else", -w_sub)],
    )
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=_init("w1", w1)),
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w2", "b2"], ["h2"], name="fc2", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Relu", ["h2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "shared"], ["p"], name="shared_a"),
        helper.make_node("Tanh", ["a2"], ["a2t"]),
        helper.make_node("MatMul", ["a2t", "shared"], ["q"], name="shared_b"),
        helper.make_node("Add", ["p", "q"], ["s"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
        [_init("w2", w2.T), _init("b2", b2), _init("shared", shared)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "mixed.onnx"
    onnx.save(model, path)
    feeds = {"x": RNG.standard_normal((64, k)).astype(np.float32), "cond": np.array(True)}
    return path, feeds


def chain_model(tmp_path, sizes=(24, 64, 64, 16), gemm_last: bool = True, name: str = "chain"):
    """x -> [MatMul + bias Add -> Relu] ... -> last layer (Gemm with bias, or MatMul). Layers fc0, fc1, ..."""
    nodes, inits, current = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = RNG.standard_normal((k, n)) / np.sqrt(k)
        b = RNG.standard_normal(n) * 0.1
        last = i == len(sizes) - 2
        out = "y" if last else f"a{i}"
        if last and gemm_last:
            inits += [_init(f"w{i}", w), _init(f"b{i}", b)]
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], name=f"fc{i}"))
        else:
            inits += [_init(f"w{i}", w), _init(f"b{i}", b)]
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"h{i}", f"b{i}"], [f"z{i}" if not last else out]))
            if not last:
                nodes.append(helper.make_node("Relu", [f"z{i}"], [out]))
        current = out
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", sizes[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def conv_model(tmp_path, maxpool: bool = False):
    """x (B, 3, 12, 12) -> Conv(3->16, 3x3, pad 1) + BN -> Relu [-> MaxPool 2x2, stride 1] -> Conv(16->8, 3x3)
    -> Flatten -> Gemm -> y."""
    side = 9 if maxpool else 10
    w1 = RNG.standard_normal((16, 3, 3, 3)) / 5
    w2 = RNG.standard_normal((8, 16, 3, 3)) / 12
    wf = RNG.standard_normal((8 * side * side, 10)) / 28
    nodes = [
        helper.make_node("Conv", ["x", "w1", "cb1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"]),
        *([helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2])] if maxpool else []),
        helper.make_node("Conv", ["p1" if maxpool else "r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Flatten", ["c2"], ["f"]),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc"),
    ]
    inits = [
        _init("w1", w1), _init("cb1", RNG.standard_normal(16) * 0.1), _init("g", 1 + RNG.random(16)),
        _init("beta", RNG.standard_normal(16) * 0.1), _init("mean", RNG.standard_normal(16) * 0.1),
        _init("var", 0.5 + RNG.random(16)), _init("w2", w2), _init("wf", wf), _init("bf", np.zeros(10)),
    ]
    graph = helper.make_graph(
        nodes, "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 10])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    return path, {"x": RNG.standard_normal((16, 3, 12, 12)).astype(np.float32)}


def tied_model(tmp_path, vocab: int = 256, dim: int = 64):
    """ids -> Gather(E) (emb) -> Gemm(·, E, transB) (lm_head): one weight read by an embedding and a layer."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"], name="emb"),
        helper.make_node("Gemm", ["h", "E"], ["y"], name="lm_head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", vocab])],
        [_init("E", RNG.standard_normal((vocab, dim)))],
    )
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


SUBGRAPH_SCOPE = {"If": "branch/then_branch/", "Loop": "loop/body/", "Scan": "scan/body/"}
"""Label prefix of :func:`subgraph_model`'s subgraph layer, per container."""


def subgraph_model(tmp_path, kind: str, layer: str = "sub", shared: bool = False):
    """x (B, 16) -> fc0 -> Relu -> h -> If / Loop / Scan holding the MatMul ``layer`` -> g -> fc1 (w1) -> Relu
    -> fc2 -> y. If: ``layer`` in the then-branch (taken: ``cond`` is fed True), Identity in the else-branch;
    Loop: two steps of v = tanh(v @ W); Scan: h row by row. ``shared``: ``layer`` reads fc1's main-graph w1.

    Returns (path, calibration Dataset of 256 rows, feeds of 64 other rows).
    """
    rng, hidden = np.random.default_rng(12), 32

    def init(name, array, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(array, dtype), name)

    def info(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor_value_info(name, dtype, shape)

    w_in, inner = ("w1", []) if shared else ("w_sub", [init("w_sub", rng.standard_normal((hidden, hidden)) / np.sqrt(hidden))])
    inputs, before, after = [info("x", ["B", 16])], [], []
    if kind == "If":
        then = helper.make_graph([helper.make_node("MatMul", ["h", w_in], ["t"], name=layer)], "then", [], [info("t", ["B", hidden])], inner)
        other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [], [info("e", ["B", hidden])])
        container = helper.make_node("If", ["cond"], ["g"], name="branch", then_branch=then, else_branch=other)
        inputs.append(info("cond", [], TensorProto.BOOL))
    elif kind == "Loop":
        body = helper.make_graph(
            [helper.make_node("MatMul", ["v", w_in], ["m"], name=layer), helper.make_node("Tanh", ["m"], ["v_out"]),
             helper.make_node("Identity", ["c"], ["c_out"])], "body",
            [info("i", [], TensorProto.INT64), info("c", [], TensorProto.BOOL), info("v", ["B", hidden])],
            [info("c_out", [], TensorProto.BOOL), info("v_out", ["B", hidden])], inner)
        container = helper.make_node("Loop", ["steps", "", "h"], ["g"], name="loop", body=body)
    else:
        body = helper.make_graph([helper.make_node("MatMul", ["row", w_in], ["m"], name=layer)], "body",
                                 [info("row", [1, hidden])], [info("m", [1, hidden])], inner)
        container = helper.make_node("Scan", ["h3"], ["g3"], name="scan", body=body, num_scan_inputs=1)
        before, after = [helper.make_node("Unsqueeze", ["h", "axis"], ["h3"])], [helper.make_node("Squeeze", ["g3", "axis"], ["g"])]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["z0"], name="fc0"), helper.make_node("Relu", ["z0"], ["h"]),
             *before, container, *after,
             helper.make_node("MatMul", ["g", "w1"], ["z1"], name="fc1"), helper.make_node("Relu", ["z1"], ["a1"]),
             helper.make_node("MatMul", ["a1", "w2"], ["y"], name="fc2")]
    inits = [init("w0", rng.standard_normal((16, hidden)) / 4), init("w1", rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)),
             init("w2", rng.standard_normal((hidden, 8)) / np.sqrt(hidden)), init("steps", 2, np.int64), init("axis", [1], np.int64)]
    graph = helper.make_graph(nodes, kind, inputs, [info("y", ["B", 8])], inits)
    path = tmp_path / f"{kind}_{layer}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    mixing = np.eye(16) + rng.standard_normal((16, 16)) / 4  # correlated inputs: the compressed weights are not optimal
    x = (rng.standard_normal((320, 16)) @ mixing).astype(np.float32)
    cond = {"cond": np.array(True)} if kind == "If" else {}
    return path, Dataset.from_arrays({"x": x[:256], **cond}), {"x": x[256:], **cond}


def assert_names_unique(model: ir.Model) -> None:
    """No two values of the model, subgraphs included, share a name (onnxruntime: "SSA form")."""
    values = {
        v for g in model.graphs() for v in (*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs))
    }
    names = collections.Counter(v.name for v in values)
    assert not [name for name, count in names.items() if count > 1]


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an onnx_ir model (or path) with onnxruntime on the feeds it declares."""
    sess = runtime.session(model)
    wanted = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in wanted})


def load(path):
    return io.load(path)
