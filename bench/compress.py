"""Structural compression benchmark: quality, file size and onnxruntime latency vs fp32.

MNIST CNN (accuracy on the 1000-image held-out split; calibration from the training split): global
unstructured sparsity 50-95 %, binarization of fc1 (the only MatMul/Gemm between the convolutions and
the classifier). MiniLM-L6 (WordSim-353 Spearman; calibration on news snippets): sparsity of all
MatMuls, low-rank of the FFN layers (activation-aware SVD), binarization of the middle FFN layers.
Each point with and without ``recover``. Latency: batch 1, interleaved medians against fp32 with
onnxopt's kernel library registered, 1 and 2 threads.

    python bench/compress.py [--quick] [--only cnn|minilm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build, evaluate  # noqa: E402
from onnxopt import io, registry, runtime, validate  # noqa: E402
from onnxopt.calibration import Dataset  # noqa: E402
from onnxopt.filters import NodeFilter  # noqa: E402

TMP = Path(tempfile.mkdtemp(prefix="onnxopt-bench-"))


def compress(path: Path, passes: list[tuple[str, dict, object]], data: Dataset) -> tuple[object, dict, float]:
    model = io.load(path)
    details, start = {}, time.perf_counter()
    for name, options, node_filter in passes:
        instance = registry.get(name).create(options, data=data, node_filter=node_filter)
        instance(model)
        details[name] = instance.details
    return model, details, time.perf_counter() - start


def recovery_summary(details: dict) -> str:
    layers = [v for d in details.values() for v in d.get("recover", {}).values() if "error_before" in v]
    if not layers:
        return "-"
    before = np.mean([v["error_before"] for v in layers])
    after = np.mean([v["error_after"] for v in layers])
    reduced = sum(v["error_after"] < v["error_before"] for v in layers)
    return f"{before:.3f}→{after:.3f} ({reduced}/{len(layers)} reduced)"


def latencies(fp32_path: Path, path: Path, feed: dict) -> list[float]:
    out = []
    for threads in (1, 2):
        sessions = [runtime.session(str(fp32_path), threads=threads), runtime.session(str(path), threads=threads)]
        out += validate.interleaved_latency_ms(sessions, feed, rounds=5, repeat=20)
    return out  # fp32 1T, cand 1T, fp32 2T, cand 2T


def table(title: str, metric: str, rows: list[list[str]]) -> None:
    header = ["config", "recover", metric, "size MB", "ms 1T (fp32)", "x 1T", "ms 2T (fp32)", "x 2T", "layer err before→after", "s"]
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def run_points(fp32_path, points, data, quality, feed, samples):
    rows = []
    base_quality = quality(runtime.session(str(fp32_path)))
    base = latencies(fp32_path, fp32_path, feed)
    rows.append(["fp32", "-", f"{base_quality:.4f}", f"{fp32_path.stat().st_size / 1e6:.2f}",
                 f"{base[0]:.3f}", "1.00", f"{base[2]:.3f}", "1.00", "-", "-"])
    for label, passes in points:
        for recover in (False, True):
            passes_r = [(n, {**o, "recover": recover, "samples": samples}, f) for n, o, f in passes]
            model, details, seconds = compress(fp32_path, passes_r, data)
            path = io.save(model, TMP / f"{label.replace(' ', '_')}_{recover}.onnx")
            lat = latencies(fp32_path, path, feed)
            rows.append([label, "yes" if recover else "no", f"{quality(runtime.session(str(path))):.4f}", f"{path.stat().st_size / 1e6:.2f}",
                         f"{lat[1]:.3f} ({lat[0]:.3f})", f"{lat[0] / lat[1]:.2f}", f"{lat[3]:.3f} ({lat[2]:.3f})",
                         f"{lat[2] / lat[3]:.2f}", recovery_summary(details), f"{seconds:.0f}"])
            print("  done", label, recover, rows[-1][2], file=sys.stderr, flush=True)
    return rows


def bench_cnn(quick: bool) -> None:
    pixels, _ = build.load_mnist_5k()
    train = build.mnist_split()["train"]
    n = 512 if quick else 2048
    x = build.mnist_normalize(pixels[train[:n]]).reshape(-1, 1, 28, 28).astype(np.float32)
    data = Dataset.from_arrays({"input": x})
    sparsities = (0.5, 0.9) if quick else (0.5, 0.7, 0.8, 0.9, 0.95)
    points = [(f"sparsity {s:.0%}", [("prune", {"sparsity": s, "scope": "global"}, None)]) for s in sparsities]
    points.append(("binarize fc1", [("binarize", {"keep_first_last": False}, NodeFilter(name_regex="fc1"))]))
    feed = {"input": x[:1]}
    rows = run_points(ROOT / "models/cnn_mnist.onnx", points, data, evaluate.mnist_accuracy, feed, n)
    table(f"MNIST CNN (accuracy, {n} calibration images, batch-1 latency)", "accuracy", rows)
    layer_share(ROOT / "models/cnn_mnist.onnx", feed)


def layer_share(path: Path, feed: dict) -> None:
    """Share of fp32 run time per op type (onnxruntime profiler, 1 thread)."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = 1
    options.profile_file_prefix = str(TMP / "profile")
    sess = ort.InferenceSession(str(path), options)
    for _ in range(200):
        sess.run(None, feed)
    events = json.load(open(sess.end_profiling()))
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0) + e["dur"]
    whole = sum(totals.values())
    print("\nfp32 kernel time by op (1 thread): " + ", ".join(f"{k} {v / whole:.0%}" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])))


def ffn_filter(model_path: Path):
    """Select MiniLM's FFN MatMuls (weights 384x1536 and 1536x384)."""
    model = io.load(model_path)
    names = {n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
             and 1536 in n.inputs[1].const_value.shape}
    return NodeFilter(name_regex="^(" + "|".join(sorted(names)) + ")$"), sorted(names)


def bench_minilm(quick: bool) -> None:
    path = ROOT / "models/out/minilm.onnx"
    if not path.exists():
        print("MiniLM skipped: run `python -m models.minilm` first")
        return
    samples = 32 if quick else 64
    data = Dataset.from_arrays(evaluate.minilm_calibration(n=samples, seq=128))
    ffn, names = ffn_filter(path)
    middle = NodeFilter(name_regex="^(" + "|".join(names[2:-2]) + ")$")
    ratios = (0.25,) if quick else (0.5, 0.25, 0.1)
    sparsities = (0.5, 0.9) if quick else (0.5, 0.7, 0.8, 0.9, 0.95)
    points = [(f"low-rank FFN {r}", [("low-rank", {"ratio": r, "activation_aware": True}, ffn)]) for r in ratios]
    points += [(f"sparsity {s:.0%}", [("prune", {"sparsity": s, "method": "wanda", "scope": "column"}, None)]) for s in sparsities]
    points.append(("binarize FFN layers 2-9", [("binarize", {"keep_first_last": False}, middle)]))
    feed = evaluate.minilm_inputs(1, 128)
    rows = run_points(path, points, data, lambda p: evaluate.word_similarity(p, "wordsim353"), feed, samples)
    table(f"MiniLM-L6 (WordSim-353 Spearman, {samples} calibration snippets, batch 1 seq 128)", "WordSim", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and calibration samples")
    parser.add_argument("--only", choices=("cnn", "minilm"))
    args = parser.parse_args()
    runtime.kernel_library()  # fail early, clearly, when the kernels are not built
    if args.only in (None, "cnn"):
        bench_cnn(args.quick)
    if args.only in (None, "minilm"):
        bench_minilm(args.quick)


if __name__ == "__main__":
    main()
