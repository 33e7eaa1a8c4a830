"""Quantization benchmark: onnxruntime's quantizers vs onnxopt's passes on MiniLM-L6, the MNIST CNN and an LSTM.

    python bench/quantize.py            # full run (~15-25 min on 2 cores)
    python bench/quantize.py --quick    # fewer calibration samples and latency rounds
    python bench/quantize.py --only lstm

Each quantization runs in its own subprocess, which reports its wall time and peak RSS
(``VmHWM``: interpreter + libraries + the quantizer's own memory). Latency: batch 1 (MiniLM:
seq 128), medians of interleaved rounds over all variants of a model, at 1 and 2 threads.
Metrics: MiniLM WordSim-353 Spearman, CNN held-out accuracy, LSTM relative L2 error of the output against
fp32 (a seeded random LSTM, input 256, hidden 512, 64 steps; no task data). Models go to ``bench/out/quantize/``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "quantize"
MINILM = ROOT / "models" / "out" / "minilm.onnx"
MINILM_CALIB = ROOT / "models" / "out" / "minilm_calib.npz"
CNN_SOURCE = ROOT / "models" / "cnn_mnist.onnx"
CNN_CALIB = ROOT / "models" / "data" / "mnist_calib.npz"

# variant -> (description, kind, arguments); the fp32 model is the first row of each table.
MINILM_VARIANTS = {
    "ort static minmax": ("ort_static", {"method": "MinMax"}),
    "ort static entropy": ("ort_static", {"method": "Entropy"}),
    "ort static percentile": ("ort_static", {"method": "Percentile"}),
    "ort dynamic per-tensor": ("ort_dynamic", {"per_channel": False}),
    "ort dynamic per-channel": ("ort_dynamic", {"per_channel": True}),
    "ort MatMulNBits int4": ("ort_nbits", {"gather": False}),
    "ort MatMulNBits int4 +emb (opset 21)": ("ort_nbits", {"gather": True}),
    "onnxopt int8 static": ("onnxopt", {"passes": ["quantize-int8"]}),
    "onnxopt int8 static percentile": ("onnxopt", {"passes": ["quantize-int8:calibration=percentile"]}),
    "onnxopt dynamic": ("onnxopt", {"passes": ["quantize-dynamic"]}),
    "onnxopt int4 rtn": ("onnxopt", {"passes": ["quantize-weights"]}),
    "onnxopt int4 gptq": ("onnxopt", {"passes": ["quantize-weights:algorithm=gptq"]}),
    "onnxopt int4 gptq sequential": ("onnxopt", {"passes": ["quantize-weights:algorithm=gptq,sequential=true"]}),
    "onnxopt int4 rtn onnxopt-format": ("onnxopt", {"passes": ["quantize-weights:format=onnxopt"]}),
    "onnxopt fp16": ("onnxopt", {"passes": ["convert-fp16"]}),
    "onnxopt fp16 + int4 rtn": ("onnxopt", {"passes": ["convert-fp16", "quantize-weights"]}),
    "onnxopt bf16 (CPU: emulated)": ("onnxopt", {"passes": ["convert-bf16"]}),
}
SLOW_VARIANTS = {"onnxopt int4 gptq sequential"}  # left out of --quick (one pass over the data per layer depth)
CNN_VARIANTS = {
    "ort static minmax": ("ort_static", {"method": "MinMax"}),
    "ort static entropy": ("ort_static", {"method": "Entropy"}),
    "ort dynamic per-channel": ("ort_dynamic", {"per_channel": True}),
    "onnxopt int8 static": ("onnxopt", {"passes": ["quantize-int8"]}),
    "onnxopt int8 static entropy": ("onnxopt", {"passes": ["quantize-int8:calibration=entropy"]}),
    "onnxopt dynamic": ("onnxopt", {"passes": ["quantize-dynamic"]}),
    "onnxopt fp16": ("onnxopt", {"passes": ["convert-fp16"]}),
}
LSTM_VARIANTS = {
    "ort dynamic per-tensor": ("ort_dynamic", {"per_channel": False}),
    "ort dynamic per-channel": ("ort_dynamic", {"per_channel": True}),
    "onnxopt dynamic per-tensor": ("onnxopt", {"passes": ["quantize-dynamic:per_channel=false"]}),
    "onnxopt dynamic": ("onnxopt", {"passes": ["quantize-dynamic"]}),
}
LSTM_SHAPE = {"inputs": 256, "hidden": 512, "steps": 64, "classes": 10}


# ------------------------------------------------------------------ worker (one quantization)


def _calibration_reader(model_path: str, calib: str, samples: int):
    from onnxruntime.quantization import CalibrationDataReader

    import onnx

    names = [i.name for i in onnx.load(model_path, load_external_data=False).graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            with np.load(calib) as data:
                arrays = {k: data[k][:samples] for k in names}
            count = min(a.shape[0] for a in arrays.values())
            self.feeds = iter([{k: a[i : i + 8] for k, a in arrays.items()} for i in range(0, count, 8)])

        def get_next(self):
            return next(self.feeds, None)

    return Reader()


def worker(kind: str, args: dict, source: str, target: str, calib: str, samples: int) -> None:
    start = time.perf_counter()
    if kind == "ort_static":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        quantize_static(
            source, target, _calibration_reader(source, calib, samples), quant_format=QuantFormat.QDQ,
            per_channel=True, calibrate_method=getattr(CalibrationMethod, args["method"]),
        )  # fmt: skip
    elif kind == "ort_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, per_channel=args["per_channel"], weight_type=QuantType.QInt8)
    elif kind == "ort_nbits":
        import onnx
        import onnx.version_converter
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        op_types = ("MatMul", "Gather") if args["gather"] else ("MatMul",)
        config = nbits.DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=True, accuracy_level=4, op_types_to_quantize=op_types,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )  # fmt: skip
        model = onnx.load(source)
        if args["gather"] and model.opset_import[0].version < 21:
            # Gather quantization moves the model to opset 21 without converting older ops (ReduceMean's
            # axes attribute breaks it): convert first, as a user of that quantizer has to.
            model = onnx.version_converter.convert_version(model, 21)
        quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(target, use_external_data_format=False)
    else:
        from onnxopt import io
        from onnxopt.calibration import Dataset
        from onnxopt.pipeline import PassSpec, run_pipeline

        specs = [PassSpec.parse(p) for p in args["passes"]]
        for spec in specs:
            if spec.name in ("quantize-int8", "quantize-weights"):
                key = "calibration_samples"
                spec.options.setdefault(key, samples)
        model = io.load(source)
        model, report = run_pipeline(model, specs, Dataset.load(calib), check=False, numeric_check=False)
        io.save(model, target)
        details = report.records[-1].details
        summary = {k: details[k] for k in ("kept_float", "overflowing_ops", "quantized") if k in details}
        print("DETAILS " + json.dumps(summary, default=str)[:300], file=sys.stderr)
    wall = time.perf_counter() - start
    # VmHWM is this process's own high-water mark (ru_maxrss can carry the parent's across exec).
    status = pathlib.Path("/proc/self/status").read_text().splitlines()
    hwm = [int(line.split()[1]) for line in status if line.startswith("VmHWM:")]
    peak_mb = (hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": peak_mb}))


def run_worker(kind, args, source, target, calib, samples) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps([kind, args, str(source), str(target), str(calib), samples])]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    error = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return {"error": (error[-1] if error else f"exit {proc.returncode}")[:120]}


# ------------------------------------------------------------------ parent


def prepare() -> pathlib.Path:
    OUT.mkdir(parents=True, exist_ok=True)
    if not MINILM.exists():
        subprocess.run([sys.executable, "-m", "models.minilm"], check=True, cwd=ROOT)
    if not MINILM_CALIB.exists():
        subprocess.run([sys.executable, "-m", "models.minilm", "--calib", str(MINILM_CALIB)], check=True, cwd=ROOT)
    # The CNN as users would feed it to either quantizer: BatchNorm folded into the convolutions.
    from onnxopt import io
    from onnxopt.pipeline import run_pipeline

    cnn, _ = run_pipeline(io.load(CNN_SOURCE), ["cleanup", "fuse"], numeric_check=False)
    cnn_path = OUT / "cnn_fp32.onnx"
    io.save(cnn, cnn_path)
    return cnn_path


def lstm_model() -> tuple[pathlib.Path, pathlib.Path]:
    """A seeded random LSTM (sequence first, batch 1) with a Gemm classifier on its last state, and a
    calibration file of random sequences (the dynamic quantizers read none)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, h, steps, classes = (LSTM_SHAPE[key] for key in ("inputs", "hidden", "steps", "classes"))
    rng = np.random.default_rng(0)
    bound = 1 / np.sqrt(h)  # PyTorch's LSTM initialization range
    weights = {"W": rng.uniform(-bound, bound, (1, 4 * h, k)), "R": rng.uniform(-bound, bound, (1, 4 * h, h)),
               "B": rng.uniform(-bound, bound, (1, 8 * h)), "fc_w": rng.uniform(-bound, bound, (classes, h)),
               "fc_b": np.zeros(classes), "axes": np.array([0])}
    inits = [numpy_helper.from_array(v.astype(np.int64 if n == "axes" else np.float32), n) for n, v in weights.items()]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h_last"], hidden_size=h, name="lstm"),
             helper.make_node("Squeeze", ["h_last", "axes"], ["state"]),
             helper.make_node("Gemm", ["state", "fc_w", "fc_b"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], inits)
    path, calib = OUT / "lstm_fp32.onnx", OUT / "lstm_calib.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    np.savez(calib, x=rng.standard_normal((steps, 1, k)).astype(np.float32))  # read by no dynamic quantizer
    return path, calib


def lstm_error(fp32_path: pathlib.Path):
    """Relative L2 error of a model's logits against fp32's over 32 seeded random sequences."""
    from onnxopt import runtime

    feeds = [{"x": x} for x in np.random.default_rng(1).standard_normal((32, LSTM_SHAPE["steps"], 1, LSTM_SHAPE["inputs"])).astype(np.float32)]
    reference = np.concatenate([runtime.session(str(fp32_path)).run(None, f)[0] for f in feeds])

    def error(path: str) -> float:
        session = runtime.session(path)
        out = np.concatenate([session.run(None, f)[0] for f in feeds])
        return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))

    return error


def measure(title, source, variants, calib, samples, metric, feed, rounds, repeat) -> list[dict]:
    from onnxopt import runtime
    from onnxopt.validate import interleaved_latency_ms

    rows = [{"name": "fp32", "path": source, "wall_s": None, "peak_rss_mb": None}]
    for name, (kind, args) in variants.items():
        target = OUT / f"{title}_{name.replace(' ', '_').replace('+', 'plus')}.onnx"
        print(f"[{title}] quantizing: {name}", file=sys.stderr, flush=True)
        result = run_worker(kind, args, source, target, calib, samples)
        rows.append({"name": name, "path": target, **result})
    for row in rows:
        if "error" in row:
            continue
        try:
            row["size_mb"] = sum(p.stat().st_size for p in row["path"].parent.glob(row["path"].name + "*")) / 1e6
            row["metric"] = metric(str(row["path"]))
        except Exception as exc:  # a quantized model onnxruntime cannot run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    runnable = [r for r in rows if "error" not in r]
    for threads in (1, 2):
        sessions = [runtime.session(str(r["path"]), threads=threads) for r in runnable]
        for row, ms in zip(runnable, interleaved_latency_ms(sessions, feed, rounds=rounds, repeat=repeat)):
            row[f"ms_{threads}t"] = ms
    return rows


def table(title: str, rows: list[dict], metric_name: str) -> str:
    base = next(r for r in rows if r["name"] == "fp32")
    lines = [
        f"### {title}",
        f"| variant | size MB | 1T ms | 2T ms | speedup 1T | {metric_name} | quant s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | |")
            continue
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['size_mb']:.1f} | {r['ms_1t']:.2f} | {r['ms_2t']:.2f} | "
            f"{base['ms_1t'] / r['ms_1t']:.2f}x | {r['metric']:.4f} | {wall} | {rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 calibration samples, fewer latency rounds")
    parser.add_argument("--only", choices=("minilm", "cnn", "lstm"), action="append", help="run only these tables")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        try:
            worker(*json.loads(args.worker))
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        return
    from models import evaluate

    samples = 32 if args.quick else 128
    started, load_before = time.perf_counter(), os.getloadavg()
    rounds, repeat = (3, 5) if args.quick else (7, 10)
    only = set(args.only or ("minilm", "cnn", "lstm"))
    cnn_path = prepare()
    if "minilm" in only:
        minilm_variants = {k: v for k, v in MINILM_VARIANTS.items() if not (args.quick and k in SLOW_VARIANTS)}
        minilm_rows = measure(
            "minilm", MINILM, minilm_variants, MINILM_CALIB, samples,
            lambda p: evaluate.word_similarity(p, "wordsim353"), evaluate.minilm_inputs(1, 128), rounds, repeat,
        )  # fmt: skip
        print(table(f"MiniLM-L6 (batch 1, seq 128; {samples} calibration samples)", minilm_rows, "WordSim-353") + "\n")
    if "cnn" in only:
        cnn_feed = {"input": evaluate.mnist_calibration()["input"][:1]}
        cnn_rows = measure("cnn", cnn_path, CNN_VARIANTS, CNN_CALIB, 256, evaluate.mnist_accuracy, cnn_feed, rounds, repeat * 4)
        print(table("MNIST CNN (batch 1; 256 calibration samples; BatchNorm folded first)", cnn_rows, "accuracy") + "\n")
    if "lstm" in only:
        lstm_path, lstm_calib = lstm_model()
        feed = {"x": np.random.default_rng(2).standard_normal((LSTM_SHAPE["steps"], 1, LSTM_SHAPE["inputs"])).astype(np.float32)}
        lstm_rows = measure("lstm", lstm_path, LSTM_VARIANTS, lstm_calib, 16, lstm_error(lstm_path), feed, rounds, repeat)
        print(table(f"LSTM ({LSTM_SHAPE}, batch 1; seeded random weights)", lstm_rows, "rel. error vs fp32"))
    load = ", ".join(f"{a:.1f}" for a in os.getloadavg())
    print(f"\n{os.cpu_count()} CPUs; load average {load_before[0]:.1f} at the start, {load} (1/5/15 min) at the end; "
          f"total {time.perf_counter() - started:.0f} s. Loaded machines inflate every latency; compare ratios.")


if __name__ == "__main__":
    main()
