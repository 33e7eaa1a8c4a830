"""The ai.onnxopt custom-op kernels against the numpy references of onnxopt.ops.

Every op and value/scale dtype, shapes M in {1, 3, 128}, K in {1, 63, 64, 65, 1000}, N odd and
even, 1 and 2 intra-op threads, each ISA level this CPU supports (forced with ONNXOPT_ISA before
the session is created), plus malformed inputs that must fail with a clear onnxruntime error.
Skips only when the kernels library is not built.
"""

from __future__ import annotations

import os
import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import ops

try:
    from onnxopt.kernels import available_isa, isa_level, library_path

    LIB = str(library_path())
except FileNotFoundError as exc:  # pragma: no cover - depends on the build
    pytest.skip(f"onnxopt kernels library not built: {exc}", allow_module_level=True)

import onnxruntime as ort

ISAS = available_isa()
KS = (1, 63, 64, 65, 1000)
MS = (1, 3, 128)
NS = (7, 16)  # odd (not a multiple of 8/16) and even


def _session(model: onnx.ModelProto | bytes, threads: int = 1) -> ort.InferenceSession:
    try:
        from onnxopt.runtime import session
    except ImportError:  # pragma: no cover - before the lead's runtime module existed
        so = ort.SessionOptions()
        so.register_custom_ops_library(LIB)
        so.intra_op_num_threads = threads
        data = model if isinstance(model, bytes) else model.SerializeToString()
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return session(model, threads=threads)


def _model(packed: ops.PackedWeight, bias: np.ndarray | None, lead=("m",), check: bool = True, x_shape=None) -> onnx.ModelProto:
    x = ir.Value(name="X", shape=ir.Shape(x_shape or [*lead, packed.K]), type=ir.TensorType(ir.DataType.FLOAT))
    b = None
    if bias is not None:
        b = ir.Value(name="bias", shape=ir.Shape([packed.N]), type=ir.TensorType(ir.DataType.FLOAT),
                     const_value=ir.tensor(bias, name="bias"))
    node, inits = ops.make_node(packed, x, b, name="op")
    g = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 17, ops.DOMAIN: 1}, name="g")
    for v in [*inits, *([b] if b is not None else [])]:
        g.register_initializer(v)
    proto = ir.to_proto(ir.Model(g, ir_version=10))
    if check:
        onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("ONNXOPT_ISA", request.param)
    return request.param


def _packers():
    out = [
        ("binary", lambda w: ops.pack_binary_matmul(w)),
        ("xnor", lambda w: ops.pack_xnor_matmul(w)),
    ]
    for vd in ("float32", "float16", "int8"):
        out.append((f"sparse-{vd}", lambda w, vd=vd: ops.pack_sparse_matmul(w, vd)))
    for bits in (4, 8):
        for bs in (32, 64, 128):
            for sym in (True, False):
                for sd in ("float32", "float16"):
                    name = f"quant-int{bits}-b{bs}-{'sym' if sym else 'asym'}-{sd}"
                    out.append((name, lambda w, a=(bits, bs, sym, sd): ops.pack_quant_matmul(w, *a)))
    return out


PACKERS = _packers()


def _weight(name: str, rng, K: int, N: int) -> np.ndarray:
    w = rng.standard_normal((K, N)).astype(np.float32)
    if name.startswith("sparse"):
        w *= rng.random((K, N)) < 0.3
    return w


def _check(y: np.ndarray, r: np.ndarray, what: str) -> None:
    assert y.shape == r.shape, what
    if r.size == 0:
        return
    scale = float(np.abs(r).max()) + 1e-6
    err = float(np.abs(y.astype(np.float64) - r).max()) / scale
    assert err < 2e-4, f"{what}: max rel err {err:.3g}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name,pack", PACKERS, ids=[p[0] for p in PACKERS])
def test_op_matches_numpy(isa, threads, name, pack):
    rng = np.random.default_rng(abs(hash((name, threads, isa))) % 2**32)
    assert isa_level() == isa
    for K in KS:
        for N in NS:
            w = _weight(name, rng, K, N)
            packed = pack(w)
            if name.startswith("sparse") and K % 2:  # a folded ReLU on every M path
                packed.attributes["activation"] = "relu"
            bias = rng.standard_normal(N).astype(np.float32) if (K + N) % 2 else None
            sess = _session(_model(packed, bias), threads=threads)
            for M in MS:
                x = rng.standard_normal((M, K)).astype(np.float32)
                y = sess.run(None, {"X": x})[0]
                _check(y, ops.reference(packed, x, bias), f"{name} isa={isa} t={threads} M={M} K={K} N={N}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
def test_sparse_row_walk_on_zero_rich_inputs(isa, threads, value_dtype):
    """Small-M inputs with many exact zeros (post-ReLU) take the row walk over a CSR copy of the
    weight; inputs with few zeros, and then the same session again, keep the column path."""
    rng = np.random.default_rng(abs(hash((value_dtype, threads, isa))) % 2**32)
    # the copy holds uint16 byte offsets up to N = 16383 (its padding's sink at 4 * 16383), uint32 columns above
    for K, N in ((1, 7), (65, 16), (1000, 7), (20, 16383), (20, 16384), (40, 70000)):
        w = _weight("sparse", rng, K, N)
        packed = ops.pack_sparse_matmul(w, value_dtype)
        bias = rng.standard_normal(N).astype(np.float32)
        sess = _session(_model(packed, bias), threads=threads)
        for M, zeros in ((1, 0.6), (3, 0.3), (3, 0.0), (15, 1.0), (1, 0.6)):
            x = rng.standard_normal((M, K)).astype(np.float32) * (rng.random((M, K)) >= zeros)
            y = sess.run(None, {"X": x})[0]
            _check(y, ops.reference(packed, x, bias), f"{value_dtype} isa={isa} t={threads} M={M} K={K} N={N} zeros={zeros}")


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_row_walk_dense_rows(isa, threads, monkeypatch):
    """The walk keeps rows at least a fifth full (of N rounded up to 64) dense: rows on both sides of
    that line, mixed in any order, in every task's share of K (K >= 1024: four tasks), N on and off
    whole chunks of 64, a copy over 4 MB (where only full rows are kept dense), and an infinite input
    on a sparse row (which stays inf, not NaN)."""
    monkeypatch.setenv("ONNXOPT_SPARSE_PATH", "walk")
    rng = np.random.default_rng(abs(hash((threads, isa))) % 2**32)
    for K, N in ((3, 64), (300, 65), (1100, 130), (1024, 512), (70, 200), (2048, 2048)):
        at = int(np.ceil(0.2 * 64 * -(-N // 64)))  # the fewest entries a dense row holds
        counts = rng.choice([0, 1, at - 1, at, at + 3, min(N, 2 * at), N], size=K)
        counts[0], counts[-1] = 1, at  # at least one sparse and one dense row
        w = np.zeros((K, N), np.float32)
        for k, c in enumerate(counts):
            w[k, rng.choice(N, c, replace=False)] = rng.standard_normal(c)
        for value_dtype in ("float32", "float16"):
            packed = ops.pack_sparse_matmul(w, value_dtype)
            bias = rng.standard_normal(N).astype(np.float32)
            sess = _session(_model(packed, bias), threads=threads)
            for M in (1, 3):
                x = rng.standard_normal((M, K)).astype(np.float32) * (rng.random((M, K)) >= 0.5)
                y = sess.run(None, {"X": x})[0]
                _check(y, ops.reference(packed, x, bias), f"{value_dtype} isa={isa} t={threads} M={M} K={K} N={N}")
        x = np.zeros((1, K), np.float32)
        x[0, 0] = np.inf
        y = sess.run(None, {"X": x})[0]
        touched = w[0] != 0
        assert np.isinf(y[0, touched]).all() and np.isfinite(y[0, ~touched]).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("path", ["panels", "walk", "columns"])
def test_sparse_small_m_paths(isa, threads, path, monkeypatch):
    """Each small-M path of SparseMatMul (forced by ONNXOPT_SPARSE_PATH; constant weights) on panel and
    group edges (K around 32, N around 16), rows and columns of very different density (the panel
    layout sorts both), an empty row and column, a full column (32 steps in one segment), N > 65536,
    and 3:32 patterns (which the panel layout keeps in row order)."""
    monkeypatch.setenv("ONNXOPT_SPARSE_PATH", path)
    rng = np.random.default_rng(abs(hash((path, threads, isa))) % 2**32)
    for K, N in ((1, 1), (31, 17), (33, 16), (64, 15), (257, 40), (40, 70000)):
        density = rng.random((K, 1)) * rng.random((1, N))
        w = (rng.standard_normal((K, N)) * (rng.random((K, N)) < density)).astype(np.float32)
        w[:, 0] = rng.standard_normal(K)
        if K > 2 and N > 2:
            w[1, :] = 0
            w[:, 1] = 0
        _check_small_m(rng, w, f"{path} isa={isa} t={threads}", threads)
    # 3 of every 32 rows per column (an N:M pattern): the panels keep the rows in their own order there
    for K, N in ((70, 33), (96, 16)):
        w = np.zeros((K, N), np.float32)
        for n in range(N):
            for k0 in range(0, K, 32):
                rows = k0 + rng.choice(min(32, K - k0), 3, replace=False)
                w[rows, n] = rng.standard_normal(3)
        _check_small_m(rng, w, f"{path} 3:32 isa={isa} t={threads}", threads)


def _check_small_m(rng, w, label, threads):
    K, N = w.shape
    for value_dtype in ("float32", "float16", "int8"):
        packed = ops.pack_sparse_matmul(w, value_dtype)
        if value_dtype == "float16":
            packed.attributes["activation"] = "relu"
        bias = rng.standard_normal(N).astype(np.float32) if value_dtype != "int8" else None
        sess = _session(_model(packed, bias), threads=threads)
        for M in (1, 3, 15):
            x = rng.standard_normal((M, K)).astype(np.float32) * (rng.random((M, K)) >= 0.5)
            y = sess.run(None, {"X": x})[0]
            _check(y, ops.reference(packed, x, bias), f"{label} {value_dtype} M={M} K={K} N={N}")


def test_sparse_path_env_is_checked(monkeypatch):
    monkeypatch.setenv("ONNXOPT_SPARSE_PATH", "fastest")
    packed = ops.pack_sparse_matmul(np.eye(4, dtype=np.float32))
    with pytest.raises(Exception, match="ONNXOPT_SPARSE_PATH=fastest is not one of"):
        _session(_model(packed, None)).run(None, {"X": np.ones((1, 4), np.float32)})


# (B, C, H, W, N, kernel_shape, strides, pads, dilations)
CONV_CASES = [
    (1, 16, 14, 14, 32, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    (2, 3, 9, 11, 5, (3, 2), (2, 1), (0, 1, 2, 0), (1, 2)),
    (1, 1, 5, 5, 3, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
    (3, 4, 8, 7, 6, (5, 3), (2, 3), (2, 1, 0, 2), (2, 1)),
    (1, 2, 40, 37, 7, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # plane over 256 floats: several register chunks
    (2, 5, 3, 3, 4, (3, 3), (1, 1), (0, 0, 0, 0), (1, 1)),  # 1x1 output
    (1, 3, 6, 9, 2, (2, 4), (1, 1), (0, 3, 1, 0), (2, 1)),  # asymmetric pads + dilation at unit stride
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("value_dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("maxpool", [False, True])
def test_sparse_conv_matches_numpy_and_onnx_conv(isa, threads, value_dtype, maxpool):
    """Against the numpy reference and onnxruntime's Conv (then Relu, then MaxPool with ``maxpool``:
    windows of up to 2x3, strides equal to the window or 1x2, odd sizes leaving rows and columns out)."""
    rng = np.random.default_rng(abs(hash((value_dtype, threads, isa, maxpool))) % 2**32)
    for i, (B, C, H, W, N, kernel, strides, pads, dilations) in enumerate(CONV_CASES):
        density = 0.0 if i == 2 else 0.3  # one weight with no nonzeros at all: bias only
        w = rng.standard_normal((N, C, *kernel)).astype(np.float32) * (rng.random((N, C, *kernel)) < density)
        packed = ops.pack_sparse_conv(w, strides, pads, dilations, value_dtype)
        relu = i % 3 == 0
        if relu:
            packed.attributes["activation"] = "relu"
        pool = {}
        if maxpool:
            conv_size = [ops.conv_output_size(d, a, packed.attributes) for a, d in enumerate((H, W))]
            window = [min(2, conv_size[0]), min(3, conv_size[1])]
            pool = {"kernel_shape": window, "strides": window if i % 2 else [1, 2]}
            packed.attributes["maxpool_kernel_shape"] = tuple(window)
            packed.attributes["maxpool_strides"] = tuple(pool["strides"])
        bias = rng.standard_normal(N).astype(np.float32) if i % 2 == 0 else None
        sess = _session(_model(packed, bias, x_shape=["b", C, H, W]), threads=threads)
        x = rng.standard_normal((B, C, H, W)).astype(np.float32)
        y = sess.run(None, {"X": x})[0]
        what = f"{value_dtype} isa={isa} t={threads} case={i}"
        _check(y, ops.reference(packed, x, bias), what)
        dense = ops.dense_weight(packed).T.reshape(w.shape)
        nodes = [helper.make_node("Conv", ["X", "W", *(["B"] if bias is not None else [])], ["C"], kernel_shape=list(kernel),
                                  strides=list(strides), pads=list(pads), dilations=list(dilations)),
                 helper.make_node("Relu" if relu else "Identity", ["C"], ["R"]),
                 helper.make_node("MaxPool", ["R"], ["Y"], **pool) if pool else helper.make_node("Identity", ["R"], ["Y"])]
        inits = [numpy_helper.from_array(dense, "W"), *([numpy_helper.from_array(bias, "B")] if bias is not None else [])]
        g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        onnx_conv = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10).SerializeToString())
        _check(y, onnx_conv.run(None, {"X": x})[0].astype(np.float64), what + " vs onnx Conv")


def test_sparse_conv_pooled_2x2_every_width(isa):
    """The folded 2x2 stride-2 MaxPool (the AVX2 level's in-register path) for pooled widths 1 to 17,
    so every partial last register (1 to 7 outputs) is written without touching its neighbours."""
    rng = np.random.default_rng(11)
    for width in range(2, 36):
        w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32) * (rng.random((3, 2, 3, 3)) < 0.5)
        packed = ops.pack_sparse_conv(w, pads=(1, 1, 1, 1))
        packed.attributes.update(activation="relu", maxpool_kernel_shape=(2, 2), maxpool_strides=(2, 2))
        bias = rng.standard_normal(3).astype(np.float32)
        x = rng.standard_normal((2, 2, 5, width)).astype(np.float32)
        y = _session(_model(packed, bias, x_shape=["b", 2, 5, width])).run(None, {"X": x})[0]
        assert y.shape == (2, 3, 2, width // 2)
        _check(y, ops.reference(packed, x, bias), f"isa={isa} width={width}")


def test_sparse_conv_bad_inputs(any_isa):
    w = np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)
    packed = ops.pack_sparse_conv(w, pads=(1, 1, 1, 1))

    def raw(attrs: dict) -> bytes:
        names = ["X", *(k for k in ops._INPUT_NAMES["SparseConv"] if k in packed.inputs)]  # noqa: SLF001
        node = helper.make_node("SparseConv", names, ["Y"], domain=ops.DOMAIN, **attrs)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in packed.inputs.items()])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                                 ir_version=10).SerializeToString()

    attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in packed.attributes.items()}
    ok = np.zeros((1, 3, 5, 5), np.float32)
    _expect_error(raw(attrs), np.zeros((1, 4, 5, 5), np.float32), r"SparseConv: input 'X' has shape \(1, 4, 5, 5\): expected \(batch, 3, H, W\)")
    _expect_error(raw(attrs), np.zeros((3, 5, 5), np.float32), r"expected \(batch, 3, H, W\)")
    _expect_error(raw({**attrs, "pads": [0, 0, 0, 0], "dilations": [3, 3]}), ok, "smaller than the dilated kernel")
    _expect_error(raw({**attrs, "kernel_shape": [2, 2]}), ok, r"K=27 is not channels x kernel_shape")
    _expect_error(raw({**attrs, "strides": [0, 1]}), ok, "must be >= 1")
    _expect_error(raw({**attrs, "K": 26}), ok, r"out of range|kernel_shape")
    _expect_error(raw({**attrs, "activation": "gelu"}), ok, r'activation must be "none" or "relu", got "gelu"')
    _expect_error(raw({**attrs, "activation": 1}), ok, "attribute activation must be a string")
    _expect_error(raw({**attrs, "maxpool_kernel_shape": [2]}), ok, "maxpool_kernel_shape and maxpool_strides must be 2 values >= 1")
    _expect_error(raw({**attrs, "maxpool_kernel_shape": [2, 2], "maxpool_strides": [0, 1]}), ok, "must be 2 values >= 1")
    _expect_error(raw({**attrs, "maxpool_kernel_shape": [6, 2]}), ok, r"the conv output 5x5 is smaller than maxpool_kernel_shape")
    assert _session(raw({**attrs, "maxpool_kernel_shape": [2, 2]})).run(None, {"X": ok})[0].shape == (1, 4, 4, 4)  # strides 1
    assert _session(raw({**attrs, "maxpool_kernel_shape": [2, 2], "maxpool_strides": [2, 2]})).run(None, {"X": ok})[0].shape == (1, 4, 2, 2)
    assert _session(raw(attrs)).run(None, {"X": ok})[0].shape == (1, 4, 5, 5)
    assert _session(raw(attrs)).run(None, {"X": np.zeros((0, 3, 5, 5), np.float32)})[0].shape == (0, 4, 5, 5)
    assert ops.reference(packed, np.zeros((0, 3, 5, 5), np.float32)).shape == (0, 4, 5, 5)


@pytest.mark.parametrize("name,pack", PACKERS[:5] + PACKERS[5::7], ids=[p[0] for p in PACKERS[:5] + PACKERS[5::7]])
def test_leading_dims_and_empty_batch(name, pack):
    rng = np.random.default_rng(1)
    K, N = 100, 33
    packed = pack(_weight(name, rng, K, N))
    sess = _session(_model(packed, None, lead=("a", "b")))
    for shape in [(2, 3, K), (1, 1, K), (0, 4, K)]:
        x = rng.standard_normal(shape).astype(np.float32)
        y = sess.run(None, {"X": x})[0]
        assert y.shape == shape[:-1] + (N,)
        _check(y, ops.reference(packed, x), f"{name} {shape}")


def test_dense_weight_and_reference_agree():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, 9)).astype(np.float32)
    x = rng.standard_normal((4, 70)).astype(np.float32)
    for name, pack in PACKERS:
        p = pack(_weight(name, rng, 70, 9))
        d = ops.dense_weight(p)
        assert d.shape == (70, 9) and d.dtype == np.float32
        if name in ("binary", "xnor") or name.startswith("sparse"):
            if name != "xnor":
                np.testing.assert_allclose(ops.reference(p, x), x @ d, rtol=1e-4, atol=1e-4)
    # quantized weights are close to the original
    for bits, tol in ((4, 0.2), (8, 0.01)):
        d = ops.dense_weight(ops.pack_quant_matmul(w, bits=bits))
        assert np.abs(d - w).max() <= tol * np.abs(w).max()


def test_isa_env_and_introspection(monkeypatch):
    assert "scalar" in ISAS
    for level in ISAS:
        monkeypatch.setenv("ONNXOPT_ISA", level)
        assert isa_level() == level
    monkeypatch.setenv("ONNXOPT_ISA", "bogus")
    assert isa_level() == "invalid"
    packed = ops.pack_binary_matmul(np.ones((8, 4), np.float32))
    with pytest.raises(Exception, match="ONNXOPT_ISA=bogus"):
        _session(_model(packed, None))
    monkeypatch.delenv("ONNXOPT_ISA")
    assert isa_level() == ISAS[-1]


def test_model_passes_checker_and_shape_inference():
    rng = np.random.default_rng(3)
    for name, pack in PACKERS[:6]:
        packed = pack(_weight(name, rng, 65, 17))
        proto = _model(packed, rng.standard_normal(17).astype(np.float32), lead=("b", 5))
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        dims = inferred.graph.output[0].type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in dims] == ["b", 5, 17]


# ----------------------------------------------------------------------------- bad inputs

def _raw_model(op_type: str, inputs: dict[str, np.ndarray | None], attrs: dict, K_dim="k") -> bytes:
    """A single-node model built without onnx's checker (so malformed weights get through)."""
    names, inits = ["X"], []
    for key, arr in inputs.items():
        if arr is None:
            names.append("")
            continue
        names.append(key)
        inits.append(numpy_helper.from_array(np.asarray(arr), name=key))
    while names and names[-1] == "":
        names.pop()
    node = helper.make_node(op_type, names, ["Y"], domain=ops.DOMAIN, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K_dim])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                          ir_version=10)
    return m.SerializeToString()


def _expect_error(model: bytes, x: np.ndarray, pattern: str) -> None:
    with pytest.raises(Exception) as ei:
        sess = _session(model)
        sess.run(None, {"X": x})
    msg = str(ei.value)
    assert re.search(pattern, msg), msg
    assert not isinstance(ei.value, (AssertionError, MemoryError))


def _inputs(p: ops.PackedWeight, **override) -> dict:
    names = ops._INPUT_NAMES[p.op_type]
    d = {k: p.inputs.get(k) for k in names if k != "bias"}
    d.update(override)
    return d


@pytest.fixture(params=ISAS)
def any_isa(request, monkeypatch):
    monkeypatch.setenv("ONNXOPT_ISA", request.param)
    return request.param


def test_bad_k(any_isa):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    x = rng.standard_normal((2, 63)).astype(np.float32)
    for p in (ops.pack_binary_matmul(w), ops.pack_xnor_matmul(w), ops.pack_sparse_matmul(w),
              ops.pack_quant_matmul(w)):
        _expect_error(_raw_model(p.op_type, _inputs(p), p.attributes), x, r"last dimension must equal K=64")


def test_bad_dtypes(any_isa):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    b = ops.pack_binary_matmul(w)
    # declared input types are enforced by onnxruntime at load
    _expect_error(_raw_model("BinaryMatMul", _inputs(b, bits=b.inputs["bits"].view(np.int32)), b.attributes), x,
                  r"(?i)type")
    xn = ops.pack_xnor_matmul(w)
    _expect_error(_raw_model("XnorMatMul", _inputs(xn, alpha=xn.inputs["alpha"].astype(np.float64)), xn.attributes),
                  x, r"(?i)type")
    s = ops.pack_sparse_matmul(w)
    _expect_error(_raw_model("SparseMatMul", _inputs(s, values=s.inputs["values"].astype(np.int16)), s.attributes),
                  x, r"values' must be float32, float16 or int8")
    q = ops.pack_quant_matmul(w)
    _expect_error(_raw_model("QuantMatMul", _inputs(q, scales=q.inputs["scales"].astype(np.float64)), q.attributes),
                  x, r"scales' must be float32 or float16")
    _expect_error(_raw_model("QuantMatMul", _inputs(q), {**q.attributes, "bits": 3}), x, r"bits must be 4 or 8")
    _expect_error(_raw_model("QuantMatMul", _inputs(q), {**q.attributes, "block_size": 16}), x,
                  r"block_size must be 32, 64 or 128")
    _expect_error(_raw_model("BinaryMatMul", _inputs(b), {"K": 64}), x, r"K and N are required")


def test_bad_packed_sizes(any_isa):
    rng = np.random.default_rng(6)
    w = rng.standard_normal((65, 17)).astype(np.float32)
    x = rng.standard_normal((2, 65)).astype(np.float32)
    b = ops.pack_binary_matmul(w)
    _expect_error(_raw_model("BinaryMatMul", _inputs(b, bits=b.inputs["bits"][:, :1]), b.attributes), x,
                  r"'bits' must have shape \(2, 3, 16\)")
    _expect_error(_raw_model("BinaryMatMul", _inputs(b, alpha=b.inputs["alpha"][:5]), b.attributes), x,
                  r"'alpha' must have shape")
    xn = ops.pack_xnor_matmul(w)
    _expect_error(_raw_model("XnorMatMul", _inputs(xn, bits=xn.inputs["bits"].reshape(-1)), xn.attributes), x,
                  r"'bits' must have shape")
    q = ops.pack_quant_matmul(w, bits=4, symmetric=False)
    _expect_error(_raw_model("QuantMatMul", _inputs(q, weights=q.inputs["weights"][..., :-1]), q.attributes), x,
                  r"'weights' must have shape")
    _expect_error(_raw_model("QuantMatMul", _inputs(q, zero_points=q.inputs["zero_points"][:, :1]), q.attributes),
                  x, r"'zero_points' must have shape")
    _expect_error(_raw_model("QuantMatMul", _inputs(q), {**q.attributes, "bits": 8}), x, r"'weights' must have shape")
    nb = np.zeros(17, np.float32)
    qi = _inputs(q)
    qi["bias"] = nb[:3]
    _expect_error(_raw_model("QuantMatMul", qi, q.attributes), x, r"'bias' must have shape \(17,\)")


def test_bad_csc(any_isa):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((300, 5)).astype(np.float32) * (rng.random((300, 5)) < 0.5)
    x = rng.standard_normal((2, 300)).astype(np.float32)
    s = ops.pack_sparse_matmul(w)
    idx, cp = s.inputs["indices"], s.inputs["col_ptr"]
    a = s.attributes

    def run(pattern, **kw):
        _expect_error(_raw_model("SparseMatMul", _inputs(s, **kw), a), x, pattern)

    run(r"'indices' must have shape", indices=idx[:-1])
    run(r"'indices' must be uint16 or uint32, got uint8", indices=idx.astype(np.uint8))
    run(r"'indices' must be uint16 or uint32, got int32", indices=idx.astype(np.int32))
    run(r"'col_ptr' must have shape \(6,\)", col_ptr=cp[:-1])
    run(r"'scales' must have shape", scales=s.inputs["scales"][:2])
    bad = cp.copy()
    bad[-1] += 1
    run(r"col_ptr\[-1\]=.* must equal the number of values", col_ptr=bad)
    bad = cp.copy()
    bad[2], bad[3] = bad[3], bad[2]
    run(r"col_ptr is not a valid column table", col_ptr=bad)
    bad = cp.copy()
    bad[0] = 1
    run(r"col_ptr\[0\] must be 0", col_ptr=bad)
    bad = cp.copy()
    bad[2] = -(2**31)
    run(r"col_ptr is not a valid column table", col_ptr=bad)
    # a row index >= K (column 3), with uint16 and uint32 indices
    bi = idx.copy()
    bi[int(cp[3])] = 300
    run(r"indices\[\d+\]=300 \(column 3\) is out of range: row must be < K=300", indices=bi)
    run(r"indices\[\d+\]=70000 \(column 3\) is out of range", indices=np.where(bi == 300, 70000, bi.astype(np.uint32)).astype(np.uint32))
    # the same malformed weights fed as graph inputs (not constants) are checked on every call
    names = ["X", "values", "indices", "col_ptr", "scales"]
    node = helper.make_node("SparseMatMul", names, ["Y"], domain=ops.DOMAIN, **a)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", 300]),
                                        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["nnz"]),
                                        helper.make_tensor_value_info("indices", TensorProto.UINT16, ["nnz"]),
                                        helper.make_tensor_value_info("col_ptr", TensorProto.INT32, [6]),
                                        helper.make_tensor_value_info("scales", TensorProto.FLOAT, [5])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                          ir_version=10)
    sess = _session(m.SerializeToString())
    feed = {"X": x, "values": s.inputs["values"], "indices": idx, "col_ptr": cp, "scales": s.inputs["scales"]}
    np.testing.assert_allclose(sess.run(None, feed)[0], ops.reference(s, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match=r"out of range: row must be < K=300"):
        sess.run(None, {**feed, "indices": bi})


@pytest.mark.parametrize("M", [1, 3, 20])
def test_sparse_uint32_indices_for_large_k(M):
    rng = np.random.default_rng(11)
    K, N = 70_000, 5
    w = np.where(rng.random((K, N)) < 0.01, rng.standard_normal((K, N)), 0).astype(np.float32)
    w[K - 1, 0] = 1.0  # a row above 65535
    packed = ops.pack_sparse_matmul(w)
    assert packed.inputs["indices"].dtype == np.uint32
    assert ops.pack_sparse_matmul(w[:65536]).inputs["indices"].dtype == np.uint16
    x = rng.standard_normal((M, K)).astype(np.float32)
    y = _session(_model(packed, None)).run(None, {"X": x})[0]
    _check(y, ops.reference(packed, x), f"K={K} M={M}")
    np.testing.assert_allclose(ops.dense_weight(packed), w)


def test_threads_give_identical_results():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((512, 300)).astype(np.float32)
    x = rng.standard_normal((37, 512)).astype(np.float32)
    for p in (ops.pack_binary_matmul(w), ops.pack_xnor_matmul(w), ops.pack_quant_matmul(w),
              ops.pack_sparse_matmul(w * (rng.random(w.shape) < 0.2))):
        m = _model(p, None)
        y1 = _session(m, threads=1).run(None, {"X": x})[0]
        y2 = _session(m, threads=2).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y1, y2)


def test_binary_bits_fed_at_run_time(isa):
    """bits as a graph input (not an initializer): levels with their own weight layout (AVX2: 3-bit
    groups, 30 K rows per word) repack on every call. K values cross the 32- and 30-row word edges
    of both layouts; several M and column-block remainders, alternating weights on one session."""
    rng = np.random.default_rng(11)
    for K, N in ((30, 9), (95, 17), (961, 24)):
        packs = [ops.pack_binary_matmul(rng.standard_normal((K, N)).astype(np.float32)) for _ in range(2)]
        alpha = packs[0].inputs["alpha"]  # the graph's one alpha initializer serves both weights
        packs = [ops.PackedWeight(p.op_type, {**p.inputs, "alpha": alpha}, p.attributes) for p in packs]
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K])
        bits = helper.make_tensor_value_info("bits", TensorProto.UINT32, list(packs[0].inputs["bits"].shape))
        node = helper.make_node("BinaryMatMul", ["X", "bits", "alpha"], ["Y"], domain=ops.DOMAIN, K=K, N=N)
        graph = helper.make_graph([node], "g", [x, bits], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(alpha, "alpha")])
        sess = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)],
                                          ir_version=10))
        for M in (1, 5, 40):
            for packed in packs:
                xv = rng.standard_normal((M, K)).astype(np.float32)
                y = sess.run(None, {"X": xv, "bits": packed.inputs["bits"]})[0]
                _check(y, ops.reference(packed, xv), f"binary bits input K={K} N={N} M={M} isa={isa}")


def test_xnor_long_k_and_all_bits_differing(isa):
    """K of 71 words: popcounts summed per byte over 31-word chunks (AVX2) must not wrap, even when
    every bit differs (8 per byte per word), and the last, partial chunk and word must count."""
    rng = np.random.default_rng(5)
    K, N = 64 * 70 + 5, 11
    w = np.abs(rng.standard_normal((K, N))).astype(np.float32) + 0.1  # every weight bit set
    packed = ops.pack_xnor_matmul(w)
    sess = _session(_model(packed, None))
    x = rng.standard_normal((6, K)).astype(np.float32)
    x[0] = -np.abs(x[0]) - 0.1  # every activation bit clear: all K bits differ
    x[1] = np.abs(x[1])  # no bit differs
    for rows in (x[:1], x):
        _check(sess.run(None, {"X": rows})[0], ops.reference(packed, rows), f"xnor K={K} isa={isa}")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_extreme_codes(isa, bits, symmetric):
    """Codes at both ends of the range (high nibbles of 15 / 0, int8 0 / 255) against activations
    at +-127 after quantization, in the largest block: the integer dot products stay exact."""
    K, N = 256, 32
    w = np.where((np.arange(K)[:, None] + np.arange(N)[None, :]) % 3 == 0, 1.0, -1.0).astype(np.float32)
    w[:, N // 2:] = np.abs(w[:, N // 2:])  # asymmetric: all codes at the top of the range
    packed = ops.pack_quant_matmul(w, bits=bits, block_size=128, symmetric=symmetric)
    x = np.where(np.arange(K) % 2 == 0, 1.0, -1.0).astype(np.float32)[None, :].repeat(5, axis=0)
    x[1] = 1.0
    x[2] = -1.0
    sess = _session(_model(packed, None))
    for rows in (x[:1], x):
        _check(sess.run(None, {"X": rows})[0], ops.reference(packed, rows), f"int{bits} sym={symmetric} isa={isa}")


@pytest.mark.parametrize("op", ["SparseConv", "SparseMatMul"])
def test_folded_relu_keeps_nan(isa, op, monkeypatch):
    """The folded ReLU maps the op's own output as onnxruntime's Relu would: negatives to 0, NaN (from a
    NaN input read by a stored weight) stays NaN, in vector bodies and scalar tails alike."""
    rng = np.random.default_rng(8)
    if op == "SparseConv":
        w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32) * (rng.random((5, 3, 3, 3)) < 0.3)
        packed = ops.pack_sparse_conv(w, pads=(1, 1, 1, 1))
        x = rng.standard_normal((1, 3, 9, 20)).astype(np.float32)
        x[0, 1, 4, 17] = np.nan
    else:
        monkeypatch.setenv("ONNXOPT_SPARSE_PATH", "columns")  # the panel GEMV's padding lanes read a real input
        w = rng.standard_normal((40, 24)).astype(np.float32) * (rng.random((40, 24)) < 0.3)
        packed = ops.pack_sparse_matmul(w)
        x = rng.standard_normal((20, 40)).astype(np.float32)
        x[[0, 19], 7] = np.nan
    plain = _session(_model(packed, None, x_shape=list(x.shape))).run(None, {"X": x})[0]
    packed.attributes["activation"] = "relu"
    y = _session(_model(packed, None, x_shape=list(x.shape))).run(None, {"X": x})[0]
    assert np.isnan(plain).any() and (plain < 0).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(plain))
    np.testing.assert_array_equal(np.nan_to_num(y), np.maximum(np.nan_to_num(plain), 0))
