"""CUDA kernels of the ai.onnxopt ops against the numpy references of ``onnxopt.ops``.

Runs through ``libonnxopt_cuda_test.so`` (``kernels/cuda/CMakeLists.txt``: the kernels plus C entry
points that take host arrays), so it needs neither onnxruntime-gpu nor torch. Skips unless that
library is built (``ONNXOPT_CUDA_TEST_LIB`` or ``build/cuda/``) and a CUDA device is present; CI
has no GPU. ``python tests/test_cuda_kernels.py`` prints the per-case error table.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import pathlib

import numpy as np
import pytest

from onnxopt import ops

ROOT = pathlib.Path(__file__).resolve().parent.parent
OP_CODES = {"BinaryMatMul": 0, "XnorMatMul": 1, "SparseMatMul": 2, "QuantMatMul": 3}
# Node inputs after X, in kernel order (bias is appended last by `call_args`).
WEIGHT_INPUTS = {
    "BinaryMatMul": ("bits", "alpha"),
    "XnorMatMul": ("bits", "alpha"),
    "SparseMatMul": ("values", "indices", "col_ptr", "scales"),
    "QuantMatMul": ("weights", "scales", "zero_points"),
}
DTYPE_CODES = {
    np.dtype(np.float32): 0,
    np.dtype(np.float16): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.uint8): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.uint32): 5,
    np.dtype(np.uint64): 6,
    np.dtype(np.uint16): 7,
}


class CudaKernelError(RuntimeError):
    """An error message returned by the CUDA library (validation or CUDA failure)."""


def library_path() -> pathlib.Path | None:
    env = os.environ.get("ONNXOPT_CUDA_TEST_LIB")
    for p in ([pathlib.Path(env)] if env else []) + [ROOT / "build" / "cuda" / "libonnxopt_cuda_test.so"]:
        if p.is_file():
            return p
    return None


def load_library() -> ctypes.CDLL | None:
    path = library_path()
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    ptr, i64p, i32p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int)
    common = [ctypes.c_int, i64p, ctypes.c_int, ctypes.POINTER(ptr), i32p, i32p, i64p]
    lib.onnxopt_cuda_run_host.argtypes = [*common, ctypes.POINTER(ctypes.c_float), ctypes.c_int64,
                                          ctypes.c_char_p, ctypes.c_int]
    lib.onnxopt_cuda_bench_host.argtypes = [*common, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                            ctypes.c_char_p, ctypes.c_int]
    lib.onnxopt_cuda_bench_sgemm.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                             ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_double),
                                             ctypes.c_char_p, ctypes.c_int]
    lib.onnxopt_cuda_device_name.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return lib


def device_name(lib: ctypes.CDLL) -> str:
    buf = ctypes.create_string_buffer(256)
    return buf.value.decode() if lib.onnxopt_cuda_device_name(buf, 256) == 0 else "?"


def call_args(op_type: str, attrs: dict, x: np.ndarray, weights: dict, bias: np.ndarray | None):
    """ctypes arguments (op, attrs, n, data, dtypes, ranks, dims) + the arrays kept alive."""
    arrays = [np.ascontiguousarray(x)] + [weights.get(k) for k in WEIGHT_INPUTS[op_type]] + [bias]
    arrays = [None if a is None else np.ascontiguousarray(a) for a in arrays]
    n = len(arrays)
    data = (ctypes.c_void_p * n)(*[None if a is None else a.ctypes.data for a in arrays])
    dtypes = (ctypes.c_int * n)(*[0 if a is None else DTYPE_CODES[a.dtype] for a in arrays])
    ranks = (ctypes.c_int * n)(*[-1 if a is None else a.ndim for a in arrays])
    flat = [d for a in arrays if a is not None for d in a.shape]
    dims = (ctypes.c_int64 * max(1, len(flat)))(*flat)
    at = (ctypes.c_int64 * 4)(int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)),
                              int(attrs.get("block_size", 32)))
    return (OP_CODES[op_type], at, n, data, dtypes, ranks, dims), arrays


def run_cuda(lib, op_type: str, attrs: dict, x: np.ndarray, weights: dict, bias=None) -> np.ndarray:
    args, _keep = call_args(op_type, attrs, x, weights, bias)
    N = int(attrs["N"])
    y = np.zeros((*x.shape[:-1], N), dtype=np.float32)
    err = ctypes.create_string_buffer(1024)
    rc = lib.onnxopt_cuda_run_host(*args, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), y.size, err, 1024)
    if rc:
        raise CudaKernelError(err.value.decode())
    return y


def run_packed(lib, packed: ops.PackedWeight, x: np.ndarray, bias=None) -> np.ndarray:
    return run_cuda(lib, packed.op_type, packed.attributes, x, packed.inputs, bias)


_LIB = load_library()
_HAVE_DEVICE = _LIB is not None and _LIB.onnxopt_cuda_device_count() > 0
pytestmark = pytest.mark.skipif(not _HAVE_DEVICE, reason="CUDA test library not built or no CUDA device")

# ------------------------------------------------------------------------------------ cases

MS = (1, 3, 40, 128)
KS = (1, 63, 64, 65, 1000)
NS = (17, 40)

VARIANTS = {
    "binary": lambda w: ops.pack_binary_matmul(w),
    "xnor": lambda w: ops.pack_xnor_matmul(w),
    **{f"sparse-{dt}": (lambda dt: lambda w: ops.pack_sparse_matmul(w, dt))(dt)
       for dt in ("float32", "float16", "int8")},
    **{f"quant-int{b}-bs{bs}-{'sym' if s else 'asym'}-{sd}":
       (lambda b, bs, s, sd: lambda w: ops.pack_quant_matmul(w, b, bs, s, sd))(b, bs, s, sd)
       for b, bs, s, sd in itertools.product((4, 8), (32, 64, 128), (True, False), ("float32", "float16"))},
}


def make_case(variant: str, M: int, K: int, N: int, seed: int):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32)
    if variant.startswith("sparse"):
        w[rng.random((K, N)) < 0.8] = 0.0
    x = rng.standard_normal((M, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32) if seed % 2 else None
    return VARIANTS[variant](w), x, bias


def case_error(lib, variant: str, M: int, K: int, N: int, seed: int) -> tuple[float, float]:
    """(max abs error, max error relative to |x| @ |W| + |bias|) of the CUDA op vs ops.reference."""
    packed, x, bias = make_case(variant, M, K, N, seed)
    y = run_packed(lib, packed, x, bias)
    ref = ops.reference(packed, x, bias)
    mag = np.abs(x).astype(np.float64) @ np.abs(ops.dense_weight(packed)).astype(np.float64) + 1e-3
    if bias is not None:  # y + bias rounds at the scale of |bias|
        mag += np.abs(bias)
    err = np.abs(y.astype(np.float64) - ref)
    return float(err.max()), float((err / mag).max())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_reference(variant):
    failures = []
    for i, (M, K, N) in enumerate(itertools.product(MS, KS, NS)):
        abs_err, rel_err = case_error(_LIB, variant, M, K, N, seed=i)
        if not rel_err < 2e-5:
            failures.append(f"M={M} K={K} N={N}: {abs_err:.3g} ({rel_err:.3g} of |x|@|W|+|b|)")
    assert not failures, f"{variant}: " + "; ".join(failures)


def test_sparse_uint32_indices_for_large_k():
    rng = np.random.default_rng(3)
    K, N = 70_000, 5
    w = np.where(rng.random((K, N)) < 0.01, rng.standard_normal((K, N)), 0).astype(np.float32)
    w[K - 1, 0] = 1.0  # a row index above 65535
    packed = ops.pack_sparse_matmul(w)
    assert packed.inputs["indices"].dtype == np.uint32
    for M in (1, 20):
        x = rng.standard_normal((M, K)).astype(np.float32)
        np.testing.assert_allclose(run_packed(_LIB, packed, x), ops.reference(packed, x), rtol=1e-4, atol=1e-4)


def test_leading_dims_and_empty_rows():
    packed, _, _ = make_case("quant-int4-bs32-sym-float32", 1, 65, 17, 0)
    x = np.random.default_rng(1).standard_normal((2, 3, 65)).astype(np.float32)
    y = run_packed(_LIB, packed, x)
    assert y.shape == (2, 3, 17)
    np.testing.assert_allclose(y, ops.reference(packed, x), rtol=1e-5, atol=1e-4)
    assert run_packed(_LIB, packed, np.zeros((0, 65), np.float32)).shape == (0, 17)


def _bad(lib, op, attrs, x, weights, bias=None) -> str:
    with pytest.raises(CudaKernelError) as e:
        run_cuda(lib, op, attrs, x, weights, bias)
    return str(e.value)


def test_bad_inputs_fail_cleanly():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((100, 21)).astype(np.float32)
    x = rng.standard_normal((2, 100)).astype(np.float32)
    b = ops.pack_binary_matmul(w)
    assert "X last dimension 99 != K=100" in _bad(_LIB, "BinaryMatMul", b.attributes, x[:, :99], b.inputs)
    bad = dict(b.inputs, bits=b.inputs["bits"][:, :-1])
    assert "'bits' must have shape (2, 4, 16)" in _bad(_LIB, "BinaryMatMul", b.attributes, x, bad)
    bad = dict(b.inputs, bits=b.inputs["bits"].astype(np.uint64))
    assert "must be uint32" in _bad(_LIB, "BinaryMatMul", b.attributes, x, bad)
    assert "'bias' must have shape (21,)" in _bad(_LIB, "BinaryMatMul", b.attributes, x, b.inputs,
                                                  np.zeros(20, np.float32))

    s = ops.pack_sparse_matmul(np.where(rng.random((300, 21)) < 0.5, w.repeat(3, 0), 0))
    x3 = rng.standard_normal((2, 300)).astype(np.float32)
    bad = dict(s.inputs, col_ptr=s.inputs["col_ptr"][:-1])
    assert "'col_ptr' must have shape" in _bad(_LIB, "SparseMatMul", s.attributes, x3, bad)
    bad = dict(s.inputs, indices=s.inputs["indices"][:-1])
    assert "'indices' must have shape" in _bad(_LIB, "SparseMatMul", s.attributes, x3, bad)
    bad = dict(s.inputs, indices=s.inputs["indices"].astype(np.uint8))
    assert "must be uint16 or uint32" in _bad(_LIB, "SparseMatMul", s.attributes, x3, bad)
    idx = s.inputs["indices"].copy()
    idx[int(s.inputs["col_ptr"][-2])] = 300  # first entry of the last column: row 300 >= K
    assert "indices[" in _bad(_LIB, "SparseMatMul", s.attributes, x3, dict(s.inputs, indices=idx))
    cp = s.inputs["col_ptr"].copy()
    cp[5], cp[6] = cp[6] + 1, cp[5]
    assert "non-decreasing" in _bad(_LIB, "SparseMatMul", s.attributes, x3, dict(s.inputs, col_ptr=cp))

    q = ops.pack_quant_matmul(w, 4, 32)
    assert "bits must be 4 or 8" in _bad(_LIB, "QuantMatMul", dict(q.attributes, bits=3), x, q.inputs)
    bad = dict(q.inputs, weights=q.inputs["weights"][..., :-1])
    assert "'weights' must have shape" in _bad(_LIB, "QuantMatMul", q.attributes, x, bad)
    bad = dict(q.inputs, scales=q.inputs["scales"].astype(np.int32))
    assert "'scales' must be float32 or float16" in _bad(_LIB, "QuantMatMul", q.attributes, x, bad)


def main() -> None:  # pragma: no cover - manual report
    if not _HAVE_DEVICE:
        raise SystemExit("CUDA test library not built or no CUDA device")
    print(f"device: {device_name(_LIB)}")
    print(f"{'variant':34s} {'cases':>5s} {'max abs err':>12s} {'max err/(|x|@|W|+|b|)':>22s}  worst (M,K,N)")
    for variant in sorted(VARIANTS):
        rows = [(*case_error(_LIB, variant, M, K, N, i), (M, K, N))
                for i, (M, K, N) in enumerate(itertools.product(MS, KS, NS))]
        worst = max(rows, key=lambda r: r[1])
        print(f"{variant:34s} {len(rows):5d} {max(r[0] for r in rows):12.3g} {worst[1]:22.3g}  {worst[2]}")


if __name__ == "__main__":
    main()
