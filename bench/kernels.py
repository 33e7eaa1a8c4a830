"""Benchmark the ai.onnxopt kernels against onnxruntime's fp32 MatMul and MatMulNBits.

4096x4096 weights, M = 1 (GEMV) and M = 128 (GEMM), 1 and 2 intra-op threads, hot (one weight
copy) and cold (distinct weight copies rotating through >= 256 MB, as in LLM decoding).
Each measurement is one session whose graph chains C nodes of the op (output of one is the
input of the next; square weights): hot = all C nodes share one initializer, cold = C distinct
initializers whose total is >= 256 MB. Time per op = median over runs of run time / C, so the
Python/session overhead is amortized. Ratios are against fp32 MatMul of the same M, threads and
temperature, measured in the same run.

    python bench/kernels.py            # full table (a few minutes)
    python bench/kernels.py --quick    # fewer ops/repeats
    python bench/kernels.py --clock cpu --rounds 3 --only Binary,Xnor,int4   # shared machine
    python bench/kernels.py --against OLD/libonnxopt_kernels.so   # each onnxopt op also on another build

``--against`` measures every onnxopt op a second time with another build of the library (e.g. of an
earlier commit: ``cmake -S kernels -B /tmp/old && cmake --build /tmp/old`` in a checkout of it), in
the same rounds, rows marked ``[against]``: an A/B that machine noise hits alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxopt import ops  # noqa: E402
from onnxopt.kernels import isa_level, library_path  # noqa: E402

K = N = 4096
COLD_BYTES = 256 * 2**20
MB = 2**20


# ----------------------------------------------------------------------------- weights

def _rng(seed):
    return np.random.default_rng(seed)


def gaussian_weight(seed=0):
    return (_rng(seed).standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)


def nbits_pack(w: np.ndarray, block=32):
    """MatMulNBits (4-bit, symmetric, no zero points) initializers for W (K, N)."""
    nb = K // block
    wt = w.T.reshape(N, nb, block)
    idx = np.abs(wt).argmax(axis=2)
    mx = np.take_along_axis(wt, idx[..., None], axis=2)[..., 0]
    scale = (mx / -8.0).astype(np.float32)
    inv = np.where(scale != 0, 1.0 / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    q = np.clip(np.rint(wt * inv[..., None]) + 8, 0, 15).astype(np.uint8)
    blob = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)  # (N, nb, 16)
    return {"B": blob, "scales": scale.reshape(-1)}


def nbits_dense(p, block=32):
    blob, scale = p["B"], p["scales"].reshape(N, -1)
    q = np.empty(blob.shape[:2] + (block,), np.float32)
    q[..., 0::2] = blob & 15
    q[..., 1::2] = blob >> 4
    return ((q - 8) * scale[..., None]).reshape(N, K).T


def perturb(arrs: dict, seed: int) -> dict:
    """A distinct copy of packed weights with the same structure (for cold rotation)."""
    rng = _rng(1000 + seed)
    out = {}
    for k, a in arrs.items():
        if k in ("col_ptr", "indices"):
            out[k] = a.copy()
        elif a.dtype == np.uint8 or a.dtype == np.uint32 or a.dtype == np.uint64 or a.dtype == np.int8:
            out[k] = rng.integers(0, 256, size=a.nbytes, dtype=np.uint8).view(a.dtype).reshape(a.shape) if a.dtype != np.int8 \
                else rng.integers(-127, 128, size=a.shape, dtype=np.int8)
        else:
            out[k] = (a * rng.uniform(0.9, 1.1, size=a.shape)).astype(a.dtype)
    return out


# ----------------------------------------------------------------------------- models

class Spec:
    def __init__(self, label, op_type, domain, names, arrays, attrs, copy_fn=perturb):
        self.label, self.op_type, self.domain = label, op_type, domain
        self.names, self.arrays, self.attrs, self.copy_fn = names, arrays, attrs, copy_fn

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays.values())


def chain_model(spec: Spec, copies: list[dict], nodes: int) -> bytes:
    inits, graph_nodes = [], []
    for c, arrs in enumerate(copies):
        for k, a in arrs.items():
            inits.append(numpy_helper.from_array(a, name=f"c{c}.{k}"))
    prev = "X"
    for i in range(nodes):
        c = i % len(copies)
        ins = [prev] + [f"c{c}.{k}" if k in copies[c] else "" for k in spec.names]
        while ins[-1] == "":
            ins.pop()
        out = "Y" if i == nodes - 1 else f"h{i}"
        graph_nodes.append(helper.make_node(spec.op_type, ins, [out], domain=spec.domain, **spec.attrs))
        prev = out
    g = helper.make_graph(graph_nodes, "bench", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["m", K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])], initializer=inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1), helper.make_opsetid(ops.DOMAIN, 1)]
    m = helper.make_model(g, opset_imports=opsets, ir_version=10)
    return m.SerializeToString()


def make_session(model: bytes, threads: int, lib: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.register_custom_ops_library(lib or str(library_path()))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


CLOCK = time.perf_counter


def time_session(sess, x, nodes, min_time, max_runs):
    feed = {"X": x}
    sess.run(None, feed)
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_runs):
        t0 = CLOCK()
        sess.run(None, feed)
        times.append((CLOCK() - t0) / nodes)
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- specs

def build_specs(quick: bool):
    w = gaussian_weight(0)
    specs = [Spec("ORT MatMul fp32", "MatMul", "", ["W"], {"W": w}, {})]
    nb = nbits_pack(w)
    specs.append(Spec("ORT MatMulNBits int4 b32 acc4", "MatMulNBits", "com.microsoft", ["B", "scales"], nb,
                      {"K": K, "N": N, "bits": 4, "block_size": 32, "accuracy_level": 4}))
    q = ops.pack_quant_matmul(w, bits=4, block_size=32)
    specs.append(Spec("QuantMatMul int4 b32 f32-scale", "QuantMatMul", ops.DOMAIN,
                      list(ops._INPUT_NAMES["QuantMatMul"][:-1]), q.inputs, q.attributes))
    if not quick:
        q16 = ops.pack_quant_matmul(w, bits=4, block_size=32, scale_dtype="float16")
        specs.append(Spec("QuantMatMul int4 b32 f16-scale", "QuantMatMul", ops.DOMAIN,
                          list(ops._INPUT_NAMES["QuantMatMul"][:-1]), q16.inputs, q16.attributes))
        q8 = ops.pack_quant_matmul(w, bits=8, block_size=32)
        specs.append(Spec("QuantMatMul int8 b32", "QuantMatMul", ops.DOMAIN,
                          list(ops._INPUT_NAMES["QuantMatMul"][:-1]), q8.inputs, q8.attributes))
    b = ops.pack_binary_matmul(w)
    specs.append(Spec("BinaryMatMul", "BinaryMatMul", ops.DOMAIN, ["bits", "alpha"], b.inputs, b.attributes))
    xn = ops.pack_xnor_matmul(w)
    specs.append(Spec("XnorMatMul", "XnorMatMul", ops.DOMAIN, ["bits", "alpha"], xn.inputs, xn.attributes))
    sparsities = (0.5, 0.7, 0.8, 0.9, 0.95) if not quick else (0.5, 0.9)
    rng = _rng(5)
    mask_src = rng.random((K, N))
    for s in sparsities:
        ws = w * (mask_src >= s) / np.sqrt(1 - s)
        dts = ("float32",) if (quick or s != 0.9) else ("float32", "float16", "int8")
        for dt in dts:
            p = ops.pack_sparse_matmul(ws.astype(np.float32), dt)
            specs.append(Spec(f"SparseMatMul {int(s * 100)}% {dt}", "SparseMatMul", ops.DOMAIN,
                              list(ops._INPUT_NAMES["SparseMatMul"][:-1]), p.inputs, p.attributes))
    return specs, w, nb, q


def accuracy(w, nb, q):
    x = _rng(9).standard_normal((16, K)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    res = {}
    spec_nb = Spec("nbits", "MatMulNBits", "com.microsoft", ["B", "scales"], nb,
                   {"K": K, "N": N, "bits": 4, "block_size": 32, "accuracy_level": 4})
    names = list(ops._INPUT_NAMES["QuantMatMul"][:-1])
    q16 = ops.pack_quant_matmul(w, bits=4, block_size=32, scale_dtype="float16")
    spec_q = Spec("q", "QuantMatMul", ops.DOMAIN, names, q.inputs, q.attributes)
    spec_q16 = Spec("q16", "QuantMatMul", ops.DOMAIN, names, q16.inputs, q16.attributes)
    for name, spec in (("MatMulNBits acc4", spec_nb), ("QuantMatMul f32-scale", spec_q),
                       ("QuantMatMul f16-scale", spec_q16)):
        y = make_session(chain_model(spec, [spec.arrays], 1), 1).run(None, {"X": x})[0]
        res[name] = float(np.sqrt(np.mean((y - exact) ** 2)) / np.sqrt(np.mean(exact**2)))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer ops and repeats")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--m", default="1,128")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds over all ops (median reported)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings of op labels to run (fp32 MatMul always runs)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (robust to other load on a shared "
                         "machine; equals latency only for 1 thread)")
    ap.add_argument("--against", default="", help="path of another build of the kernels library: onnxopt ops run with both")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    threads = [int(t) for t in args.threads.split(",")]
    ms = [int(m) for m in args.m.split(",")]
    print(f"onnxruntime {ort.__version__}, onnxopt kernels ISA={isa_level()}, K=N={K}, cold >= {COLD_BYTES // MB} MB, "
          f"clock={args.clock}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    specs, w, nb, q = build_specs(args.quick)
    if args.only:
        wanted = [o.strip().lower() for o in args.only.split(",") if o.strip()]
        specs = [s for s in specs if s.op_type == "MatMul" or any(o in s.label.lower() for o in wanted)]
    acc = accuracy(w, nb, q)
    print("int4 output error (rel. RMS vs fp64 x@W): " + ", ".join(f"{k}={v:.4%}" for k, v in acc.items()))
    min_time = 0.3 if args.quick else 0.8
    # models of every (spec, temperature), built once; each round measures every cell once, so
    # load changes on a shared machine hit all ops alike; the table shows the median over rounds
    models = {}
    for spec in specs:
        copies_cold = max(2, -(-COLD_BYTES // spec.nbytes))
        copies = [spec.arrays] + [spec.copy_fn(spec.arrays, i) for i in range(1, copies_cold)]
        for temp, cps in (("hot", copies[:1]), ("cold", copies)):
            # nodes per run: enough to amortize overhead, and >= copies for cold
            nodes = {m: (8 if m == 1 else 2) if temp == "hot" else copies_cold for m in ms}
            models[(spec.label, temp)] = {n: chain_model(spec, cps, n) for n in set(nodes.values())}, nodes
        del copies
        gc.collect()
    samples = {}
    libs = [("", None)] + ([(" [against]", args.against)] if args.against else [])
    runs = [(spec, spec.label + tag, lib) for spec in specs for tag, lib in (libs if spec.domain == ops.DOMAIN else libs[:1])]
    for rnd in range(args.rounds):
        for spec, label, lib in runs:
            for m in ms:
                x = _rng(3).standard_normal((m, K)).astype(np.float32)
                res = {}
                for temp in ("hot", "cold"):
                    by_nodes, nodes = models[(spec.label, temp)]
                    for t in threads:
                        sess = make_session(by_nodes[nodes[m]], t, lib)
                        max_runs = 50 if m == 1 else (5 if temp == "hot" else 2)
                        if args.quick:
                            max_runs = max(2, max_runs // 3)
                        res[(temp, t)] = time_session(sess, x, nodes[m], min_time if m == 1 else 0.0, max_runs)
                        samples.setdefault((label, m, temp, t), []).append(res[(temp, t)])
                        del sess
                        gc.collect()
                print(f"  round {rnd + 1} {label:34s} M={m:<4d} " + " ".join(
                    f"{k[0]}/{k[1]}T={v:.3f}ms" for k, v in res.items()), flush=True)
    rows = [(label, m, {(temp, t): statistics.median(samples[(label, m, temp, t)])
                        for temp in ("hot", "cold") for t in threads})
            for _, label, _ in runs for m in ms]
    # table
    base = {m: r for label, m, r in rows if label == specs[0].label}
    print()
    hdr = f"| {'op':34s} | {'M':>3s} | {'thr':>3s} | {'hot ms':>8s} | {'cold ms':>8s} | {'x fp32 hot':>10s} | {'x fp32 cold':>11s} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for label, m, res in rows:
        b = base[m]
        for t in threads:
            h, c = res[("hot", t)], res[("cold", t)]
            print(f"| {label:34s} | {m:>3d} | {t:>3d} | {h:8.3f} | {c:8.3f} | "
                  f"{b[('hot', t)] / h:9.1f}x | {b[('cold', t)] / c:10.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
