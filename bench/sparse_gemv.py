"""SparseMatMul's small-M paths against onnxruntime's MatMul: batch-1 latency by shape and sparsity.

Each point is one MatMul (K x N) whose weight is Gaussian with log-normal row and column scales (real
layers have inputs and outputs of very different weight, so pruning leaves rows and columns of very
different density) pruned by magnitude. It runs as onnxruntime's MatMul on the dense weight and as
SparseMatMul with each small-M path forced (``ONNXOPT_SPARSE_PATH``: the column path, the row walk over
a CSR copy, the panel GEMV) and with the automatic choice, in the same rounds. Inputs: dense Gaussian,
or post-ReLU (half of them exact zeros, which the row walk skips). Outputs are checked against the
dense MatMul. Times: mean of the fastest half of all runs (per-call CPU time at 1 thread), so the
Python ``run`` call (a few us) is in every number.

    python bench/sparse_gemv.py [--shapes 1568x512,384x1536] [--sparsity 0.7,0.9] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparse_conv import fastest_half_us, session  # noqa: E402

from onnxopt import io, ops  # noqa: E402
from onnxopt.runtime import kernel_library  # noqa: E402

SHAPES = "1568x512,384x1536,1536x384,4096x4096"  # MNIST fc1, MiniLM FFN up and down, an LLM-sized layer
PATHS = ("columns", "walk", "panels", "auto")


def matmul_model(k: int, node_fn) -> bytes:
    x = ir.Value(name="x", shape=ir.Shape([1, k]), type=ir.TensorType(ir.DataType.FLOAT))
    node, initializers = node_fn(x)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=initializers,
                     opset_imports={"": 17, ops.DOMAIN: ops.OPSET_VERSION})
    return io.to_bytes(ir.Model(graph, ir_version=9))


def dense_node(weight: np.ndarray):
    def build(x):
        w = ir.Value(name="w", const_value=ir.tensor(weight))
        return ir.node("MatMul", [x, w]), [w]
    return build


def sparse_node(weight: np.ndarray):
    def build(x):
        return ops.make_node(ops.pack_sparse_matmul(weight), x)
    return build


def pruned_weight(rng, k: int, n: int, sparsity: float) -> np.ndarray:
    w = rng.standard_normal((k, n)) * rng.lognormal(0, 0.5, (k, 1)) * rng.lognormal(0, 0.5, (1, n))
    w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0
    return w.astype(np.float32)


def sparse_session(weight: np.ndarray, path: str, threads: int, library: str):
    os.environ["ONNXOPT_SPARSE_PATH"] = path  # read when the kernel is created
    try:
        return session(matmul_model(weight.shape[0], sparse_node(weight)), threads, library)
    finally:
        del os.environ["ONNXOPT_SPARSE_PATH"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="K x N, comma separated")
    parser.add_argument("--sparsity", default="0.5,0.7,0.9,0.95")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    library = str(kernel_library())
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    header = ["K x N", "sparsity", "input", "MatMul us", *[f"{p} us" for p in PATHS], "x auto"]
    print(f"\nbatch 1, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for target in (float(s) for s in args.sparsity.split(",")):
            weight = pruned_weight(rng, k, n, target)
            sessions = [session(matmul_model(k, dense_node(weight)), args.threads, None)]
            sessions += [sparse_session(weight, path, args.threads, library) for path in PATHS]
            for label, zeros in (("dense", 0.0), ("post-ReLU", 0.5)):
                x = rng.standard_normal((1, k)).astype(np.float32) * (rng.random((1, k)) >= zeros)
                expected = sessions[0].run(None, {"x": x})[0]
                for sess in sessions[1:]:
                    np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, rtol=1e-3, atol=1e-3)
                times = fastest_half_us(sessions, {"x": x}, clock, args.rounds, args.repeat)
                row = [f"{k}x{n}", f"{target:.0%}", label, *[f"{t:.1f}" for t in times], f"{times[0] / times[-1]:.2f}"]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
