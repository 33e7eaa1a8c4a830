"""Benchmark of the CUDA kernels (4096 x 4096 weights, M = 1 and 128) against cuBLAS SGEMM.

Needs ``libonnxopt_cuda_test.so`` (``cmake -S kernels/cuda -B build/cuda && cmake --build build/cuda``)
and a CUDA device. Hot: one weight copy (L2-resident when small enough); cold: distinct weight
copies rotating through >= 512 MB (10x the H100's L2), as in LLM decoding. Prints ms per call
(CUDA events over back-to-back launches, launch gaps included) and the ratio to fp32 SGEMM.

    python bench/cuda_kernels.py [--k 4096] [--n 4096]
"""

from __future__ import annotations

import argparse
import ctypes
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from onnxopt import ops  # noqa: E402
from tests.test_cuda_kernels import call_args, device_name, load_library  # noqa: E402

COLD_BYTES = 512 << 20


def bench_packed(lib, packed: ops.PackedWeight, x: np.ndarray, cold: bool, iters: int) -> float:
    args, _keep = call_args(packed.op_type, packed.attributes, x, packed.inputs, None)
    copies = max(1, -(-COLD_BYTES // packed.nbytes())) if cold else 1
    ms, err = ctypes.c_double(), ctypes.create_string_buffer(1024)
    if lib.onnxopt_cuda_bench_host(*args, copies, iters, ctypes.byref(ms), err, 1024):
        raise RuntimeError(err.value.decode())
    return ms.value


def bench_sgemm(lib, M: int, K: int, N: int, cold: bool, iters: int, tf32: bool) -> float:
    copies = max(1, -(-COLD_BYTES // (K * N * 4))) if cold else 1
    ms, err = ctypes.c_double(), ctypes.create_string_buffer(1024)
    if lib.onnxopt_cuda_bench_sgemm(M, K, N, copies, iters, int(tf32), ctypes.byref(ms), err, 1024):
        raise RuntimeError(err.value.decode())
    return ms.value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    a = ap.parse_args()
    lib = load_library()
    if lib is None or lib.onnxopt_cuda_device_count() == 0:
        raise SystemExit("CUDA test library not built or no CUDA device")
    K, N = a.k, a.n
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N)).astype(np.float32)
    packs: list[tuple[str, ops.PackedWeight]] = [
        ("BinaryMatMul", ops.pack_binary_matmul(w)),
        ("XnorMatMul", ops.pack_xnor_matmul(w)),
        ("QuantMatMul int4 bs32", ops.pack_quant_matmul(w, 4, 32)),
        ("QuantMatMul int8 bs32", ops.pack_quant_matmul(w, 8, 32)),
    ]
    for sp in (50, 70, 80, 90, 95):
        ws = np.where(rng.random((K, N)) < sp / 100, 0, w).astype(np.float32)
        packs.append((f"SparseMatMul {sp}% f32", ops.pack_sparse_matmul(ws)))
    print(f"device: {device_name(lib)}; weights {K}x{N}; ms per call (ratio = SGEMM fp32 / op)")
    print(f"{'op':26s} {'MB':>6s} | {'M=1 hot':>14s} {'M=1 cold':>14s} | {'M=128 hot':>14s} {'M=128 cold':>14s}")
    cols = [(1, False), (1, True), (128, False), (128, True)]
    anchor = {c: bench_sgemm(lib, c[0], K, N, c[1], 200 if c[0] == 1 else 50, False) for c in cols}

    def row(name: str, mb: float, times: list[float]) -> None:
        cells = [f"{t:7.4f} {anchor[c] / t:5.1f}x" for c, t in zip(cols, times)]
        print(f"{name:26s} {mb:6.1f} | {cells[0]:>14s} {cells[1]:>14s} | {cells[2]:>14s} {cells[3]:>14s}")

    row("cuBLAS SGEMM fp32", K * N * 4 / 2**20, [anchor[c] for c in cols])
    row("cuBLAS SGEMM TF32", K * N * 4 / 2**20,
        [bench_sgemm(lib, c[0], K, N, c[1], 200 if c[0] == 1 else 50, True) for c in cols])
    for name, packed in packs:
        times = []
        for M, cold in cols:
            x = rng.standard_normal((M, K)).astype(np.float32)
            times.append(bench_packed(lib, packed, x, cold, 200 if M == 1 else 50))
        row(name, packed.nbytes() / 2**20, times)


if __name__ == "__main__":
    main()
