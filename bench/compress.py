"""Structural compression benchmark: quality, file size and onnxruntime latency vs fp32.

MNIST CNN (accuracy on the 1000-image held-out split; calibration: 2048 images of the *training*
split of ``models/data/mnist_split.json`` — recovery of fc1's 1568 inputs overfits the committed 256):
global unstructured sparsity 50-95 % (SparseMatMul/SparseConv where the size-aware break-even says so),
structured pruning (fraction of channels removed), binarization of fc1 (the only MatMul/Gemm between
the convolutions and the classifier), activation-aware low-rank of fc1 (``ratio`` = fraction of its
parameters kept), conv2 split into 3x1 then 1x3 convs (low-rank ``conv_split``). MiniLM-L6 (WordSim-353 Spearman; calibration: news snippets of
``lee_background.cor`` without padding): Wanda sparsity of all MatMuls, low-rank of the FFN layers
(activation-aware SVD; ``ratio`` = fraction of the layer's parameters kept), structured pruning of FFN
neurons and of attention heads, binarization of the middle FFN layers, low-rank FFN allocated by layer
(``models/recipes/minilm_lowrank25.toml``). Each point with and without ``recover``. Latency:
batch 1 (the CNN over 64 different images taken in turn), interleaved medians against fp32 with onnxopt's
kernel library registered, 1 and 2 threads; the speedup ("x") is the median over the 7 rounds of each
round's fp32/candidate ratio. Timed twice: from Python (InferenceSession.run, ~8 us per call on this
machine) and from C++ ("C++" columns: onnxopt_latency, what a C++ deployment pays).

    python bench/compress.py [--quick] [--only cnn|minilm] [--points REGEX] [--minilm-snippets N --minilm-seed S]
"""

from __future__ import annotations

import argparse
import atexit
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build, evaluate  # noqa: E402
from onnxopt import io, pipeline, registry, runtime, validate  # noqa: E402
from onnxopt.calibration import Dataset  # noqa: E402
from onnxopt.errors import RuntimeLibraryError  # noqa: E402
from onnxopt.filters import NodeFilter  # noqa: E402

TMP = Path(tempfile.mkdtemp(prefix="onnxopt-bench-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)  # its models and profiles are scratch


def compress(path: Path, passes: list[tuple[str, dict, object]], data: Dataset) -> tuple[object, dict, float]:
    """Run ``passes`` on the model at ``path`` as one pipeline (a ``recover`` pass without a reference
    re-fits toward the model before the first lossy pass)."""
    start = time.perf_counter()
    specs = [pipeline.PassSpec(name, options, node_filter) for name, options, node_filter in passes]
    model, report = pipeline.run_pipeline(io.load(path), specs, data, check=False, numeric_check=False)
    details = {f"{i}:{record.name}": record.details for i, record in enumerate(report.records)}
    return model, details, time.perf_counter() - start


def recovery_summary(details: dict) -> str:
    found = [d.get("recover") or d.get("layers") for d in details.values()]
    layers = [v for f in found if isinstance(f, dict) for v in f.values() if isinstance(v, dict) and "error_before" in v]
    if not layers:
        return "-"
    before = np.mean([v["error_before"] for v in layers])
    after = np.mean([v["error_after"] for v in layers])
    reduced = sum(v["error_after"] < v["error_before"] for v in layers)
    return f"{before:.3f}→{after:.3f} ({reduced}/{len(layers)} reduced)"


def latencies(fp32_path: Path, path: Path, feed: validate.Feeds, repeat: int, native: bool = True) -> list[float]:
    """fp32 ms, candidate ms, speedup at 1 thread, then the same at 2 (speedup: median over rounds of each
    round's ratio, :func:`validate.interleaved_speedups`), then the speedups at 1 and 2 threads timed from
    C++ (:func:`validate.native_speedups`; NaN without the tool; not timed when ``native`` is false)."""
    out = []
    for threads in (1, 2):
        sessions = [runtime.session(str(fp32_path), threads=threads), runtime.session(str(path), threads=threads)]
        medians, speedups = validate.interleaved_speedups(sessions, feed, rounds=7, repeat=repeat)
        out += [*medians, speedups[1]]
    for threads in (1, 2) if native else ():
        try:
            out.append(validate.native_speedups([fp32_path, path], feed, threads=threads, rounds=7, repeat=repeat)[1][1])
        except RuntimeLibraryError:
            out.append(float("nan"))
    return out


def table(title: str, metric: str, rows: list[list[str]]) -> None:
    header = ["config", "recover", metric, "size MB", "ms 1T (fp32)", "x 1T", "ms 2T (fp32)", "x 2T", "x 1T C++", "x 2T C++",
              "layer err before→after", "s"]
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def with_recover(pass_: tuple[str, dict, object], own: bool, at_end: bool, samples: int):
    """A point's pass in its row with or without recovery: ``own`` is the ``recover`` option of passes that
    take it; an explicit ``recover`` pass (one re-fit of all layers after several lossy passes, which then
    leave their own off: chained, each would re-fit toward the previous pass's output) runs if ``at_end``."""
    name, options, node_filter = pass_
    if name == "recover":
        return (name, {**options, "samples": samples}, node_filter) if at_end else None
    if "recover" in registry.get(name).options:
        options = {**options, "recover": own, "samples": samples}
    return name, options, node_filter


POINTS = re.compile("")
"""Only the points whose label this matches (``--points``)."""


def run_points(fp32_path, points, data, quality, feed, samples, repeat):
    """``quality(session) -> str``: the metric cell; ``repeat``: runs per session and round of the latency
    medians (sub-millisecond models need many)."""
    points = [point for point in points if POINTS.search(point[0])]
    rows = []
    base_quality = quality(runtime.session(str(fp32_path)))
    base = latencies(fp32_path, fp32_path, feed, repeat, native=False)  # its ratios are 1 by definition
    rows.append(["fp32", "-", base_quality, f"{fp32_path.stat().st_size / 1e6:.2f}",
                 f"{base[0]:.3f}", "1.00", f"{base[3]:.3f}", "1.00", "1.00", "1.00", "-", "-"])
    for label, passes in points:
        for recover in (False, True):
            at_end = any(name == "recover" for name, _, _ in passes)
            passes_r = [with_recover(pass_, recover and not at_end, recover, samples) for pass_ in passes]
            passes_r = [p for p in passes_r if p is not None]
            model, details, seconds = compress(fp32_path, passes_r, data)
            path = io.save(model, TMP / f"{label.replace(' ', '_')}_{recover}.onnx")
            lat = latencies(fp32_path, path, feed, repeat)
            rows.append([label, "yes" if recover else "no", quality(runtime.session(str(path))), f"{path.stat().st_size / 1e6:.2f}",
                         f"{lat[1]:.3f} ({lat[0]:.3f})", f"{lat[2]:.2f}", f"{lat[4]:.3f} ({lat[3]:.3f})",
                         f"{lat[5]:.2f}", f"{lat[6]:.2f}", f"{lat[7]:.2f}", recovery_summary(details), f"{seconds:.0f}"])
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
    # 90 % of the weights in a pattern the panel GEMV packs without padding: 3 of every 32 of fc1's inputs
    # per output (its 97 % of the weights), half of conv2's and fc2's
    points.append(("fc1 3:32 + conv2, fc2 50% (90.1%)", [("prune", {"pattern": "3:32"}, NodeFilter(name_regex="fc1")),
                                                        ("prune", {"sparsity": 0.5}, NodeFilter(name_regex="features.4|fc2"))]))
    # Unstructured 90.2 % of all weights allocated by layer (the recipe file says why)
    recipe = pipeline.load_recipe(ROOT / "models/recipes/cnn_mnist_sparse90.toml")
    points.append(("unstructured 90.2% by layer: conv2 90%, fc1 90.5% by activity, fc2 50%", [(s.name, s.options, s.node_filter) for s in recipe]))
    points += [(f"structured {r:.0%} removed", [("prune-structured", {"ratio": r}, None)]) for r in (0.25, 0.5)]
    points.append(("binarize fc1", [("binarize", {"keep_first_last": False}, NodeFilter(name_regex="fc1"))]))
    # fc1 only: the classifier fc2 (512 -> 10) at rank 4 (ratio 0.5) already drops the accuracy to 0.56
    points += [(f"low-rank ratio {r} (fc1)", [("low-rank", {"ratio": r, "activation_aware": True}, NodeFilter(name_regex="fc1"))])
               for r in ((0.25,) if quick else (0.5, 0.25, 0.1))]
    points += [(f"conv2 spatial split rank {r}", [("low-rank", {"rank": r, "conv_split": "spatial"}, NodeFilter(name_regex="features.4"))])
               for r in (8, 16)]
    feeds = [{"input": x[i:i + 1]} for i in range(64)]  # taken in turn: no one image's branch pattern to learn
    rows = run_points(ROOT / "models/cnn_mnist.onnx", points, data, lambda s: f"{evaluate.mnist_accuracy(s):.4f}", feeds, n, repeat=320)
    table(f"MNIST CNN (accuracy, {n} calibration images, batch-1 latency over 64 different images)", "accuracy", rows)
    layer_share(ROOT / "models/cnn_mnist.onnx", feeds[0])


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


def minilm_calibration_dir(sentences: int, words: int, seq: int = 128, seed: int = 0) -> Dataset:
    """News snippets (``evaluate.minilm_calibration``, truncated to ``seq`` tokens) plus single words encoded
    alone as ``[CLS] w [SEP]``, the way the word-similarity metric feeds the model.

    The words are drawn (seeded) from the vocabulary of gensim's ``lee_background.cor`` — the same news
    corpus as the snippets, a different source from the metric's lists — and every word appearing in
    WordSim-353 or SimLex-999 is removed, so no evaluation word is ever seen during calibration.
    Samples are sorted by length and written in files of 8 cut to their longest sample, so padding
    positions (which the metric pools away) hardly enter the statistics. Samples = ``sentences + words``.
    """
    folder = TMP / f"minilm_calib_{sentences}_{words}_{seq}_{seed}"
    folder.mkdir(exist_ok=True)
    feeds = [evaluate.minilm_calibration(n=sentences, seq=seq, seed=seed)]
    if words:
        excluded = {w.lower() for name in ("wordsim353", "simlex999") for p in evaluate.word_pairs(name)[0] for w in p}
        text = evaluate.gensim_test_data("lee_background.cor").read_text(encoding="utf-8", errors="replace")
        vocabulary = sorted(set(re.findall(r"[a-z]{3,}", text.lower())) - excluded)
        chosen = np.random.default_rng(1).choice(vocabulary, size=min(words, len(vocabulary)), replace=False)
        feeds.append(evaluate._tokenizer()(list(chosen), max_length=16, padding="longest"))  # noqa: SLF001
    chunk = 0
    for feed in feeds:
        lengths = feed["attention_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), 8):
            rows = order[start : start + 8]
            width = int(lengths[rows].max())
            np.savez(folder / f"{chunk:05d}.npz", **{k: v[rows, :width] for k, v in feed.items()})
            chunk += 1
    return Dataset.load(folder)


def wordsim_with_interval(fp32_path: Path):
    """WordSim-353 of a session, with the 95 % paired-bootstrap interval of its drop from fp32's."""
    reference = evaluate.word_cosines(runtime.session(str(fp32_path)))
    human = evaluate.word_pairs("wordsim353")[1]

    def quality(session) -> str:
        cosines = evaluate.word_cosines(session)
        low, high = evaluate.similarity_drop_interval(reference, cosines, human)
        return f"{evaluate.spearman(cosines, human):.4f} [{low:+.3f}, {high:+.3f}]"

    return quality


def bench_minilm(quick: bool, words: int, target: str, snippets: int, seed: int) -> None:
    path = ROOT / "models/out/minilm.onnx"
    if not path.exists():
        print("MiniLM skipped: run `python -m models.minilm` first")
        return
    sentences = 16 if quick else snippets
    samples = sentences + words
    data = minilm_calibration_dir(sentences, words, seed=seed)
    ffn, names = ffn_filter(path)
    middle = NodeFilter(name_regex="^(" + "|".join(names[2:-2]) + ")$")
    ratios = (0.25,) if quick else (0.5, 0.25, 0.1)
    sparsities = (0.5, 0.9) if quick else (0.5, 0.7, 0.8, 0.9, 0.95)  # each recovered point re-fits 36 layers
    points = [(f"low-rank FFN ratio {r}", [("low-rank", {"ratio": r, "activation_aware": True}, ffn)]) for r in ratios]
    points += [(f"sparsity {s:.0%}", [("prune", {"sparsity": s, "method": "wanda", "scope": "column"}, None)]) for s in sparsities]
    points += [(f"structured FFN {r:.0%} removed", [("prune-structured", {"ratio": r}, ffn)]) for r in (0.25, 0.5)]
    points += [(f"attention heads {r:.0%} removed", [("prune-structured", {"ratio": r, "heads": True, "op_types": []}, None)])
               for r in (0.25, 0.5)]
    points.append(("binarize FFN layers 2-9", [("binarize", {"keep_first_last": False}, middle)]))
    # low-rank FFN at 25 % of the parameters allocated by layer (the recipe file says how); it ends with its recover
    recipe = pipeline.load_recipe(ROOT / "models/recipes/minilm_lowrank25.toml")
    points.append(("low-rank FFN 0.25 by layer (minilm_lowrank25.toml)", [(s.name, s.options, s.node_filter) for s in recipe]))
    # an explicit recover pass with the chosen target (`layer` suits MiniLM, see bench/README.md); structured
    # points keep prune-structured's own recovery (it re-fits the consumers of the removed channels)
    points = [(label, passes if passes[0][0] == "prune-structured" or passes[-1][0] == "recover"
               else [*passes, ("recover", {"target": target}, None)]) for label, passes in points]
    feed = evaluate.minilm_inputs(1, 128)
    rows = run_points(path, points, data, wordsim_with_interval(path), feed, samples, repeat=20)
    table(f"MiniLM-L6 (WordSim-353 Spearman, calibration {sentences} news snippets (seed {seed}) + {words} single words, batch 1 seq 128; low-rank ratios {ratios} = "
          f"fraction of parameters kept, recover = ridge re-fit chosen on held-out batches; sparsities {sparsities}; "
          f"structured = fraction of FFN neurons (or of each layer's 12 heads) removed; recover target={target}; [a, b] = 95 % paired-bootstrap "
          f"interval of the drop from fp32 over the 353 pairs)", "WordSim [drop interval]", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer points and calibration samples")
    parser.add_argument("--only", choices=("cnn", "minilm"))
    parser.add_argument("--points", default="", metavar="REGEX", help="only the points whose label matches")
    parser.add_argument("--calib-words", type=int, default=0, metavar="N",
                        help="MiniLM: add N single words (none from the metric's lists) to the calibration snippets")
    parser.add_argument("--minilm-recover-target", choices=("model", "layer"), default="layer",
                        help="MiniLM: what recover fits each layer to (the CNN uses the default, model)")
    parser.add_argument("--minilm-snippets", type=int, default=32, metavar="N",
                        help="MiniLM: calibration news snippets (recovery gains with more: bench/README.md, sessions 12-13)")
    parser.add_argument("--minilm-seed", type=int, default=0, help="MiniLM: which snippets are drawn")
    args = parser.parse_args()
    global POINTS
    POINTS = re.compile(args.points)
    runtime.kernel_library()  # fail early, clearly, when the kernels are not built
    if args.only in (None, "cnn"):
        bench_cnn(args.quick)
    if args.only in (None, "minilm"):
        bench_minilm(args.quick, args.calib_words, args.minilm_recover_target, args.minilm_snippets, args.minilm_seed)


if __name__ == "__main__":
    main()
