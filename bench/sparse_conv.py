"""SparseConv against onnxruntime's Conv: batch-1 latency by shape and sparsity, in the same rounds.

Each point is one Conv (3x3, pads 1, bias) with a magnitude-pruned random weight, run by onnxruntime's
Conv and by onnxopt's SparseConv (and, with ``--against``, by SparseConv of another kernel build). The
sparse outputs are checked against the dense ones. Times are the mean of the fastest half of all runs
(per-call CPU time at 1 thread, wall time otherwise), so the ~10 us of a Python ``run`` call is part of
every number: ratios of such small ops understate the kernel's own speedup.

    python bench/sparse_conv.py [--threads 1] [--shapes 16x32x14x14,64x64x28x28] [--sparsity 0.5,0.7,0.9]
    python bench/sparse_conv.py --against OLD/libonnxopt_kernels.so
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxopt import io, ops  # noqa: E402
from onnxopt.runtime import kernel_library  # noqa: E402

SHAPES = "1x16x28x28,16x32x14x14,32x64x14x14,64x64x28x28,128x128x14x14"  # C_in x C_out x H x W


def conv_model(c_in: int, h: int, w: int, node_fn) -> bytes:
    x = ir.Value(name="x", shape=ir.Shape([1, c_in, h, w]), type=ir.TensorType(ir.DataType.FLOAT))
    node, initializers = node_fn(x)
    node.outputs[0].name = "y"
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=initializers,
                     opset_imports={"": 17, ops.DOMAIN: ops.OPSET_VERSION})
    return io.to_bytes(ir.Model(graph, ir_version=9))


def dense_node(weight: np.ndarray, bias: np.ndarray):
    def build(x):
        w = ir.Value(name="w", const_value=ir.tensor(weight))
        b = ir.Value(name="b", const_value=ir.tensor(bias))
        return ir.node("Conv", [x, w, b], {"pads": [1, 1, 1, 1]}), [w, b]
    return build


def sparse_node(weight: np.ndarray, bias: np.ndarray):
    def build(x):
        b = ir.Value(name="b", const_value=ir.tensor(bias))
        node, initializers = ops.make_node(ops.pack_sparse_conv(weight, pads=(1, 1, 1, 1)), x, b)
        return node, [*initializers, b]
    return build


def session(model: bytes, threads: int, library: str | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def fastest_half_us(sessions, feed, clock, rounds: int, repeat: int) -> list[float]:
    samples = [[] for _ in sessions]
    for sess in sessions:
        sess.run(None, feed)
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            for _ in range(repeat):
                start = clock()
                sess.run(None, feed)
                samples[i].append(clock() - start)
    return [statistics.mean(sorted(s)[: len(s) // 2]) * 1e6 for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="C_in x C_out x H x W, comma separated")
    parser.add_argument("--sparsity", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--against", default="", help="another build of the kernels library, measured in the same rounds")
    args = parser.parse_args()
    libraries = [str(kernel_library())] + ([args.against] if args.against else [])
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    header = ["shape (Cin->Cout HxW)", "sparsity", "Conv us", "SparseConv us", "x"]
    if args.against:
        header += ["against us", "x against"]
    print(f"\nbatch 1, 3x3 pads 1, {args.threads} thread(s), {'CPU' if args.threads == 1 else 'wall'} time\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for shape in args.shapes.split(","):
        c_in, c_out, h, w = (int(v) for v in shape.split("x"))
        x = rng.standard_normal((1, c_in, h, w)).astype(np.float32)
        bias = rng.standard_normal(c_out).astype(np.float32)
        for target in (float(s) for s in args.sparsity.split(",")):
            weight = rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32)
            weight[np.abs(weight) < np.quantile(np.abs(weight), target)] = 0
            sessions = [session(conv_model(c_in, h, w, dense_node(weight, bias)), args.threads, None)]
            sessions += [session(conv_model(c_in, h, w, sparse_node(weight, bias)), args.threads, lib) for lib in libraries]
            expected = sessions[0].run(None, {"x": x})[0]
            for sess in sessions[1:]:
                np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, rtol=1e-3, atol=1e-3)
            times = fastest_half_us(sessions, {"x": x}, clock, args.rounds, args.repeat)
            row = [f"{c_in}->{c_out} {h}x{w}", f"{target:.0%}", f"{times[0]:.1f}"]
            for t in times[1:]:
                row += [f"{t:.1f}", f"{times[0] / t:.2f}"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
